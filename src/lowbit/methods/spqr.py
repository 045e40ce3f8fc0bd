"""SpQR: GPTQ with small groups, quantized group statistics and unstructured fp16 outliers (Dettmers et al., 2023).

Per linear ``(out, in)`` with input Hessian ``H`` (layout: :mod:`lowbit.formats.spqr`, storage:
:mod:`lowbit.nn.spqr_codec`):

1. ``U``: the upper Cholesky factor of the damped ``H^-1`` (GPTQ's), ``d_j = U_jj``. The outlier threshold is
   ``tau * mean_j(var_i(W_ij) / d_j^2)``: ``tau`` (``--outlier-threshold``, the paper's 0.2) relative to the
   layer's typical GPTQ error per weight.
2. Columns left to right with GPTQ's error feedback (:mod:`.feedback`). At the first column of each group of
   ``spqr_group`` columns, on the group's current (error-updated) weights:

   a. *likely outliers*: for each weight, how much the group's error ``sum_j ((w_j - q_j) / d_j)^2`` drops when
      the min-max fit leaves that weight out (it is then not quantized at all); above the threshold it is a
      candidate, and is replaced by its row's mean over the other weights for fitting;
   b. per row a min-max scale and real-valued zero on the ``bits`` grid, then the scales (and zeros) quantized to
      ``stat_bits`` over runs of ``stat_group`` rows (fp16 step and minimum per run). The column codes use these
      quantized statistics, exactly as they are stored.
3. Each column: round to the grid; a weight whose error ``((w - q) / d)^2`` exceeds the threshold is an outlier,
   kept at its fp16 value (what is stored), so the error fed to later columns is only that rounding.

Not done here: the paper's act-order permutation of columns (which would have to be stored), and its
row-run sharing of outlier row pointers in the GPU kernel; groups are contiguous original columns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..formats import group_layout
from ..formats.spqr import SCALE_FLOOR, SpQRWeight, dequantize_stats, minmax_fit, minmax_qdq, quantize_stats
from .feedback import error_feedback, inverse_hessian_factor, live_copies, loop_threads
from .registry import register_method

__all__ = ["SpQRConfig", "spqr_quantize", "outlier_threshold", "loo_error_drop"]


@dataclass(frozen=True)
class SpQRConfig:
    spqr_bits: int = 3               # weight code bits
    spqr_group: int = 16             # input columns per first-level group (beta1)
    stat_bits: int = 3               # bits of each first-level scale and zero
    stat_group: int = 16             # rows whose scales (and zeros) share one fp16 step and minimum (beta2)
    outlier_threshold: float = 0.2   # tau: outlier if its GPTQ error exceeds tau x the layer's mean; 0 = none
    damp: float = 0.01               # fraction of mean diag(H) added to H (same flag as GPTQ)
    block_size: int = 128            # columns per lazy batch update (same flag as GPTQ)

    def __post_init__(self):
        if not 2 <= self.spqr_bits <= 8 or not 1 <= self.stat_bits <= 8:
            raise ConfigError("--spqr-bits must be in 2..8 and --stat-bits in 1..8")
        if self.spqr_group < 2 or self.stat_group < 1:
            raise ConfigError("--spqr-group must be at least 2 and --stat-group at least 1")
        if self.outlier_threshold < 0:
            raise ConfigError(f"--outlier-threshold must be >= 0 (0 = no outliers), got {self.outlier_threshold}")


def outlier_threshold(W: torch.Tensor, d: torch.Tensor, tau: float) -> float:
    """``tau * mean_j(var_i(W_ij) / d_j^2)`` (``inf`` when ``tau`` is 0): the bar a weight's squared GPTQ error
    ``((w - q) / d)^2`` must clear to be an outlier."""
    if tau <= 0:
        return math.inf
    return tau * float((W.var(0) / d.square()).mean())


def loo_error_drop(wg: torch.Tensor, dg: torch.Tensor, bits: int) -> torch.Tensor:
    """``(rows, k)``: for each weight of the groups ``wg`` ``(rows, k)``, how much the group's error
    ``sum_j ((w_j - q_j) / d_j)^2`` (``dg`` ``(k,)``) drops when that weight is left out of the min-max fit and
    not quantized."""
    k = wg.shape[1]
    if k < 2:
        return torch.zeros_like(wg)
    base = ((wg - minmax_qdq(wg, bits)) / dg).square().sum(1, keepdim=True)              # (rows, 1)
    idx = torch.arange(k, device=wg.device)
    others = idx[1:] - (idx[:, None] >= idx[1:]).long()   # (k, k-1): row i lists every column but i
    loo = wg[:, others]                                                               # (rows, k, k-1)
    return base - ((loo - minmax_qdq(loo, bits)) / dg[others]).square().sum(-1)


@torch.no_grad()
def spqr_solve(weight: torch.Tensor, hessian: torch.Tensor, cfg: SpQRConfig) -> tuple[SpQRWeight, torch.Tensor]:
    """SpQR of ``weight`` ``(out, in)`` given the input Hessian: the quantized weight and the ``(out, in)`` values
    the error feedback used for each column (equal to ``qw.dequantize()``; returned for tests)."""
    W, H = live_copies(weight, hessian)
    rows, cols = W.shape
    bits, gs, maxq = cfg.spqr_bits, cfg.spqr_group, (1 << cfg.spqr_bits) - 1
    U, _ = inverse_hessian_factor(H, cfg.damp)
    d = torch.diag(U)
    thr = outlier_threshold(W, d, cfg.outlier_threshold)
    n_groups = group_layout(cols, gs).n_groups
    n_runs = -(-rows // cfg.stat_group)
    codes = torch.zeros(rows, cols, dtype=torch.long, device=W.device)
    stat_codes = {k: torch.zeros(rows, n_groups, dtype=torch.long, device=W.device) for k in ("scale", "zero")}
    stat_step = {k: torch.zeros(n_runs, n_groups, device=W.device) for k in ("scale", "zero")}
    stat_lo = {k: torch.zeros(n_runs, n_groups, device=W.device) for k in ("scale", "zero")}
    used = torch.zeros_like(W)
    is_out = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    current_sz: list[torch.Tensor] = []

    def fit_group(g: int, wg: torch.Tensor) -> None:
        if math.isfinite(thr):
            cand = loo_error_drop(wg, d[g * gs : g * gs + wg.shape[1]], bits) > thr
            keep = (~cand).float()
            mean = (wg * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
            wg = torch.where(cand, mean, wg)
        sz = []
        for name, v in zip(("scale", "zero"), minmax_fit(wg, bits)):   # (rows, 1) each
            c, step, lo = quantize_stats(v, cfg.stat_bits, cfg.stat_group)
            stat_codes[name][:, g], stat_step[name][:, g], stat_lo[name][:, g] = c[:, 0], step[:, 0], lo[:, 0]
            sz.append(dequantize_stats(c, step, lo, cfg.stat_group))
        current_sz[:] = [sz[0].clamp_min(SCALE_FLOOR), sz[1]]

    def quantize_column(c, w, current):
        if c % gs == 0:
            fit_group(c // gs, current(torch.arange(c, min(c + gs, cols), device=W.device)))
        s, z = current_sz
        q = torch.round(w / s + z).clamp(0, maxq)
        codes[:, c] = q[:, 0].long()
        deq = (q - z) * s
        out = ((w - deq) / d[c]).square() > thr
        deq = torch.where(out, w.half().float(), deq)
        is_out[:, c], used[:, c] = out[:, 0], deq[:, 0]
        return deq

    error_feedback(W, H, cfg.damp, cfg.block_size, False, quantize_column, U=U)
    r, c = is_out.nonzero(as_tuple=True)   # row-major: by row, then column
    qw = SpQRWeight(rows, cols, bits, gs, cfg.stat_bits, cfg.stat_group, codes,
                    stat_codes["scale"], stat_codes["zero"], stat_step["scale"], stat_lo["scale"],
                    stat_step["zero"], stat_lo["zero"], used[r, c], c, is_out.sum(1))
    return qw, used


def spqr_quantize(weight: torch.Tensor, hessian: torch.Tensor, cfg: SpQRConfig) -> SpQRWeight:
    """SpQR of ``weight`` ``(out, in)`` given the input Hessian ``(in, in)`` (see the module doc)."""
    return spqr_solve(weight, hessian, cfg)[0]


@register_method("spqr", config=SpQRConfig, needs={"hessian"}, uses_format=False)
def spqr(weight, stats, fmt, cfg: SpQRConfig):
    """SpQR: GPTQ with 16-column groups, 3-bit quantized statistics and fp16 outliers stored sparse."""
    # a method with its own storage: the scalar ``fmt`` the engine passes is not used
    with loop_threads(weight.device):
        return spqr_quantize(weight, stats.hessian, cfg)
