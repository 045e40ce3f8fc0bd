"""Dual-grained int4 scales (DGQ: Zhang et al. 2023, arXiv 2310.04836): fine group scales stored as small
integers under one fp16 scale per output channel, so that int4 codes times their integer group scale are int8.

A weight ``W`` ``(out, in)``, groups of ``g`` columns along the input (the last one shorter when ``g`` does not
divide ``in``, as everywhere in lowbit), is stored as

    W[r, j] ~= c[r, j] * k[r, G(j)] * s[r]

- ``c``: signed int4 codes in ``[-8, 7]``;
- ``k``: signed integer group scales in ``[K_MIN, K_MAX] = [-15, 16]``, never 0 (stored int8);
- ``s``: the fp16 channel scale.

``c * k`` then lies in ``[-128, 127]`` (``-8 * 16 = -128``, ``-8 * -15 = 120``, ``7 * 16 = 112``): an int8 weight
whose per-channel scale is ``s``, the operand the W8A8 path's int8 GEMM takes as it is.

Fitting, in two phases as in the paper (its phase 2 searches the channel scale once the group scales are fixed):

1. fine: each group's signed scale ``S'[r, g]`` by lowbit's symmetric int rule (``IntFormat(4, g, sym=True)``: the
   group's peak lands exactly on level -8), optionally with the clip grid (each group tries its range shrunk);
2. coarse: per row, ``s = a * max_g |S'| / 16`` for each ``a`` of ``alphas``, and each group's ``|k|`` rounded
   down or up from ``|S'| / s`` (at least 1, at most 15 or 16 by sign), whichever gives the group the lower
   importance-weighted RTN error; the row keeps the ``a`` with the lowest total error.

The paper fits asymmetric uint4 codes with zero points (and an integer group scale bounded so the product stays
int8); this module keeps lowbit's symmetric signed codes, whose sign rule gives the peak the extra level.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import group_layout
from .integer import IntFormat
from .quantize import fit_groups

__all__ = ["DualGrained", "K_MAX", "K_MIN", "QMAX", "QMIN", "SCALE_SEARCH_ALPHAS", "dual_grained_rtn",
           "fit_dual_grained", "group_index"]

#: int4 code range
QMIN, QMAX = -8, 7
#: integer group scale range: ``c * k`` stays in int8 for every code ``c``
K_MIN, K_MAX = -15, 16
#: the channel-scale candidates of the phase-2 search, as fractions of ``max_g |S'| / K_MAX``
SCALE_SEARCH_ALPHAS = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))


@dataclass
class DualGrained:
    """A dual-grained int4 weight ``(out, in)``: ``codes`` int8 ``(out, in)`` in ``[-8, 7]``, ``group_int`` int8
    ``(out, G)`` in ``[-15, 16] \\ {0}``, ``channel_scale`` float32 ``(out,)`` holding fp16-representable values."""

    codes: torch.Tensor
    group_int: torch.Tensor
    channel_scale: torch.Tensor
    group_size: int

    def group_scale(self) -> torch.Tensor:
        """The effective float32 group scales ``s[r] * k[r, g]`` ``(out, G)`` (exact: an fp16 value times a small
        integer)."""
        return self.channel_scale[:, None] * self.group_int.float()

    def int8_weight(self) -> torch.Tensor:
        """``c * k`` per column, int8 ``(out, in)``: the integer GEMM's weight."""
        idx = group_index(self.codes.shape[1], self.group_size, self.group_int.shape[1], self.codes.device)
        return (self.codes.to(torch.int16) * self.group_int.to(torch.int16)[:, idx]).to(torch.int8)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``c * k * s`` ``(out, in)``."""
        return self.int8_weight().float() * self.channel_scale[:, None]


def group_index(cols: int, group_size: int, n_groups: int, device=None) -> torch.Tensor:
    """The group (of ``n_groups`` groups of ``group_size`` columns) of each of ``cols`` columns, long ``(cols,)``;
    columns past the last group (the zero padding of an int8 operand) read the last."""
    return (torch.arange(cols, device=device) // group_size).clamp_max(n_groups - 1)


def _rtn_codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(w / scale).clamp_(QMIN, QMAX)


def _int_candidates(ratio: torch.Tensor, sign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``|S'| / s`` rounded down and up, at least 1 and within the range of the group scale's sign, signed."""
    hi = torch.where(sign < 0, torch.full_like(ratio, -K_MIN), torch.full_like(ratio, K_MAX))
    lo_k = torch.minimum(ratio.floor().clamp_min(1), hi)
    up_k = torch.minimum(ratio.ceil().clamp_min(1), hi)
    return lo_k * sign, up_k * sign


@torch.no_grad()
def fit_dual_grained(weight: torch.Tensor, group_size: int, importance: torch.Tensor | None = None,
                     alphas: tuple[float, ...] = (1.0,), clip_grid=None) -> DualGrained:
    """Dual-grained scales of ``weight`` ``(out, in)`` and its RTN codes (module doc).

    ``importance`` ``(in,)``: per-column weight of the squared error the searches minimise (e.g. diag of the input
    Hessian; None = 1). ``alphas``: the phase-2 channel-scale candidates (``(1.0,)``: none searched, but each
    group still picks ``|k|`` rounded down or up). ``clip_grid``: phase 1's per-group shrink ratios, or None.
    """
    if group_size <= 0:
        raise ConfigError(f"dual-grained scales need a positive group size, got {group_size}")
    w = weight.detach().float()
    rows, cols = w.shape
    lay = group_layout(cols, group_size)
    fine = fit_groups(IntFormat(4, group_size, sym=True), lay.to_groups(w), lay.mask(w.device), clip_grid)
    fine = fine["scale"][..., 0]                                             # (out, G), signed, fp16 values
    sign = torch.where(fine < 0, -1.0, 1.0)
    imp = torch.ones(cols, device=w.device) if importance is None else importance.detach().float().to(w.device)
    wg = lay.to_groups(w)                                                    # (out, G, g), tail edge-padded
    impg = lay.to_groups(imp[None, :]) * lay.mask(w.device)                  # (1, G, g), padding weighs 0
    peak = fine.abs().amax(dim=1)                                            # (out,)

    def group_err(k: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        eff = (s[:, None] * k)[..., None]                                    # (out, G, 1)
        return ((_rtn_codes(wg, eff) * eff - wg) ** 2 * impg).sum(-1)       # (out, G)

    best_err = torch.full((rows,), float("inf"), device=w.device)
    best_k = torch.ones_like(fine)
    best_s = torch.ones(rows, device=w.device)
    for a in alphas:
        s = (a * peak / K_MAX).clamp_min(2.0 ** -24).to(torch.float16).float().clamp_min(2.0 ** -24)
        k_lo, k_up = _int_candidates(fine.abs() / s[:, None], sign)
        e_lo, e_up = group_err(k_lo, s), group_err(k_up, s)
        k = torch.where(e_up < e_lo, k_up, k_lo)
        err = torch.minimum(e_lo, e_up).sum(1)                               # (out,)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_k = torch.where(better[:, None], k, best_k)
        best_s = torch.where(better, s, best_s)
    dg = DualGrained(torch.zeros(rows, cols, dtype=torch.int8, device=w.device), best_k.to(torch.int8), best_s,
                     group_size)
    dg.codes = dual_grained_rtn(w, dg)
    return dg


def dual_grained_rtn(weight: torch.Tensor, dg: DualGrained) -> torch.Tensor:
    """Round-to-nearest int4 codes of ``weight`` ``(out, in)`` under ``dg``'s scales, int8 ``(out, in)``."""
    idx = group_index(weight.shape[1], dg.group_size, dg.group_int.shape[1], weight.device)
    return _rtn_codes(weight.detach().float(), dg.group_scale()[:, idx]).to(torch.int8)
