"""FlattenQuant: per-tensor static activation quantization after flattening outlier channels.

Following Zhang et al. 2024 (arXiv 2402.17985; no public code), per input
group (linears sharing an input):

1. **Flatten.** Given a threshold ``T``, every channel ``c`` whose
   calibration max ``m_c = max|x_c|`` exceeds ``T`` is split into
   ``k_c = ceil(m_c / T)`` channels of ``x_c / k_c``; the weight column is
   repeated ``k_c`` times. ``x' W'^T = x W^T`` exactly (real arithmetic) and
   ``max|x'| <= T``, so one per-tensor scale ``max_c(m_c / k_c) / Q`` fits all
   channels.
2. **Choose T** (our rule; the paper tunes it by hand): with
   ``--fq-threshold-pct P >= 0``, ``T`` = the P-th percentile of the channel
   maxima. With ``-1`` (default), a grid of candidates (no flattening, and
   the 99.9 ... 50th percentiles) is searched, keeping candidates that add at
   most ``--fq-max-expand`` x K channels, and the ``T`` with the lowest
   activation-quantization output error ``||(Q(x') - x') W'^T||^2`` on
   ``--fq-search-tokens`` calibration tokens wins (ties: fewer channels).
   Done separately for each activation width considered (8 and, for mixed
   precision, 4 bits).
3. **Weights.** The flattened weight ``W'`` is quantized symmetric per output
   channel by a base method (``--fq-weight-method gptq|rtn``; GPTQ gets the
   flattened Hessian ``H'_{ij} = H_{c_i c_j} / (k_i k_j)``).
4. **Layer precision** (our rule): with ``--fq-int4-budget B > 0`` each
   linear is also built as W4A4 (own threshold search at 4 bits); it is
   kept when its relative output error ``||y_q - y||^2 / ||y||^2`` on the
   search tokens is at most ``B``, else the layer stays W8A8. The share of
   linear MACs running at INT4 is reported by
   :func:`lowbit.nn.w8a8.act_linear_summary`.

At inference flattening is a gather ``x[..., idx] * inv_k`` inside
:class:`lowbit.nn.w8a8.QuantizedActLinear`, followed by the INT8 GEMM.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from ..calib.engine import GroupStats
from ..errors import ConfigError
from ..models.arch import get_module
from ..nn.w8a8 import act_codes, act_head_step, act_spec, check_act_format, from_quantized_weight, quantize_weight_pc
from .registry import get_method, register_method

log = logging.getLogger(__name__)

__all__ = ["FlattenPlan", "FlattenQuantConfig", "act_quant_error", "choose_threshold", "flatten_map"]

_PCTS = (99.9, 99.5, 99.0, 98.0, 95.0, 90.0, 80.0, 70.0, 50.0)


@dataclass(frozen=True)
class FlattenQuantConfig:
    act_bits: int = 8                # activation bits of the high-precision layers (static, per tensor)
    fq_threshold_pct: float = -1.0   # T = this percentile of channel maxima; -1 = search (see module doc)
    fq_max_expand: float = 0.5       # the search keeps T adding at most this fraction of extra channels
    fq_search_tokens: int = 1024     # calibration tokens for the T search and the precision rule
    fq_weight_method: str = "gptq"   # base weight quantizer: gptq | rtn
    fq_int4_budget: float = 0.0      # W4A4 where its relative output error <= this; 0 = W8A8 everywhere
    w_per_tensor: bool = False       # one weight scale per tensor (rtn only)
    int8_head: bool = False          # the LM head W8A8 too (int8 per channel, per-token int8 activations)


@dataclass
class FlattenPlan:
    """Flattening of one input group at one activation width."""

    idx: torch.Tensor        # (K',) long, source channel of each flattened channel
    k: torch.Tensor          # (K',) long, split factor of each flattened channel's source
    act_scale: float         # per-tensor static scale of x'
    threshold: float


def flatten_map(absmax: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx, k)`` for channel maxima ``absmax`` ``(K,)``: channel ``c`` repeated ``ceil(m_c / T)`` times, in order."""
    kc = torch.ceil(absmax.float() / threshold).clamp_min(1).long()          # (K,)
    idx = torch.repeat_interleave(torch.arange(absmax.numel()), kc)           # (K',)
    return idx, kc[idx]


def _plan(absmax: torch.Tensor, threshold: float, bits: int) -> FlattenPlan:
    idx, k = flatten_map(absmax, threshold)
    q = (1 << (bits - 1)) - 1
    scale = float((absmax.float()[idx] / k).max().clamp_min(1e-8)) / q
    scale = float(torch.tensor(scale, dtype=torch.float16).float())        # the value the module stores
    return FlattenPlan(idx, k, scale, threshold)


def act_quant_error(x: torch.Tensor, w: torch.Tensor, plan: FlattenPlan, bits: int) -> float:
    """``||(Q(x') - x') W'^T||^2`` for tokens ``x`` ``(n, K)`` and float weights ``w`` ``(out, K)``."""
    xf = x[:, plan.idx] / plan.k
    d = act_codes(xf, torch.tensor(plan.act_scale), bits) * plan.act_scale - xf
    return float((d @ w[:, plan.idx].T).pow(2).sum())


def choose_threshold(absmax: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bits: int, pct: float = -1.0,
                     max_expand: float = 0.5) -> FlattenPlan:
    """The flattening plan for one input (module doc, step 2)."""
    m = absmax.float()
    if pct >= 0:
        return _plan(m, max(float(torch.quantile(m, pct / 100.0)), 1e-8), bits)
    best, best_err = _plan(m, float(m.max().clamp_min(1e-8)), bits), None
    best_err = act_quant_error(x, w, best, bits)
    for p in _PCTS:
        t = float(torch.quantile(m, p / 100.0))
        if t <= 0:
            continue
        if int(torch.ceil(m / t).clamp_min(1).sum()) > (1 + max_expand) * m.numel():
            continue
        cand = _plan(m, t, bits)
        err = act_quant_error(x, w, cand, bits)
        if err < best_err * (1 - 1e-6):
            best, best_err = cand, err
    return best


def _fq_prepare(data, arch, stats, fmt, cfg: FlattenQuantConfig) -> None:
    """Per input group: flattening plans (per activation width), search tokens, flattened Hessians."""
    check_act_format(fmt, "flattenquant")
    if cfg.fq_weight_method not in ("gptq", "rtn"):
        raise ConfigError(f"--fq-weight-method must be gptq or rtn, got {cfg.fq_weight_method!r}")
    widths = {cfg.act_bits} | ({4} if cfg.fq_int4_budget > 0 else set())
    for group in arch.groups:
        st = stats[group]
        x = st.token_sample(cfg.fq_search_tokens)                 # fp32, as recorded
        w = torch.cat([get_module(data.block, n).weight.detach().float().cpu() for n in group.linears])
        st.extra["plans"] = {b: choose_threshold(st.absmax.cpu(), x, w, b, cfg.fq_threshold_pct, cfg.fq_max_expand)
                             for b in sorted(widths)}
        st.extra["tokens"] = x
        st.inputs = []  # no longer needed: free the calibration activations
        for b, p in st.extra["plans"].items():
            log.debug("block %d %s A%d: T=%.3g, %d -> %d channels", data.index, group.linears, b, p.threshold,
                      w.shape[1], p.idx.numel())


def _build(weight: torch.Tensor, st: GroupStats, fmt, w_bits: int, a_bits: int, cfg: FlattenQuantConfig):
    plan = st.extra["plans"][a_bits]
    wf = weight.detach().float()[:, plan.idx]                                # (out, K')
    wfmt = replace(fmt, bits=w_bits)
    if cfg.fq_weight_method == "gptq" and not cfg.w_per_tensor:
        h = st.hessian.float()
        kk = plan.k.float().to(h.device)
        hf = h[plan.idx][:, plan.idx] / (kk[:, None] * kk[None, :])          # (K', K') Hessian of x'
        base = get_method("gptq")
        qw = base.quantize_linear(wf, GroupStats(hessian=hf), wfmt, base.config())
    else:
        qw = quantize_weight_pc(wf, wfmt, cfg.w_per_tensor)
    out_f, in_f = weight.shape
    spec = act_spec(in_f, out_f, w_bits, a_bits, dynamic=False, flat_features=plan.idx.numel())
    return from_quantized_weight(qw, spec, plan.act_scale, plan.idx, plan.k)


@torch.no_grad()
def _rel_error(mod, weight: torch.Tensor, x: torch.Tensor) -> float:
    ref = x @ weight.detach().float().T
    mod.mode = "fake"
    try:
        y = mod(x)
    finally:
        mod.mode = "int"
    return float((y - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-20))


_NEEDS = {"act_absmax", "hessian", "inputs"}


@register_method("flattenquant", config=FlattenQuantConfig, needs=_NEEDS, prepare_block=_fq_prepare,
                 finish_model=act_head_step)
def flattenquant(weight, stats, fmt, cfg: FlattenQuantConfig):
    """FlattenQuant: outlier channels flattened, per-tensor static INT8/INT4 activations, GPTQ weights."""
    if cfg.fq_int4_budget > 0:
        cand = _build(weight, stats, fmt, 4, 4, cfg).to(weight.device)
        err = _rel_error(cand, weight, stats.extra["tokens"].to(weight.device))
        if err <= cfg.fq_int4_budget:
            return cand
        log.debug("W4A4 rel. error %.3g > budget %.3g: keeping W%dA%d", err, cfg.fq_int4_budget, fmt.bits, cfg.act_bits)
    return _build(weight, stats, fmt, fmt.bits, cfg.act_bits, cfg)
