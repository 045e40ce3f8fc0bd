"""Calibration sampling: N seeded windows of L tokens from a text source."""
from __future__ import annotations

import torch

from ..errors import DataError
from .texts import load_text

__all__ = ["sample_windows"]


def sample_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int,
                   bos_id: int | None = None) -> torch.Tensor:
    """``(nsamples, seqlen)`` token windows at seeded random offsets of ``source``.

    The whole text is tokenized once without special tokens; each window
    starts at a uniformly drawn offset (``torch.Generator`` seeded with
    ``seed``). With ``bos_id`` each window is BOS + ``seqlen - 1`` tokens.
    """
    if nsamples <= 0 or seqlen <= 1:
        raise DataError(f"calibration needs nsamples >= 1 and seqlen >= 2, got {nsamples} x {seqlen}")
    ids = torch.tensor(tokenizer(load_text(source), add_special_tokens=False)["input_ids"], dtype=torch.long)
    body = seqlen - 1 if bos_id is not None else seqlen
    if ids.numel() <= body:
        raise DataError(f"calibration text {source!r} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body, (nsamples,), generator=g)
    w = torch.stack([ids[s : s + body] for s in starts.tolist()])
    if bos_id is not None:
        w = torch.cat([torch.full((nsamples, 1), bos_id, dtype=torch.long), w], dim=1)
    return w
