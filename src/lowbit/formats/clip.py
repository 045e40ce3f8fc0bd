"""Output-aware clipping search, shared by AWQ (symmetric) and BitDistiller's clipping init (asymmetric).

Per (row, group) of a weight, the range is shrunk over a grid, the weight clamped to ``[lo, hi]`` and
rounded with the format (fitted on the clamped group, as :func:`lowbit.formats.quantize_rtn` does); the
candidate with the lowest error of the group's contribution to the layer output on calibration tokens,
``mean_t ((x_t,g . (Q(w_g) - w_g))^2)``, wins (the first on ties). It runs through the format library,
so it works for every format. The grids:

- asymmetric (BitDistiller's ``auto_2clip_layer``): max and min shrunk independently, ``max * (1 - i/n_grid)``
  and ``min * (1 - j/n_grid)`` for ``i, j < max_shrink * n_grid`` (10 x 10 pairs with 20 / 0.5). With a
  symmetric format only the larger shrunk end sets the scale: the search is still valid, mostly 1-D.
- symmetric (AWQ's ``auto_clip``): ``[-m, m]``, ``m = absmax * (1 - max_shrink * i/n_grid)``, ``i < n_grid``.
"""
from __future__ import annotations

import torch

from .base import Format, group_layout

__all__ = ["clip_search", "apply_clip"]


@torch.no_grad()
def clip_search(w: torch.Tensor, x: torch.Tensor, fmt: Format, n_grid: int = 20, max_shrink: float = 0.5,
                sym: bool = False, row_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Best per-group clip bounds ``(lo, hi)``, each ``(out, n_groups, 1)``, for ``w`` ``(out, in)`` on tokens ``x`` ``(T, in)``.

    ``sym``: AWQ's symmetric grid (module doc). It also keeps the order in which AWQ's search has always
    summed the token errors: the mean is the same up to rounding, and the other order could settle a
    near-tie differently.
    """
    if sym:
        ratios = [(r, r) for r in (1 - max_shrink * i / n_grid for i in range(n_grid))]
    else:
        steps = range(max(1, int(max_shrink * n_grid)))
        ratios = [(1 - j / n_grid, 1 - i / n_grid) for i in steps for j in steps]   # (lo, hi) ratios, max outer
    w = w.detach().float()
    x = x.detach().float().to(w.device)
    rows, cols = w.shape
    fmt = fmt.for_weight(w)
    lay = group_layout(cols, fmt.group_size)
    mask = lay.mask(w.device)                                  # (G, gs)
    xg = (lay.to_groups(x) * mask.to(x.dtype)).permute(1, 0, 2).contiguous()  # (G, T, gs), padding zeroed
    los, his = [], []
    for r0 in range(0, rows, row_chunk):
        wg = lay.to_groups(w[r0 : r0 + row_chunk])             # (r, G, gs)
        org_hi = wg.abs().amax(-1, keepdim=True) if sym else wg.amax(-1, keepdim=True)  # (r, G, 1)
        org_lo = -org_hi if sym else wg.amin(-1, keepdim=True)
        best_err = torch.full_like(org_hi, float("inf"))
        best_lo, best_hi = org_lo.clone(), org_hi.clone()
        for rl, rh in ratios:
            lo, hi = org_lo * rl, org_hi * rh
            wc = torch.minimum(torch.maximum(wg, lo), hi)
            q = fmt.qdq(wc, fmt.fit(wc, mask))
            d = (q - wg) * mask                                # (r, G, gs)
            e = torch.bmm(xg, d.permute(1, 2, 0)).pow(2)       # (G, T, r)
            err = (e.permute(1, 2, 0).mean(0) if sym else e.mean(1).T).unsqueeze(-1)  # (r, G, 1)
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
