"""Importance-weighted scale search: per group, candidate ranges each followed by a least-squares refit.

The idea is llama.cpp's importance-matrix quantization (``make_qx_quants``): per group, candidate steps
around the RTN step (``range / (top level + t)``), the weights rounded with each, then the scale (and the
minimum, asymmetric) refitted to those codes by weighted least squares; the candidate with the lowest weighted
error wins. :func:`range_candidates` yields the candidates (the K-quant search uses it on its sub-blocks);
:func:`search_int_scales` runs it for the ``int`` format, judging every candidate as the format stores it (fp16
scale, integer zero point) against plain RTN's parameters, so no group's weighted error exceeds RTN's.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import ConfigError
from .base import group_layout
from .integer import IntFormat
from .quantize import QuantizedWeight

__all__ = ["range_candidates", "ls_scale_min", "search_int_scales", "importance_weights"]


def ls_scale_min(x, q, om, nonneg_min: bool):
    """Weighted least squares ``x ~ s*q - mn`` per group (sums over the last dim); ``mn >= 0`` when asked,
    else ``mn = 0`` (the symmetric fit ``x ~ s*q``). Returns ``(s, mn)``, NaN-free (0 where undetermined)."""
    sw, sq, sqq = om.sum(-1), (om * q).sum(-1), (om * q * q).sum(-1)
    sx, sqx = (om * x).sum(-1), (om * q * x).sum(-1)
    only_scale = torch.where(sqq > 0, sqx / sqq.clamp_min(1e-30), torch.zeros_like(sqq))
    if not nonneg_min:
        return only_scale, torch.zeros_like(only_scale)
    det = sw * sqq - sq * sq
    ok = det > 1e-12 * (sw * sqq).clamp_min(1e-30)
    s = torch.where(ok, (sw * sqx - sx * sq) / torch.where(ok, det, torch.ones_like(det)), only_scale)
    off = torch.where(ok, (sqq * sx - sq * sqx) / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det))
    # x ~ s*q + off with off <= 0 (the min is stored as a non-negative mn = -off)
    neg = off <= 0
    return torch.where(neg, s, only_scale), torch.where(neg, -off, torch.zeros_like(off))


def range_candidates(x: torch.Tensor, om: torch.Tensor, sym: bool, q_offset: int, maxq: int,
                     n_grid: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``n_grid + 1`` refitted candidates ``(s, mn, q)`` for groups ``x`` ``(..., gs)`` weighted by ``om``.

    Symmetric (levels ``-q_offset .. q_offset - 1``): the step ``-p / (q_offset + t)``, ``p`` the group's signed
    extreme, ``t`` from -0.9 to 0.9 (``n_grid = 18``: llama.cpp's 19 steps of 0.1), so the extreme sits near the
    lowest level; ``q`` the signed levels. Asymmetric (codes ``0 .. maxq``): the step ``range / (maxq + t)``, ``t``
    from -1 to 1, the range containing 0. Each candidate: ``s`` ``(...)`` and ``mn`` ``(...)`` from
    :func:`ls_scale_min` on its codes ``q`` ``(..., gs)`` (float), ``x ~ s*q - mn``.
    """
    top = float(q_offset if sym else maxq)
    if sym:
        span = -x.gather(-1, x.abs().argmax(-1, keepdim=True))       # (..., 1) minus the signed extreme
        lo = torch.zeros_like(span)
        steps = [-0.9 + 1.8 * i / n_grid for i in range(n_grid + 1)]
    else:
        lo = x.amin(-1, keepdim=True).clamp_max(0)
        span = x.amax(-1, keepdim=True).clamp_min(0) - lo
        steps = [-1.0 + 2.0 * i / n_grid for i in range(n_grid + 1)]
    for t in steps:
        s0 = span / (top + t)                                        # (..., 1)
        s0 = torch.where(s0 == 0, torch.ones_like(s0), s0)
        if sym:
            q = torch.round(x / s0).clamp(-q_offset, q_offset - 1)
        else:
            q = torch.round((x - lo) / s0).clamp(0, maxq)
        s, mn = ls_scale_min(x, q, om, nonneg_min=not sym)
        yield s, mn, q


def importance_weights(importance: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Per-column weights ``(in,)`` for an ``(out, in)`` weight: ``importance`` normalised to mean 1 plus 1e-6 (no
    column weighs exactly 0), or ones when None."""
    if importance is None:
        return torch.ones(like.shape[1], device=like.device)
    imp = importance.detach().float().to(like.device).clamp_min(0)
    if imp.shape != (like.shape[1],):
        raise ConfigError(f"importance must have one value per input column ({like.shape[1]}), got {tuple(imp.shape)}")
    return imp / imp.mean().clamp_min(1e-30) + 1e-6


@torch.no_grad()
def search_int_scales(weight: torch.Tensor, fmt: IntFormat, importance: torch.Tensor | None = None,
                      n_grid: int = 18, iters: int = 2) -> QuantizedWeight:
    """``int`` parameters per group minimising ``sum_c importance[c] * (w - w_hat)^2``; ``weight`` ``(out, in)``.

    ``importance``: ``(in,)`` non-negative (the calibration activations' mean square per input column); None
    weighs every column alike. Per group: the :func:`range_candidates` (``n_grid + 1``), each turned into stored
    parameters (fp16 scale; asymmetric: the zero point ``round(mn / s)`` clamped to ``[0, 2**b)``) and judged by
    its weighted error after rounding with the format; then ``iters`` rounds of refitting from the best so far
    (the scale, and asymmetric the minimum, by least squares on its codes). Plain RTN (:meth:`IntFormat.fit`) is a
    candidate too and every group keeps its best, so its weighted error never exceeds RTN's. Symmetric scales keep
    the format's sign rule (opposite to the group's extreme, which sits on or near the level ``-2**(b-1)``).
    """
    if not isinstance(fmt, IntFormat):
        raise ConfigError(f"the int scale search needs the int format (--format int), got {fmt.spec()}")
    if n_grid < 1 or iters < 0:
        raise ConfigError(f"the scale search needs a grid of at least 1 and iterations >= 0, got {n_grid}, {iters}")
    w = weight.detach().float()
    lay = group_layout(w.shape[1], fmt.group_size)
    wg = lay.to_groups(w)                                            # (out, G, gs)
    om = lay.to_groups(importance_weights(importance, w)[None]) * lay.mask(w.device)  # (1, G, gs), padding 0
    q_offset = 1 << (fmt.bits - 1)
    rtn = fmt.fit(wg)

    def error(p):
        return (om * (fmt.qdq(wg, p) - wg) ** 2).sum(-1, keepdim=True)   # (out, G, 1)

    def stored(s, mn):
        """Candidate ``x ~ s*q - mn`` (``s``, ``mn`` ``(out, G)``) as the format's parameters, RTN's where undetermined."""
        s = s.unsqueeze(-1).to(torch.float16).float()
        ok = (s != 0) & torch.isfinite(s) if fmt.sym else (s > 0) & torch.isfinite(s)
        s = torch.where(ok, s, rtn["scale"])
        if fmt.sym:
            return {"scale": s}
        zero = torch.round(mn.unsqueeze(-1) / s).clamp(0, fmt.maxq)
        return {"scale": s, "zero": torch.where(ok, zero, rtn["zero"])}

    best, best_err = rtn, error(rtn)

    def keep(cand):
        nonlocal best, best_err
        err = error(cand)
        better = err < best_err
        best = {k: torch.where(better, cand[k], best[k]) for k in best}
        best_err = torch.where(better, err, best_err)

    for s, mn, _ in range_candidates(wg, om, fmt.sym, q_offset, fmt.maxq, n_grid):
        keep(stored(s, mn))
    for _ in range(iters):
        codes = fmt.quantize(wg, best).float()
        levels = codes - q_offset if fmt.sym else codes            # x ~ s*levels - mn
        keep(stored(*ls_scale_min(wg, levels, om, nonneg_min=not fmt.sym)))
    codes = lay.from_groups(fmt.quantize(wg, best))
    return QuantizedWeight(fmt, codes, {k: v.squeeze(-1) for k, v in best.items()})
