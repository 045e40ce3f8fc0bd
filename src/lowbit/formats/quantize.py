"""Whole-weight quantization with a format: grouping, optional clipping search."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Format, group_layout

__all__ = ["QuantizedWeight", "quantize_rtn", "fit_groups", "DEFAULT_CLIP_GRID"]

#: shrink ratios tried by the clipping search (1.0 = no clipping)
DEFAULT_CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(10))


@dataclass
class QuantizedWeight:
    """A quantized ``(out, in)`` weight: codes plus per-group parameters.

    codes: int64 ``(out, in)`` in ``[0, 2**bits)``.
    params: name -> float tensor ``(out, n_groups)``.
    """

    fmt: Format
    codes: torch.Tensor
    params: dict[str, torch.Tensor]

    def dequantize(self) -> torch.Tensor:
        lay = group_layout(self.codes.shape[1], self.fmt.group_size)
        cg = lay.to_groups(self.codes)  # (out, G, gs)
        p = {k: v.unsqueeze(-1) for k, v in self.params.items()}  # (out, G, 1)
        return lay.from_groups(self.fmt.dequantize(cg, p))


def fit_groups(fmt: Format, wg: torch.Tensor, mask: torch.Tensor, clip_grid=None) -> dict[str, torch.Tensor]:
    """Fit ``fmt`` on grouped weights ``wg`` ``(rows, G, gs)``; params ``(rows, G, 1)``.

    With ``clip_grid``, each group also tries ranges shrunk by each ratio
    (the format is fitted on ``ratio * w``) and keeps the one with the lowest
    squared error on its real entries. Groups fitted together (``fmt.fit_span``,
    a K-quant's super-block) choose together, by their summed error.
    """
    params = fmt.fit(wg, mask)
    if not clip_grid:
        return params
    m = mask.to(wg.dtype)
    span = fmt.fit_span

    def group_err(p):
        err = (((fmt.qdq(wg, p) - wg) ** 2) * m).sum(-1, keepdim=True)      # (rows, G, 1)
        if span == 1:
            return err
        rows, n_groups, _ = err.shape
        return err.view(rows, n_groups // span, span).sum(-1, keepdim=True).expand(-1, -1, span).reshape(err.shape)

    best_err = group_err(params)
    for r in clip_grid:
        if r >= 1.0:
            continue
        cand = fmt.fit(wg * r, mask)
        err = group_err(cand)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        params = {k: torch.where(better, cand[k], params[k]) for k in params}
    return params


def quantize_rtn(weight: torch.Tensor, fmt: Format, clip_grid=None) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight`` ``(out, in)`` with ``fmt`` (its format for this weight,
    :meth:`Format.for_weight`: the fallback for the width, per-tensor parameters bound)."""
    w = weight.detach().float()
    fmt = fmt.for_weight(w)
    lay = group_layout(w.shape[1], fmt.group_size)
    wg = lay.to_groups(w)  # (out, G, gs)
    params = fit_groups(fmt, wg, lay.mask(w.device), clip_grid)
    codes = lay.from_groups(fmt.quantize(wg, params))
    return QuantizedWeight(fmt, codes, {k: v.squeeze(-1) for k, v in params.items()})
