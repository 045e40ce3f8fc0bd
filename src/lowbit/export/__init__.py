"""Export a lowbit checkpoint to the formats serving engines load: one module per target.

A target is a module ``lowbit/export/<module>.py`` named in :data:`TARGETS` and imported only when asked
for, so a target whose module is absent is reported as not available instead of failing at import. It
provides::

    OUTPUT = "folder"                          # or "file" (one file, e.g. a .gguf)
    def export(model, meta, out, **options)    # write the export to `out`

``model`` is the checkpoint rebuilt by :func:`lowbit.io.load_checkpoint` (a transformers model with
quantized modules), ``meta`` its ``lowbit.json`` plus ``checkpoint`` (the folder, where the tokenizer files
are), ``out`` a temp folder (or temp file path) that becomes ``--out`` only when ``export`` returns, so an
interrupted or refused export leaves nothing at ``--out``. Options are keyword arguments of the target's
``export``; one it does not take is refused by name. A target maps each layer exactly or raises
:class:`~lowbit.errors.ExportError` naming the tensor and the formats that do map (docs/export.md).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
from pathlib import Path

from ..errors import ExportError

log = logging.getLogger(__name__)

__all__ = ["TARGETS", "export", "get_target", "target_names"]

#: target name -> module in this package
TARGETS = {
    "compressed-tensors": "compressed_tensors",   # vLLM, transformers (pack-quantized, int-quantized W8A8)
    "gptq": "gptq",                               # transformers + gptqmodel, vLLM (qweight/qzeros/scales/g_idx)
    "gguf": "gguf",                               # llama.cpp
    "vptq": "vptq",                               # the vptq package, transformers' vptq quantizer (VQuantLinear)
    "f16": "dequantized",                         # a plain float16 HF folder, from any checkpoint
}


def target_names() -> list[str]:
    return list(TARGETS)


def get_target(name: str):
    """The module of target ``name``; :class:`ExportError` for an unknown name or a target not in this install."""
    if name not in TARGETS:
        raise ExportError(f"unknown export target {name!r}; known: {', '.join(TARGETS)}")
    module = f"{__name__}.{TARGETS[name]}"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        from .._version import __version__

        available = [t for t in TARGETS if importlib.util.find_spec(f"{__name__}.{TARGETS[t]}") is not None]
        raise ExportError(f"export to {name} is not available in this lowbit ({__version__}); available: "
                          f"{', '.join(available)}") from None


def check_options(name: str, target, options: dict) -> None:
    """Refuse an option the target's ``export`` does not take, naming the ones it does."""
    params = inspect.signature(target.export).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    takes = list(params)[3:]  # after model, meta, out
    bad = sorted(set(options) - set(takes))
    if bad:
        flags = ", ".join("--" + k.replace("_", "-") for k in bad)
        known = ", ".join("--" + k.replace("_", "-") for k in takes) or "none"
        raise ExportError(f"export to {name} takes no {flags} (its options: {known})")


def check_export_out(out, output: str) -> Path:
    """``out`` if the export may be written there: a new path or an empty folder (a folder target), a path that
    is not a folder (a file target); otherwise :class:`ExportError` before anything is loaded."""
    out = Path(out)
    if output == "file":
        if out.is_dir():
            raise ExportError(f"--out {out} is a folder; this target writes one file, e.g. {out / 'model.gguf'}")
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder; an export writes a whole folder, so "
                          f"choose a new or empty one")
    return out


def _export_size(ckpt_path, to: str, meta: dict) -> tuple[int, str]:
    """``(bytes, how)``: about what an export writes, for a free-space check before the checkpoint loads: every
    parameter at 16 bits for ``f16``, else the checkpoint's weights plus 25% (regrouped scales, F16 fallbacks)."""
    from ..io.checkpoint import WEIGHTS_FILE

    if to == "f16":
        n = meta.get("n_params") or 0
        return 2 * n, f"{n / 1e6:.1f}M parameters at float16"
    f = Path(ckpt_path) / WEIGHTS_FILE
    return (int(f.stat().st_size * 1.25), "the checkpoint's weights plus 25%") if f.is_file() else (0, "")


def export(ckpt_path, to: str, out, verify: bool = True, **options) -> Path:
    """Write the lowbit checkpoint at ``ckpt_path`` as target ``to`` (see :data:`TARGETS`) to ``out``.

    ``options`` go to the target (``regroup`` for compressed-tensors, ``checkpoint_format`` for gptq).
    ``verify``: check the checkpoint's files against its manifest (:func:`lowbit.io.load_checkpoint`).
    Returns ``out``. Nothing is written when the target refuses a layer. An ``out`` that cannot be written, or
    whose disk lacks the space, fails before the checkpoint loads.
    """
    from ..io import load_checkpoint, read_meta
    from ..utils import atomic_dir, atomic_file, check_writable

    target = get_target(to)
    check_options(to, target, options)
    output = getattr(target, "OUTPUT", "folder")
    out = check_export_out(out, output)
    meta = {**read_meta(ckpt_path), "checkpoint": str(ckpt_path)}
    check_writable(out.parent, f"--out {out}", *_export_size(ckpt_path, to, meta))
    model = load_checkpoint(ckpt_path, verify=verify)
    with (atomic_dir(out) if output == "folder" else atomic_file(out)) as tmp:
        target.export(model, meta, tmp, **options)
    log.info("exported %s to %s (%s)", ckpt_path, out, to)
    return out
