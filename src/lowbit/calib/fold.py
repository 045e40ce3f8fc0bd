"""Folding a per-input-channel scale ``s`` into a block (AWQ, SmoothQuant, SmoothQuant+): the producer of an
input group's input (as the architecture row names it) is divided by ``s``, the group's input columns multiplied
by it.

``(x / s) (W s)^T = x W^T`` in real arithmetic: the float block computes the same function.
SmoothQuant's scales (``smooth_scales``) and their fold into every foldable group of a block (``smooth_block``)
live here too, shared by SmoothQuant (W8A8) and SmoothQuant+ (weight-only).
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.arch import ArchSpec, InputGroup, get_module

__all__ = ["can_fold", "fold_norm_gain", "fold_scale", "smooth_scales", "smooth_block"]


def can_fold(block: nn.Module, group: InputGroup) -> bool:
    """Whether ``group.prev`` can absorb a scale: a norm, or a linear with one output row per input channel
    (v_proj -> o_proj has fewer under grouped-query attention)."""
    if group.prev is None:
        return False
    if group.prev_kind == "linear":
        return get_module(block, group.prev).weight.shape[0] == get_module(block, group.linears[0]).weight.shape[1]
    return group.prev_kind == "norm"


def fold_scale(block: nn.Module, arch: ArchSpec, group: InputGroup, s: torch.Tensor) -> None:
    """Divide the output of ``group.prev`` by ``s`` ``(in,)`` and multiply ``group.linears``' input columns by it.

    The group must pass :func:`can_fold`. Weights are rescaled in fp32 and stored in their dtype (a norm
    computes ``x * (offset + w)``: ``offset + w`` is divided).
    """
    prev = get_module(block, group.prev)
    if group.prev_kind == "norm":
        w = prev.weight.data
        prev.weight.data = ((w.float() + arch.norm_offset) / s - arch.norm_offset).to(w.dtype)
    else:
        prev.weight.data = (prev.weight.data.float() / s[:, None]).to(prev.weight.dtype)
    if getattr(prev, "bias", None) is not None:
        prev.bias.data = (prev.bias.data.float() / s).to(prev.bias.dtype)
    for name in group.linears:
        lin = get_module(block, name)
        lin.weight.data = (lin.weight.data.float() * s).to(lin.weight.dtype)


def fold_norm_gain(norm: nn.Module, linears: list[nn.Module], offset: float = 0.0) -> None:
    """Move a bias-free norm's gain ``offset + w`` into the input columns of the ``linears`` it feeds; the norm's
    gain becomes exactly 1 (``w = 1 - offset``). Weights change in fp32 and keep their dtype.

    ``norm(x) * g @ W^T = norm(x) @ (W diag(g))^T``: the same function, and a norm without a gain commutes with
    any orthogonal rotation of its input (what :mod:`lowbit.calib.rotate` needs).
    """
    g = norm.weight.data.float() + offset                       # (in,)
    for lin in linears:
        lin.weight.data = (lin.weight.data.float() * g).to(lin.weight.dtype)
    norm.weight.data = torch.full_like(norm.weight.data, 1.0 - offset)


def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|X_j|**a / max|W_j|**(1-a)`` over the weights' shared input columns."""
    wmax = torch.cat([w.detach().abs().float() for w in weights]).amax(0).clamp_min(1e-5)
    s = act_absmax.float().clamp_min(1e-5).pow(alpha) / wmax.pow(1 - alpha)
    return s.clamp_min(1e-5)


def smooth_block(block: nn.Module, arch: ArchSpec, stats: dict, alpha: float) -> None:
    """Smooth every foldable group of ``block`` in place (``stats``: group -> an object with ``absmax``
    ``(in,)``, e.g. the engine's GroupStats); each group's ``absmax`` is rescaled to match the smoothed inputs."""
    for group in arch.groups:
        if not can_fold(block, group):
            continue
        st = stats[group]
        linears = [get_module(block, n) for n in group.linears]
        s = smooth_scales(st.absmax, [lin.weight for lin in linears], alpha).to(linears[0].weight.device)
        fold_scale(block, arch, group, s)
        st.absmax = st.absmax / s.to(st.absmax.device)
