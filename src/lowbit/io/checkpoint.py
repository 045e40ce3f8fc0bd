"""Self-describing checkpoints: safetensors + ``lowbit.json``; never pickle.

Layout of a checkpoint folder::

    config.json, tokenizer files     the base model's (transformers) config
    model.safetensors                every stored tensor (packed codes, fp16 scales, 16-bit rest)
    lowbit.json                      format version, recipe, one spec per quantized module
    lowbit.manifest.json             every other file of the folder with its size and sha256,
                                     the format version and the lowbit version (written last)

The manifest makes a checkpoint checkable and says which files lowbit wrote:

- a load (``verify=True``, the default) compares every listed file's size and sha256 before returning the
  model, so flipped bytes or tensors swapped between layers are an error, not a quietly different model;
  a folder without a manifest is refused there (``verify=False`` loads it unchecked). Every load, verified
  or not, also checks each quantized module's spec against its buffers (shapes, dtypes, a format the
  recipe names) and that scales, zeros and codebooks are finite;
- a save replaces a folder only when it is a checkpoint by its manifest and holds nothing the manifest does
  not list, so it never deletes a file lowbit did not write.

Writes go to a temp folder that is flushed to disk and renamed into place
(:func:`lowbit.utils.atomic_dir`), so an interrupted save never leaves a
half-written checkpoint. A save or load first cleans up what a killed save
left next to the folder (:func:`lowbit.utils.recover_dir`): the previous
checkpoint is renamed back when the kill came between the two renames, temp
folders are deleted.
"""
from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .._version import __version__
from ..data.fetch import sha256_file
from ..errors import CheckpointError, ConfigError
from ..formats import make_format
from ..models.arch import set_module
from ..nn.codecs import get_codec
from ..nn.registry import build_module, module_entries
from ..utils import atomic_dir, recover_dir, stale_leftovers

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_VERSION = 1
META_FILE = "lowbit.json"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "lowbit.manifest.json"
#: files a load reads, so a verified load needs them listed in the manifest
_LOADED_FILES = ("config.json", META_FILE, WEIGHTS_FILE)

__all__ = ["save_checkpoint", "load_checkpoint", "is_checkpoint", "read_meta", "read_manifest", "write_manifest",
           "check_modules", "check_out_path", "FORMAT_VERSION", "MANIFEST_FILE"]


def is_checkpoint(path) -> bool:
    """Whether a load takes ``path`` for a lowbit checkpoint: it holds ``lowbit.json`` (everything else is
    checked on load, with clear errors), or it is missing and a save killed between its two renames left the
    previous checkpoint next to it (the load restores it)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return True
    return not path.exists() and any(kind == "old" and (p / META_FILE).is_file()
                                     for kind, p in stale_leftovers(path))


def _json_type(x) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(x), "a number")


def _listing(names: list[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _unlisted(folder: Path, listed: set[str], prefix: str = "") -> list[str]:
    """Relative paths under ``folder`` that ``listed`` does not hold: files, and folders holding none of them
    (named once, with a trailing ``/``)."""
    out = []
    for p in sorted(folder.iterdir()):
        rel = prefix + p.name
        if p.is_dir() and not p.is_symlink():
            if any(x.startswith(rel + "/") for x in listed):
                out += _unlisted(p, listed, rel + "/")
            else:
                out.append(rel + "/")
        elif rel not in listed:
            out.append(rel)
    return out


def write_manifest(folder: Path) -> dict:
    """List every file of ``folder`` (relative path, size, sha256) in its :data:`MANIFEST_FILE`; returns it."""
    folder = Path(folder)
    rels = sorted(x.relative_to(folder).as_posix() for x in folder.rglob("*") if x.is_file())
    files = {rel: {"size": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)}
             for rel in rels if rel != MANIFEST_FILE}
    manifest = {"manifest_version": MANIFEST_VERSION, "format_version": FORMAT_VERSION, "lowbit_version": __version__,
                "files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


_SHA256 = re.compile(r"[0-9a-f]{64}")


def read_manifest(path) -> dict:
    """``{relative path: {"size": bytes, "sha256": hex}}`` from the checkpoint's manifest, or
    :class:`CheckpointError` when it is missing or malformed."""
    path = Path(path)
    f = path / MANIFEST_FILE
    if not f.is_file():
        raise CheckpointError(
            f"{path} is not a complete lowbit checkpoint: {MANIFEST_FILE} is missing, so its files cannot be checked "
            f"(a save that did not finish, files copied without it, or a checkpoint from a lowbit that wrote no "
            f"manifest); re-create it with `lowbit quantize`, or load it unchecked with --no-verify (verify=False)")
    try:
        manifest = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint is corrupt") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{f} has no 'files' table; the checkpoint is corrupt")
    for rel, entry in files.items():
        parts = rel.split("/")
        if rel.startswith("/") or ".." in parts or "" in parts or rel == MANIFEST_FILE:
            raise CheckpointError(f"{f} lists {rel!r}, which is no file name inside a checkpoint; "
                                  f"the manifest is corrupt")
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
            raise CheckpointError(f"{f}: the entry of {rel!r} is not {{size, sha256}}; the manifest is corrupt")
    return files


def check_out_path(path) -> Path:
    """``path`` if a checkpoint may be saved there, else :class:`CheckpointError`.

    A save replaces the whole folder, so it may go only where nothing would be lost: a path that does not
    exist yet, an empty folder, or an earlier lowbit checkpoint holding only the files its manifest lists
    (which is replaced). The error names the files that would be lost.
    """
    path = Path(path)
    if not path.exists():
        return path
    if not path.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {path}: it is an existing file and a checkpoint is a "
                              f"folder; choose a new folder name")
    if not any(path.iterdir()):
        return path
    try:
        listed = set(read_manifest(path))
    except CheckpointError:
        others = _listing(_unlisted(path, set()))
        if (path / META_FILE).is_file():
            raise CheckpointError(
                f"cannot save a checkpoint to {path}: the folder has a {META_FILE} but no valid {MANIFEST_FILE}, so "
                f"lowbit cannot tell which of its files ({others}) it wrote, and saving replaces the whole folder; "
                f"choose a new or empty folder, or delete this one yourself if nothing in it is needed") from None
        raise CheckpointError(f"cannot save a checkpoint to {path}: the folder holds other files and no {META_FILE} "
                              f"({others}), and saving replaces the whole folder; choose a new or empty "
                              f"folder") from None
    foreign = _unlisted(path, listed | {MANIFEST_FILE})
    if foreign:
        raise CheckpointError(
            f"cannot save a checkpoint to {path}: the checkpoint there also holds {_listing(foreign)}, which its "
            f"{MANIFEST_FILE} does not list (lowbit did not write {'it' if len(foreign) == 1 else 'them'}), and "
            f"saving replaces the whole folder; move {'it' if len(foreign) == 1 else 'them'} out, or choose another "
            f"folder")
    return path


def save_checkpoint(model: nn.Module, path, tokenizer=None, extra: dict | None = None) -> Path:
    """Save a (quantized) model to folder ``path`` atomically; returns the path.

    ``path`` must be new, empty or an earlier checkpoint (:func:`check_out_path`), never a folder of other files.
    What an earlier killed save left next to ``path`` is cleaned up first (:func:`lowbit.utils.recover_dir`).
    """
    path = Path(path)
    recover_dir(path)
    check_out_path(path)
    summary = getattr(model, "lowbit_summary", {}) or {}
    storage = (summary.get("recipe") or {}).get("storage", {}).get("dtype", "float16")
    sdt = getattr(torch, storage)
    tensors, aliases, seen = {}, {}, {}
    for k, t in model.state_dict().items():
        key = (t.data_ptr(), t.numel(), t.dtype, tuple(t.shape))
        if t.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        t = t.detach()
        if t.dtype == torch.float32:
            t = t.to(sdt)
        tensors[k] = t.contiguous().cpu()
    meta = {
        "format_version": FORMAT_VERSION,
        "lowbit_version": __version__,
        "storage_dtype": storage,
        "modules": module_entries(model),
        "aliases": aliases,
        "n_params": getattr(model, "lowbit_n_params", None),
        "summary": summary,
        **(extra or {}),
    }
    with atomic_dir(path, durable=True) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            try:
                model.generation_config.save_pretrained(tmp)
            except (ValueError, TypeError) as e:  # an invalid generation config is not worth failing a save
                log.warning("generation config not saved: %s", e)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "lowbit_format_version": str(FORMAT_VERSION)})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        write_manifest(tmp)  # last: a folder with a manifest is a finished checkpoint
    return path


def read_meta(path) -> dict:
    """The checkpoint's ``lowbit.json``, checked for shape (an object, the format version, a ``modules`` table of
    ``{type, spec}`` objects, ``aliases`` and ``summary`` objects). A checkpoint that a killed save left
    beside its path is restored first (:func:`lowbit.utils.recover_dir`)."""
    path = Path(path)
    recover_dir(path)
    f = path / META_FILE
    if not path.exists():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    if not f.is_file():
        raise CheckpointError(f"{path} is not a lowbit checkpoint: {META_FILE} is missing (save one with `lowbit quantize ... --out DIR`)")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint is corrupt, re-create it with `lowbit quantize`") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f} holds {_json_type(meta)}, not the object lowbit writes; the checkpoint is corrupt, "
                              f"re-create it with `lowbit quantize`")
    v = meta.get("format_version")
    if v != FORMAT_VERSION:
        raise CheckpointError(f"{f} has format_version {v!r}; this lowbit reads version {FORMAT_VERSION}")
    if not isinstance(meta.get("modules"), dict):
        raise CheckpointError(f"{f} has no 'modules' table; the checkpoint is corrupt")
    for name, entry in meta["modules"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("type"), str) and isinstance(entry.get("spec"), dict)):
            raise CheckpointError(f"{f}: the entry of module {name!r} is {_json_type(entry)}, not an object with a "
                                  f"'type' and a 'spec' object; the checkpoint is corrupt")
    for key in ("aliases", "summary"):
        if not isinstance(meta.get(key, {}), dict):
            raise CheckpointError(f"{f}: '{key}' is {_json_type(meta[key])}, not an object; the checkpoint is corrupt")
    if not all(isinstance(k, str) and isinstance(t, str) for k, t in meta.get("aliases", {}).items()):
        raise CheckpointError(f"{f}: 'aliases' must map tensor names to tensor names; the checkpoint is corrupt")
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    wf = path / WEIGHTS_FILE
    if not wf.is_file():
        raise CheckpointError(f"{wf} is missing; the checkpoint is incomplete, re-create it with `lowbit quantize`")
    try:
        with safe_open(str(wf), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{wf} is corrupt or truncated ({e}); re-create the checkpoint with `lowbit quantize`") from None


def _build_skeleton(path: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json is missing or invalid ({e})") from None
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _verify_files(path: Path, files: dict) -> str | None:
    """Why the files of ``path`` differ from their manifest entries (size, then sha256), or None."""
    for rel, e in files.items():
        f = path / rel
        if not f.is_file():
            return f"{f}, listed in {MANIFEST_FILE}, is missing; the checkpoint is incomplete"
        if f.stat().st_size != e["size"]:
            return (f"{f} is corrupt or truncated: {f.stat().st_size} bytes where {MANIFEST_FILE} lists {e['size']}")
    try:
        changed = [rel for rel, e in files.items() if sha256_file(path / rel) != e["sha256"]]
    except OSError as e:
        return f"a file of {path} cannot be read ({e})"
    if changed:
        return (f"{_listing(changed)} in {path} changed after the save: the sha256 differs from {MANIFEST_FILE} "
                f"(flipped bytes, an edit, or tensors swapped between layers)")
    return None


def _recipe_formats(meta: dict) -> list[dict] | None:
    """The formats the recipe names (weights, embedding, head, per-layer ``layers``) and their fallbacks, each a
    ``{field: value}`` dict; None without a recipe."""
    recipe = meta.get("summary", {}).get("recipe")
    if not isinstance(recipe, dict):
        return None
    layers = recipe.get("layers")
    per_layer = list(layers.values()) if isinstance(layers, dict) else []
    named = [f for f in (*(recipe.get(k) for k in ("fmt", "embed", "head")), *per_layer) if isinstance(f, dict)]
    unique = list({json.dumps(f, sort_keys=True): f for f in named}.values())   # a plan repeats a few formats
    return [g for f in unique for g in _layer_formats(f)]


def _layer_formats(f: dict) -> list[dict]:
    """A recipe format and the formats its layers may carry instead (a K-quant's fallback for other widths)."""
    try:
        return [f] + [g.spec() for g in make_format(f).layer_formats()[1:]]
    except (ConfigError, TypeError):
        return [f]


def check_modules(meta: dict, tensors: dict[str, torch.Tensor]) -> set[str]:
    """Check every quantized module's spec against its buffers; returns the names of all codec buffers.

    A spec must be one its codec accepts; each buffer must exist with the shape and dtype the spec implies, and
    a float buffer (scales, zeros, codebooks) must be finite; a spec that names a number format must name one
    the recipe names (weights, embedding or head), since an edited group size (128 -> 130 on 576 columns)
    keeps every buffer shape. Any mismatch is a :class:`CheckpointError` naming the module or tensor.
    """
    fmts = _recipe_formats(meta)
    packed = set()
    for name, entry in meta["modules"].items():
        spec = entry["spec"]
        try:
            expected = get_codec(spec["codec"]).buffer_shapes(spec)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{META_FILE}: module {name!r} has an invalid spec ({e})") from None
        for bname, (shape, dtype) in expected.items():
            key = f"{name}.{bname}"
            t = tensors.get(key)
            if t is None:
                raise CheckpointError(f"{META_FILE} describes {name!r} but tensor '{key}' is not in {WEIGHTS_FILE}")
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise CheckpointError(
                    f"tensor '{key}' is {tuple(t.shape)} {t.dtype} but {META_FILE} implies {tuple(shape)} {dtype}: "
                    "the JSON does not match the tensors"
                )
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CheckpointError(f"tensor '{key}' holds NaN or infinite values; the checkpoint is corrupt, "
                                      f"re-create it with `lowbit quantize`")
            packed.add(key)
        fmt = spec.get("format")
        if fmts is not None and isinstance(fmt, dict) and not any(
                all(fmt.get(k) == v for k, v in f.items() if k in fmt) for f in fmts):
            raise CheckpointError(f"{META_FILE}: module {name!r} has format {fmt}, which the recipe does not name "
                                  f"({', '.join(map(str, fmts))}); the JSON has been edited or is corrupt")
    return packed


def load_checkpoint(path, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Rebuild the transformers model saved at ``path``, with its quantized modules.

    ``verify``: check every file against the manifest (size and sha256; hashed on a second thread while the
    model is built) and refuse a checkpoint without one. Whatever ``verify`` says, every quantized module's
    spec is checked against its buffers and its float buffers must be finite (:func:`check_modules`).
    """
    path = Path(path)
    meta = read_meta(path)
    pool = pending = None
    if verify:
        files = read_manifest(path)
        unlisted = [f for f in _LOADED_FILES if f not in files]
        if unlisted:
            raise CheckpointError(f"{path / MANIFEST_FILE} does not list {', '.join(unlisted)}; it is not this "
                                  f"checkpoint's manifest, re-create the checkpoint with `lowbit quantize`")
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowbit-verify")
        pending = pool.submit(_verify_files, path, files)
    try:
        model = _rebuild(path, meta)
        why = pending.result() if pending is not None else None
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    if why:
        raise CheckpointError(f"{why}; re-create the checkpoint with `lowbit quantize`")
    return model.to(device)


def _rebuild(path: Path, meta: dict) -> nn.Module:
    tensors = _read_tensors(path)
    packed = check_modules(meta, tensors)  # codec buffers keep their stored dtype; other 16-bit tensors compute in fp32
    model = _build_skeleton(path)
    for name, entry in meta["modules"].items():
        mod = build_module(name, entry)
        try:
            set_module(model, name, mod)
        except AttributeError:
            raise CheckpointError(f"{META_FILE} names module {name!r}, which the model in config.json does not have") from None
    sd = {k: (v.float() if v.dtype in (torch.float16, torch.bfloat16) and k not in packed else v)
          for k, v in tensors.items()}
    for alias, target in meta.get("aliases", {}).items():
        if target not in sd:
            raise CheckpointError(f"{META_FILE}: alias {alias!r} points at missing tensor {target!r}")
        sd[alias] = sd[target]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # tied weights are re-tied by the model itself; anything else missing is an error
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise CheckpointError(
            f"{WEIGHTS_FILE} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.eval()
    model.lowbit_summary = meta.get("summary", {})
    model.lowbit_n_params = meta.get("n_params")
    return model


def _is_tied(model: nn.Module, key: str) -> bool:
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    return key.endswith("weight") and out is not None and getattr(out, "weight", None) is getattr(inp, "weight", 0)
