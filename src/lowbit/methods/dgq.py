"""DGQ: A8W4 with dual-grained weight scales, computed by the int8 GEMM (Zhang et al. 2023, arXiv 2310.04836).

Per linear:

1. **Scales** (:func:`lowbit.formats.dual_grained.fit_dual_grained`): fine signed group scales ``S'`` (lowbit's
   symmetric int4 rule, ``--dgq-clip``: each group's clip search), then per output channel an fp16 scale ``s`` and
   integer group scales ``k`` in ``[-15, 16]`` with ``s * k ~ S'``; ``--dgq-scale-search`` (default off: on
   SmolLM2 it lowered the weight error but raised perplexity, since it clips the largest groups) tries channel
   scales ``a * max|S'| / 16`` for ``a`` = 1.0 ... 0.5 and keeps each row's best, the error weighted by diag(H)
   when the Hessian is there. Both are fixed before any code is chosen.
2. **Codes**: int4 ``c`` in ``[-8, 7]`` under the effective scales ``s * k``, by GPTQ's error feedback through the
   layer's Hessian (``--dgq-weight-method gptq``, the column loop of :mod:`.feedback`; the scales do not move
   while it runs, unlike plain GPTQ, which fits a group's scale when it reaches the group) or by RTN.
3. **Module**: :class:`lowbit.nn.dgq.QuantizedDGQLinear`: ``c * k`` is an int8 weight with per-channel scale
   ``s``; activations are per-token dynamic int8; one integer GEMM and one rescale per (token, channel).

0. **Percentile-clipping smoothing** (``--dgq-smooth-pct P``, 0 = off; our reading of the paper's scheme, whose
   exact rule we did not have): per input group whose producer can absorb a scale (a norm, or v -> o without
   GQA, :func:`lowbit.calib.fold.can_fold`), ``T`` = the P-th percentile of the calibration channel maxima
   ``m_j`` and ``s_j = max(1, m_j / T)``: every channel above ``T`` is scaled down to it, the producer divided by
   ``s`` and the weights' columns multiplied by it (the float block is unchanged), before the scales are fitted.
   GPTQ's Hessian becomes that of ``x / s``.

What the paper has that this does not: its asymmetric uint4 codes with zero points and its phase-1 grid search
of the group scales (here: lowbit's clip grid, optional). Weights must be ``--format int --bits 4 --sym
--group-size G`` (``G > 0``); anything else is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calib.fold import can_fold, fold_scale
from ..errors import ConfigError
from ..formats.dual_grained import SCALE_SEARCH_ALPHAS, DualGrained, QMAX, QMIN, fit_dual_grained, group_index
from ..formats.quantize import DEFAULT_CLIP_GRID
from ..nn.dgq import from_dual_grained
from ..nn.w8a8 import act_head_step
from .feedback import error_feedback, live_copies, loop_threads
from .registry import register_method

__all__ = ["DGQConfig", "dgq_quantize", "percentile_smooth_scales"]

_WEIGHT_METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class DGQConfig:
    dgq_weight_method: str = "gptq"  # int4 codes under the fixed dual-grained scales: gptq | rtn
    dgq_scale_search: bool = False   # search each row's channel scale (a * max|S'| / 16, a = 1.0 ... 0.5) by weight error (hurt perplexity on SmolLM2)
    dgq_clip: bool = False           # clip search of each group's fine scale before the integer decomposition
    dgq_smooth_pct: float = 0.0      # percentile-clipping smoothing: channels above this percentile of the calibration channel maxima scaled down to it, into the weights (0 = off)
    damp: float = 0.01               # GPTQ: fraction of mean diag(H) added to H
    first_position_weight: float = 1.0  # weight of each calibration window's first position in H (1 = plain)
    int8_head: bool = False          # the LM head W8A8 too (int8 per channel, per-token int8 activations)

    def __post_init__(self):
        if self.dgq_weight_method not in _WEIGHT_METHODS:
            raise ConfigError(f"--dgq-weight-method must be one of {', '.join(_WEIGHT_METHODS)}, "
                              f"got {self.dgq_weight_method!r}")
        if not self.first_position_weight >= 0:
            raise ConfigError(f"--first-position-weight must be >= 0, got {self.first_position_weight}")
        if not 0 <= self.dgq_smooth_pct < 100:
            raise ConfigError(f"--dgq-smooth-pct must be in [0, 100) (0 = no smoothing), got {self.dgq_smooth_pct}")


def check_dgq_format(fmt) -> None:
    """DGQ stores symmetric int4 codes in groups: say so instead of guessing."""
    if getattr(fmt, "name", "") != "int" or fmt.bits != 4 or not fmt.sym or fmt.group_size <= 0:
        raise ConfigError("dgq is A8W4 with symmetric int4 weights in groups (int8 group scales under a per-channel "
                          "fp16 scale, run as an int8 GEMM): pass --format int --bits 4 --sym --group-size G with "
                          f"G > 0, e.g. --group-size 128 (got {fmt.spec()})")


@torch.no_grad()
def dgq_quantize(weight: torch.Tensor, group_size: int, hessian: torch.Tensor | None = None,
                 scale_search: bool = False, clip: bool = False, damp: float = 0.01,
                 block_size: int = 128) -> DualGrained:
    """Dual-grained int4 ``weight`` ``(out, in)``: scales fitted first (importance diag(H) when ``hessian``
    ``(in, in)`` is given), then codes by GPTQ's error feedback through ``hessian``, or by RTN without one."""
    alphas = SCALE_SEARCH_ALPHAS if scale_search else (1.0,)
    clip_grid = DEFAULT_CLIP_GRID if clip else None
    if hessian is None:
        return fit_dual_grained(weight, group_size, None, alphas, clip_grid)
    W, H = live_copies(weight, hessian)
    dg = fit_dual_grained(W, group_size, torch.diagonal(H), alphas, clip_grid)
    scale = dg.group_scale()                                                   # (out, G)
    colgroup = group_index(W.shape[1], group_size, scale.shape[1]).tolist()    # Python ints: no sync per column
    codes = torch.zeros_like(dg.codes)

    def quantize_column(c, w, current):
        s = scale[:, colgroup[c]: colgroup[c] + 1]                             # (out, 1)
        q = torch.round(w / s).clamp_(QMIN, QMAX)
        codes[:, c] = q[:, 0].to(torch.int8)
        return q * s

    with loop_threads(W.device):
        error_feedback(W, H, damp, block_size, False, quantize_column)
    dg.codes = codes
    return dg


def percentile_smooth_scales(absmax: torch.Tensor, pct: float) -> torch.Tensor:
    """``s_j = max(1, m_j / T)`` for channel maxima ``m`` ``(in,)``, ``T`` their ``pct``-th percentile."""
    m = absmax.float()
    t = float(torch.quantile(m, pct / 100.0))
    return (m / t).clamp_min(1.0) if t > 0 else torch.ones_like(m)


def _dgq_prepare(data, arch, stats, fmt, cfg: DGQConfig) -> None:
    check_dgq_format(fmt)
    if cfg.dgq_smooth_pct <= 0:
        return
    for group in arch.groups:
        if not can_fold(data.block, group):
            continue
        st = stats[group]
        s = percentile_smooth_scales(st.absmax, cfg.dgq_smooth_pct)
        fold_scale(data.block, arch, group, s.to(data.device))
        st.absmax = st.absmax / s.to(st.absmax.device)
        if st.hessian is not None:                       # the Hessian of x / s
            sh = s.to(st.hessian.device)
            st.hessian = st.hessian / (sh[:, None] * sh[None, :])


def _layer_needs(cfg: DGQConfig) -> set[str]:
    return ({"hessian"} if cfg.dgq_weight_method == "gptq" else set()) | ({"act_absmax"} if cfg.dgq_smooth_pct > 0
                                                                           else set())


@register_method("dgq", config=DGQConfig, needs={"hessian", "act_absmax"}, layer_needs=_layer_needs,
                 prepare_block=_dgq_prepare, finish_model=act_head_step)
def dgq(weight, stats, fmt, cfg: DGQConfig):
    """DGQ A8W4: int4 weights with int8 group scales under fp16 channel scales, int8 GEMM, per-token A8."""
    check_dgq_format(fmt)
    hessian = stats.hessian if cfg.dgq_weight_method == "gptq" else None
    dg = dgq_quantize(weight, fmt.group_size, hessian, cfg.dgq_scale_search, cfg.dgq_clip, cfg.damp)
    return from_dual_grained(dg).to(weight.device)
