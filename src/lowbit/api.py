"""The public API: load, quantize, save, evaluate, and a whole run (quantize, evaluate, record)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import EvalConfig
from .eval.ppl import evaluate_ppl, ppl_windows
from .eval.record import evaluate_record
from .io import is_checkpoint, load_checkpoint, save_checkpoint
from .nn.bpw import count_params
from .quantize import QuantRecipe, quantize_model

log = logging.getLogger(__name__)

__all__ = ["load_model", "load", "save", "quantize", "evaluate_ppl", "ppl_windows", "calibration_windows",
           "check_inputs", "quantize_named", "evaluate", "run", "export"]


def load_model(name_or_path: str, device: str | torch.device = "cpu", verify: bool = True):
    """``(model, tokenizer)`` from a lowbit checkpoint, a zoo name, an HF folder, a GGUF file or a hub id.

    ``verify=False`` skips a checkpoint's sha256 check against its manifest (:func:`lowbit.io.load_checkpoint`)."""
    from transformers import AutoTokenizer

    if is_checkpoint(name_or_path):
        model = load_checkpoint(name_or_path, device, verify=verify)
        tok = AutoTokenizer.from_pretrained(name_or_path)
        return model, tok
    from .models.loading import load_model as load_float

    model, tok = load_float(name_or_path)
    model.lowbit_n_params = count_params(model)
    return model.to(device), tok


def load(path, device: str | torch.device = "cpu", verify: bool = True):
    """Rebuild a saved lowbit checkpoint as a transformers model (``generate`` works); ``verify``: check its
    files' sha256 against the manifest first."""
    return load_checkpoint(path, device, verify=verify)


def save(model, path, tokenizer=None, **extra) -> Path:
    """Save atomically as safetensors + ``lowbit.json`` + a manifest of every file's sha256."""
    return save_checkpoint(model, path, tokenizer, extra)


def quantize(model, recipe: QuantRecipe | None = None, calib_ids: torch.Tensor | None = None, progress: bool = True,
             resume_dir=None, device=None, profile=None) -> dict:
    """Quantize ``model`` in place with ``recipe`` (default: RTN int4 g128).

    Calibrated methods need ``calib_ids`` (see :func:`lowbit.data.calib.sample_windows`). ``profile``: a
    :class:`lowbit.calib.profile.Profile` to record seconds and FLOPs per block and stage in.
    """
    if getattr(model, "lowbit_n_params", None) is None:
        model.lowbit_n_params = count_params(model)
    return quantize_model(model, recipe or QuantRecipe(), calib_ids, progress, resume_dir, device, profile)




def calibration_windows(recipe: QuantRecipe, tokenizer, model) -> torch.Tensor | None:
    """The calibration windows ``recipe.calib`` asks for (BOS per the model's architecture row); None without."""
    if recipe.calib is None:
        return None
    from .data.calib import sample_windows
    from .models.arch import arch_for, check_seqlen

    c = recipe.calib
    check_seqlen(model, c["seqlen"], "--calib-seqlen")
    bos = tokenizer.bos_token_id if arch_for(model).bos_per_window else None
    return sample_windows(tokenizer, c["source"], c["nsamples"], c["seqlen"], c["seed"], bos_id=bos)


def check_inputs(ev: EvalConfig | None = None, recipe: QuantRecipe | None = None, out=None,
                 texts: tuple[str, ...] = (), model=None) -> None:
    """Fail on a bad text source or output path now, not after minutes of loading and quantizing.

    ``out`` must be a place a checkpoint may go, writable, with free space for the checkpoint ``recipe`` makes of
    ``model`` when its files are here to count (:func:`lowbit.quantize.estimate_output_bytes`).
    """
    from .data.texts import check_text_source
    from .io import check_out_path
    from .models.loading import local_weights_summary
    from .quantize import estimate_output_bytes
    from .utils import check_writable

    refs = [*(ev.ppl if ev else ()), *(texts or ())]
    if recipe is not None and recipe.calib:
        refs.append(recipe.calib["source"])
    for ref in refs:
        check_text_source(ref)
    if out:
        check_out_path(out)
        known = local_weights_summary(model) if model is not None and recipe is not None else None
        need, how = estimate_output_bytes(recipe, *known) if known else (0, "")
        check_writable(Path(out).parent, f"--out {out}", need, how)


def quantize_named(name: str, recipe: QuantRecipe, *, device="auto", out=None, resume: bool = False,
                   ev: EvalConfig | None = None, progress: bool = True, profile=None):
    """Load ``name`` (zoo name, HF folder, GGUF file or hub id), quantize it with ``recipe`` and, with ``out``,
    save the checkpoint there; returns ``(model, tokenizer, summary)``.

    Inputs are checked before the model loads (``ev``: the evaluation that follows, so its corpora and window
    length are checked too). With ``out``, finished blocks are checkpointed in ``OUT.resume/`` and ``resume``
    continues from them; the folder is removed once the checkpoint is saved. ``profile``: a path; the seconds and
    FLOPs of every block and stage are written there (JSON) and beside it as a markdown table (``.md``).
    """
    from .calib.engine import clear_resume_dir
    from .models.arch import check_seqlen
    from .utils import resolve_device

    check_inputs(ev, recipe, out, model=name)
    device = resolve_device(device)
    model, tok = load_model(name)  # stays on the CPU: the engine moves one block at a time to `device`
    if ev is not None and ev.ppl:
        check_seqlen(model, ev.seqlen, "--seqlen")
    resume_dir = Path(str(out).rstrip("/") + ".resume") if out else None
    if resume_dir is not None and not resume:
        clear_resume_dir(resume_dir)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prof = None
    if profile is not None:
        from .calib.profile import Profile

        prof = Profile()
    summary = quantize(model, recipe, calibration_windows(recipe, tok, model), progress=progress,
                       resume_dir=resume_dir, device=device, profile=prof)
    if prof is not None:
        prof.write(profile)
    if out:
        save(model, out, tok, source_model=name)
        clear_resume_dir(resume_dir)
    return model, tok, summary


def evaluate(name: str, ev: EvalConfig, *, model_name: str | None = None, device="auto",
             progress: bool = True, verify: bool = True) -> dict:
    """The results record of ``name`` (a lowbit checkpoint, or a float model: method ``fp32``) evaluated as
    ``ev`` asks; nothing is written (:func:`lowbit.eval.record.write_result`)."""
    from .io import read_meta
    from .models.arch import check_seqlen

    check_inputs(ev)
    model, tok = load_model(name, verify=verify)
    if ev.ppl:
        check_seqlen(model, ev.seqlen, "--seqlen")
    if is_checkpoint(name):
        meta = read_meta(name)
        summary = meta.get("summary", {})
        recipe = summary.get("recipe", {})
        method = recipe.get("method", "unknown")
        tag = QuantRecipe.from_dict(recipe).tag() if recipe else ""
        model_name = model_name or Path(str(meta.get("source_model", name))).name
    else:
        method, tag, recipe, summary = "fp32", "", {"storage": {"dtype": "float32"}}, {"quant_time_s": 0.0}
    return evaluate_record(model, tok, ev, model_name=model_name or Path(str(name)).name, method=method, tag=tag,
                           config=recipe, summary=summary, device=device, progress=progress)


def run(name: str, recipe: QuantRecipe | None, ev: EvalConfig, *, model_name: str | None = None,
        device="auto", out=None, resume: bool = False, progress: bool = True, verify: bool = True,
        profile=None) -> dict:
    """Quantize ``name`` with ``recipe`` in memory (None: the float reference, method ``fp32``), evaluate it as
    ``ev`` asks and return the results record (``lowbit run``; nothing is written but ``out``'s checkpoint and
    ``profile``'s tables, see :func:`quantize_named`)."""
    if recipe is None:
        return evaluate(name, ev, model_name=model_name or Path(str(name)).name, device=device, progress=progress,
                        verify=verify)
    model, tok, summary = quantize_named(name, recipe, device=device, out=out, resume=resume, ev=ev,
                                         progress=progress, profile=profile)
    return evaluate_record(model, tok, ev, model_name=model_name or Path(str(name)).name, method=recipe.method,
                           tag=recipe.tag(), config=recipe.to_dict(), summary=summary, device=device,
                           progress=progress)


def export(ckpt_path, to: str, out, verify: bool = True, **options) -> Path:
    """Write the checkpoint at ``ckpt_path`` in a serving engine's format: ``to`` is ``compressed-tensors``,
    ``gptq``, ``gguf`` or ``f16`` (a plain float16 folder). Exact or refused; see docs/export.md."""
    from .export import export as export_checkpoint

    return export_checkpoint(ckpt_path, to, out, verify=verify, **options)
