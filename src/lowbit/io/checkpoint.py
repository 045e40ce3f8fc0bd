"""Self-describing checkpoints: safetensors + ``lowbit.json``; never pickle.

Layout of a checkpoint folder::

    config.json, tokenizer files     the base model's (transformers) config
    model.safetensors                every stored tensor (packed codes, fp16 scales, 16-bit rest)
    lowbit.json                      format version, recipe, one spec per quantized module

Writes go to a temp folder that is renamed into place, so an interrupted
save never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .._version import __version__
from ..errors import CheckpointError
from ..models.arch import set_module
from ..nn.codecs import get_codec
from ..nn.registry import build_module, module_entries
from ..utils import atomic_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "lowbit.json"
WEIGHTS_FILE = "model.safetensors"

__all__ = ["save_checkpoint", "load_checkpoint", "is_checkpoint", "read_meta", "check_out_path", "FORMAT_VERSION"]


def is_checkpoint(path) -> bool:
    return (Path(path) / META_FILE).is_file()


def check_out_path(path) -> Path:
    """``path`` if a checkpoint may be saved there, else :class:`CheckpointError`.

    A save replaces the whole folder, so it may go only where nothing would be lost: a path that does not
    exist yet, an empty folder, or an earlier lowbit checkpoint (which is replaced).
    """
    path = Path(path)
    if not path.exists():
        return path
    if not path.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {path}: it is an existing file and a checkpoint is a "
                              f"folder; choose a new folder name")
    if not is_checkpoint(path) and any(path.iterdir()):
        raise CheckpointError(f"cannot save a checkpoint to {path}: the folder holds other files and no {META_FILE}, "
                              f"and saving replaces the whole folder; choose a new or empty folder")
    return path


def save_checkpoint(model: nn.Module, path, tokenizer=None, extra: dict | None = None) -> Path:
    """Save a (quantized) model to folder ``path`` atomically; returns the path.

    ``path`` must be new, empty or an earlier checkpoint (:func:`check_out_path`), never a folder of other files.
    """
    path = check_out_path(path)
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
    with atomic_dir(path) as tmp:
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
    return path


def read_meta(path) -> dict:
    path = Path(path)
    f = path / META_FILE
    if not path.exists():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    if not f.is_file():
        raise CheckpointError(f"{path} is not a lowbit checkpoint: {META_FILE} is missing (save one with `lowbit quantize ... --out DIR`)")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint is corrupt, re-create it with `lowbit quantize`") from None
    v = meta.get("format_version")
    if v != FORMAT_VERSION:
        raise CheckpointError(f"{f} has format_version {v!r}; this lowbit reads version {FORMAT_VERSION}")
    if not isinstance(meta.get("modules"), dict):
        raise CheckpointError(f"{f} has no 'modules' table; the checkpoint is corrupt")
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


def load_checkpoint(path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the transformers model saved at ``path``, with its quantized modules."""
    path = Path(path)
    meta = read_meta(path)
    tensors = _read_tensors(path)
    model = _build_skeleton(path)
    packed = set()   # every codec buffer keeps its stored dtype; other 16-bit tensors compute in float32
    for name, entry in meta["modules"].items():
        spec = entry["spec"]
        try:
            expected = get_codec(spec["codec"]).buffer_shapes(spec)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{META_FILE}: module {name!r} has an invalid spec ({e})") from None
        for bname, (shape, dtype) in expected.items():
            t = tensors.get(f"{name}.{bname}")
            if t is None:
                raise CheckpointError(f"{META_FILE} describes {name!r} but tensor '{name}.{bname}' is not in {WEIGHTS_FILE}")
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise CheckpointError(
                    f"tensor '{name}.{bname}' is {tuple(t.shape)} {t.dtype} but {META_FILE} implies {tuple(shape)} {dtype}: "
                    "the JSON does not match the tensors"
                )
            packed.add(f"{name}.{bname}")
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
    return model.to(device)


def _is_tied(model: nn.Module, key: str) -> bool:
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    return key.endswith("weight") and out is not None and getattr(out, "weight", None) is getattr(inp, "weight", 0)
