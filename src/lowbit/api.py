"""The public API: load, quantize, save, evaluate."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .eval.ppl import PROTOCOL_VERSION, PPLProtocol, make_windows, perplexity
from .io import is_checkpoint, load_checkpoint, save_checkpoint
from .nn.bpw import count_params
from .quantize import QuantRecipe, quantize_model

log = logging.getLogger(__name__)

__all__ = ["load_model", "load", "save", "quantize", "evaluate_ppl", "ppl_windows"]


def load_model(name_or_path: str, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from a lowbit checkpoint, a zoo name, an HF folder, a GGUF file or a hub id."""
    from transformers import AutoTokenizer

    if is_checkpoint(name_or_path):
        model = load_checkpoint(name_or_path, device)
        tok = AutoTokenizer.from_pretrained(name_or_path)
        return model, tok
    from .models.loading import load_model as load_float

    model, tok = load_float(name_or_path)
    model.lowbit_n_params = count_params(model)
    return model.to(device), tok


def load(path, device: str | torch.device = "cpu"):
    """Rebuild a saved lowbit checkpoint as a transformers model (``generate`` works)."""
    return load_checkpoint(path, device)


def save(model, path, tokenizer=None, **extra) -> Path:
    """Save atomically as safetensors + ``lowbit.json``."""
    return save_checkpoint(model, path, tokenizer, extra)


def quantize(model, recipe: QuantRecipe | None = None, calib_ids: torch.Tensor | None = None, progress: bool = True,
             resume_dir=None, device=None) -> dict:
    """Quantize ``model`` in place with ``recipe`` (default: RTN int4 g128).

    Calibrated methods need ``calib_ids`` (see :func:`lowbit.data.calib.sample_windows`).
    """
    if getattr(model, "lowbit_n_params", None) is None:
        model.lowbit_n_params = count_params(model)
    return quantize_model(model, recipe or QuantRecipe(), calib_ids, progress, resume_dir, device)


def ppl_windows(tokenizer, model, protocol: PPLProtocol) -> torch.Tensor:
    """Token windows for ``protocol`` (BOS handling from the model's architecture row)."""
    from .data.texts import load_text

    text = load_text(protocol.corpus)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    bos = tokenizer.bos_token_id if protocol.bos else None
    if protocol.bos and bos is None:
        from .errors import DataError

        raise DataError("the protocol asks for BOS but the tokenizer has no bos_token_id")
    return make_windows(ids, protocol.seqlen, protocol.windows, bos)


def evaluate_ppl(model, tokenizer, corpus: str = "wiki", seqlen: int = 512, windows: int | None = 40,
                 progress: bool = True) -> tuple[float, dict]:
    """``(ppl, protocol)`` for ``model`` on ``corpus``; BOS per the model's architecture."""
    from .data.texts import JOIN_RULE
    from .models.arch import arch_for, check_seqlen

    arch = arch_for(model)
    proto = PPLProtocol(corpus, seqlen, windows, arch.bos_per_window)
    check_seqlen(model, seqlen)
    ids = ppl_windows(tokenizer, model, proto)
    ppl = perplexity(model, ids, progress=progress, desc=f"ppl {corpus}")
    d = proto.to_dict()
    d.update(version=PROTOCOL_VERSION, n_windows=int(ids.shape[0]),
             tokens_scored=int(ids.shape[0] * (ids.shape[1] - 1)), tokenizer=getattr(tokenizer, "name_or_path", None), join_rule=JOIN_RULE,
             add_special_tokens=False, window_rule="non-overlapping, from the start of the text")
    return ppl, d
