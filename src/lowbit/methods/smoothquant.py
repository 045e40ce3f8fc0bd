"""SmoothQuant W8A8 and plain per-token W8A8: weight+activation quantization with integer GEMMs.

``smoothquant`` (Xiao et al., 2023; the fold is :mod:`lowbit.calib.fold`): per input group, migrate activation
outliers into the weights with ``s_j = max|X_j|**a / max|W_j|**(1-a)``
(``W_j``: column ``j`` of all the group's linears), fold ``1/s`` into the
module producing the input (a norm, ``norm_offset`` aware, or the previous
linear when shapes allow; groups with nothing to fold into are left
unsmoothed) and multiply the weights by ``s``. ``X W^T`` is unchanged in
real arithmetic. Then weights are RTN int per output channel and
activations are quantized per tensor with a static scale from calibration
(``max|X/s| / 127``; the paper's O3 setting) or per token dynamically
(``--sq-act-dynamic``).

``w8a8``: no smoothing, no calibration; per-channel int weights, per-token
dynamic activations.

Both produce :class:`lowbit.nn.w8a8.QuantizedActLinear` and take the weight
format from ``--format int --sym --group-size -1 --bits 8|4``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..calib.fold import smooth_block
from ..nn.w8a8 import act_head_step, act_spec, check_act_format, from_quantized_weight, quantize_weight_pc
from .registry import register_method

log = logging.getLogger(__name__)

__all__ = ["SmoothQuantConfig", "W8A8Config"]


@dataclass(frozen=True)
class SmoothQuantConfig:
    sq_alpha: float = 0.5          # migration strength a in s = max|X|^a / max|W|^(1-a)
    act_bits: int = 8              # activation bits (8 or 4), symmetric
    sq_act_dynamic: bool = False   # per-token dynamic activation scales instead of one static per-tensor scale
    w_per_tensor: bool = False     # one weight scale per tensor instead of per output channel
    int8_head: bool = False        # the LM head W8A8 too (int8 per channel, per-token int8 activations)


@dataclass(frozen=True)
class W8A8Config:
    act_bits: int = 8              # activation bits (8 or 4), symmetric, per-token dynamic
    w_per_tensor: bool = False     # one weight scale per tensor instead of per output channel
    int8_head: bool = False        # the LM head W8A8 too (int8 per channel, per-token int8 activations)


def _sq_prepare(data, arch, stats, fmt, cfg: SmoothQuantConfig) -> None:
    check_act_format(fmt, "smoothquant")
    smooth_block(data.block, arch, stats, cfg.sq_alpha)


@register_method("smoothquant", config=SmoothQuantConfig, needs={"act_absmax"}, prepare_block=_sq_prepare,
                 finish_model=act_head_step)
def smoothquant(weight, stats, fmt, cfg: SmoothQuantConfig):
    """SmoothQuant W8A8: outlier migration into weights, static per-tensor (or per-token) INT8 activations."""
    out_f, in_f = weight.shape
    spec = act_spec(in_f, out_f, fmt.bits, cfg.act_bits, dynamic=cfg.sq_act_dynamic)
    act_scale = None
    if not cfg.sq_act_dynamic:
        act_scale = float(stats.absmax.max()) / ((1 << (cfg.act_bits - 1)) - 1)
    return from_quantized_weight(quantize_weight_pc(weight, fmt, cfg.w_per_tensor), spec, act_scale)


@register_method("w8a8", config=W8A8Config, finish_model=act_head_step)
def w8a8(weight, stats, fmt, cfg: W8A8Config):
    """Plain W8A8: per-channel int weights, per-token dynamic int activations, no calibration."""
    check_act_format(fmt, "w8a8")
    out_f, in_f = weight.shape
    spec = act_spec(in_f, out_f, fmt.bits, cfg.act_bits, dynamic=True)
    return from_quantized_weight(quantize_weight_pc(weight, fmt, cfg.w_per_tensor), spec)
