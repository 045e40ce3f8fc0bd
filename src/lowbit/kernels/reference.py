"""Plain-torch references for every kernel, computed from the kernel layout.

They decode the kernel layout back to integer codes and apply the same formula
as the formats' ``dequantize`` (:mod:`lowbit.formats.integer`,
:mod:`lowbit.formats.table`), then ``F.linear``. Tests check each compiled op
against these, and these against the canonical codec path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import unpack_kernel_codes

__all__ = ["dequant_q8_ref", "dequant_ref", "linear_q8_ref", "quantize_act_q8"]


def dequant_ref(lay) -> torch.Tensor:
    """Float32 ``(out, in)`` weight of a :class:`~lowbit.kernels.ops.ScalarKernelLayout`."""
    q = unpack_kernel_codes(lay.codes, lay.bits, lay.group_size, lay.in_features)  # (out, in)
    col_group = torch.arange(lay.in_features) // lay.group_size  # (in,)
    sa = lay.scale_a.float()[:, col_group]  # (out, in)
    if lay.kind == "int":
        return (q.float() - lay.zero.float()[:, col_group]) * sa
    t = lay.table[q]
    if lay.scale_b is None:
        return t * sa
    return t * torch.where(t > 0, sa, lay.scale_b.float()[:, col_group])


def dequant_q8_ref(lay) -> torch.Tensor:
    """The weight ``gemm_q8`` multiplies, float32 ``(out, in)``: :func:`dequant_ref` for int codes and exact tables
    (FP4, FP3); for tables rounded to integers (NF, see :func:`lowbit.kernels.ops.q8_tables`),
    ``level_pos * pos[q] * scale_a - level_neg * neg[q] * scale_b`` (one scale: ``scale_b = scale_a``)."""
    if lay.kind == "int":
        return dequant_ref(lay)
    pos, neg, lp, ln = lay.q8_args
    q = unpack_kernel_codes(lay.codes, lay.bits, lay.group_size, lay.in_features)  # (out, in)
    col_group = torch.arange(lay.in_features) // lay.group_size  # (in,)
    sa = lay.scale_a.float()[:, col_group]  # (out, in)
    sb = sa if lay.scale_b is None else lay.scale_b.float()[:, col_group]
    return lp * pos[q].float() * sa - ln * neg[q].float() * sb


def quantize_act_q8(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """The input as the int8-activation kernel (``gemm_q8``) multiplies it: ``d * round(x / d)``.

    Columns are cut into groups of ``group_size`` (the weight's), each group into blocks of 32
    (the last block of a group may be short); ``d = max|x| / 127`` per block, rounding half to even.
    """
    x = x.float()
    in_f = x.shape[-1]
    gs = in_f if group_size <= 0 or group_size >= in_f else group_size
    G = -(-in_f // gs)
    gsp = -(-gs // 32) * 32
    xp = F.pad(x, (0, G * gs - in_f)).unflatten(-1, (G, gs))
    xp = F.pad(xp, (0, gsp - gs)).unflatten(-1, (gsp // 32, 32))  # (..., G, blocks, 32), zero padded
    d = xp.abs().amax(dim=-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(xp / torch.where(d > 0, d, 1.0)), 0.0)
    return (q * d).flatten(-2)[..., :gs].flatten(-2)[..., :in_f]


def linear_q8_ref(x: torch.Tensor, lay, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``gemm_q8``'s result in plain torch: the quantized input times the weight it multiplies (:func:`dequant_q8_ref`)."""
    return F.linear(quantize_act_q8(x, lay.group_size), dequant_q8_ref(lay), bias)
