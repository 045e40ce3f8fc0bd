"""Asymmetric clipping search (BitDistiller's clipping initialisation).

For each (row, group) of a weight, the group's max and min are shrunk
*independently* over a grid — ``max * (1 - i/n_grid)`` and
``min * (1 - j/n_grid)`` for ``i, j < max_shrink * n_grid`` (10 x 10 pairs
with the defaults n_grid=20, max_shrink=0.5) — the weight is clamped to
``[min', max']`` and rounded with the format (parameters fitted on the
clamped group, exactly as :func:`lowbit.formats.quantize_rtn` does), and the
pair with the lowest error of the group's contribution to the layer output
on calibration tokens, ``mean_t ((x_t,g . (Q(w_g) - w_g))^2)``, wins.

This is the layer-output criterion of BitDistiller's ``auto_2clip_layer``
(itself AWQ's clip search with the min/max decoupled), run through the
format library, so it works for every format. For symmetric formats the
fitted range is the clamped group's absmax, so only the larger of the two
shrunk ends sets the scale; the search is still valid, just mostly 1-D.
"""
from __future__ import annotations

import torch

from .base import Format, group_layout

__all__ = ["asym_clip_search", "apply_clip"]


@torch.no_grad()
def asym_clip_search(w: torch.Tensor, x: torch.Tensor, fmt: Format, n_grid: int = 20, max_shrink: float = 0.5,
                     row_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Best per-group clip bounds ``(lo, hi)``, each ``(out, n_groups, 1)``, for ``w`` ``(out, in)`` on tokens ``x`` ``(T, in)``."""
    w = w.detach().float()
    x = x.detach().float().to(w.device)
    rows, cols = w.shape
    lay = group_layout(cols, fmt.group_size)
    mask = lay.mask(w.device)                                  # (G, gs)
    xg = (lay.to_groups(x) * mask.to(x.dtype)).permute(1, 0, 2).contiguous()  # (G, T, gs), padding zeroed
    steps = max(1, int(max_shrink * n_grid))
    los, his = [], []
    for r0 in range(0, rows, row_chunk):
        wg = lay.to_groups(w[r0 : r0 + row_chunk])             # (r, G, gs)
        org_max = wg.amax(-1, keepdim=True)                    # (r, G, 1)
        org_min = wg.amin(-1, keepdim=True)
        best_err = torch.full_like(org_max, float("inf"))
        best_hi, best_lo = org_max.clone(), org_min.clone()
        for i in range(steps):
            hi = org_max * (1 - i / n_grid)
            for j in range(steps):
                lo = org_min * (1 - j / n_grid)
                wc = torch.minimum(torch.maximum(wg, lo), hi)
                q = fmt.qdq(wc, fmt.fit(wc, mask))
                d = (q - wg) * mask                            # (r, G, gs)
                err = torch.bmm(xg, d.permute(1, 2, 0)).pow(2).mean(1).T.unsqueeze(-1)  # (G, T, r) -> (r, G, 1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_hi = torch.where(better, hi, best_hi)
                best_lo = torch.where(better, lo, best_lo)
        los.append(best_lo)
        his.append(best_hi)
    return torch.cat(los), torch.cat(his)


def apply_clip(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w`` ``(out, in)`` clamped per group to ``[lo, hi]`` (each ``(out, n_groups, 1)``)."""
    lay = group_layout(w.shape[1], group_size)
    wg = lay.to_groups(w)
    return lay.from_groups(torch.minimum(torch.maximum(wg, lo.to(w.dtype)), hi.to(w.dtype)))
