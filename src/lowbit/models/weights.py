"""Strict weight loading: every parameter of a model comes from its files, or a CheckpointError names the ones that
do not.

transformers fills a weight that is missing from the files, or whose shape differs, with random values and only
logs a report; a model loaded that way quantizes and evaluates without any error, to nonsense. lowbit asks for the
loading report (``output_loading_info``) and refuses the model instead. It also never opens a pickle
(``pytorch_model.bin``): unpickling can run code, so only safetensors (and GGUF) weights are read.
"""
from __future__ import annotations

from pathlib import Path

from lowbit.errors import CheckpointError

__all__ = ["check_loading_info", "from_pretrained_strict", "refuse_pickle_only"]

#: weight files written with pickle (torch.save), which lowbit never opens
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _first(keys: list[str], n: int = 3) -> str:
    more = f", and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def refuse_pickle_only(folder: Path) -> None:
    """CheckpointError when ``folder`` holds pickled weights and no safetensors file."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} holds its weights only as pickle ({_first(pickles)}); lowbit never unpickles a file, since "
            f"loading a pickle can run code. Convert it once, where you trust the file, e.g. `python -c \"from "
            f"transformers import AutoModelForCausalLM as M; M.from_pretrained('{folder}')"
            f".save_pretrained('{folder}-safetensors')\"`, and pass the new folder"
        )


def check_loading_info(info: dict, source) -> None:
    """Refuse a model whose loading report (transformers' ``output_loading_info``) lists a missing, unexpected or
    mis-shaped weight or a loading error; the message names the first few of each. Weights tied to another one
    (an LM head tied to the embedding) are not reported as missing by transformers, so they pass."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())
    errors = list(info.get("error_msgs") or ())
    problems = []
    if missing:
        problems.append(f"{len(missing)} weight(s) missing from the files ({_first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the files that the model does not have ({_first(unexpected)})")
    if mismatched:
        shapes = [f"{k}: {tuple(a)} in the files, {tuple(b)} in the model" for k, a, b in mismatched]
        problems.append(f"{len(mismatched)} weight(s) of the wrong shape ({_first(shapes)})")
    if errors:
        problems.append(f"loading errors ({_first(errors)})")
    if not problems:
        return
    hint = (" A lowbit checkpoint whose lowbit.json was deleted looks like this (packed tensors in place of the "
            "weights): restore lowbit.json or re-create the checkpoint with `lowbit quantize`."
            if missing and unexpected else "")
    raise CheckpointError(
        f"the weights of {source} do not match its config: {'; '.join(problems)}. lowbit never fills missing or "
        f"mis-shaped weights with random values; re-download or re-convert the model.{hint}"
    )


def _unreadable_safetensors(source) -> str | None:
    """The first ``*.safetensors`` file of folder ``source`` whose header cannot be read, or None."""
    from safetensors import SafetensorError, safe_open

    folder = Path(source)
    for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError):
            return str(f)
    return None


def from_pretrained_strict(source, label=None, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(source, **kwargs)`` that fails on anything but a complete load:
    CheckpointError for a truncated or corrupt safetensors file and for every problem
    :func:`check_loading_info` finds, naming ``label`` (default: ``source``). Other errors (unknown
    architectures, unreadable paths) pass through."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True,
                                                           ignore_mismatched_sizes=True, **kwargs)
    except SafetensorError as exc:
        bad = _unreadable_safetensors(source)
        which = f"{bad} ({exc})" if bad else f"a weight file of {label or source} ({exc})"
        raise CheckpointError(f"{which} is corrupt, truncated or not a safetensors file; copy or "
                              f"download it again") from None
    check_loading_info(info, label or source)
    return model
