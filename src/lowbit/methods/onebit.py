"""OneBit's data-free initialisation: sign-value-independent decomposition (SVID; Xu et al., 2024).

``W ~ diag(g) . sign(W) . diag(h)`` (layout: :mod:`lowbit.formats.binary`, storage: the ``onebit`` codec of
:mod:`lowbit.nn.binary_codec`): ``g h^T`` is the best rank-1 approximation of ``|W|`` (its leading singular pair,
non-negative by Perron-Frobenius), found by alternating least squares, which is power iteration on ``|W|``. The
official code takes a rank-1 NMF of ``|W|`` (scikit-learn); at rank 1 the least-squares optimum of both is the same
non-negative pair, so this differs from it only in convergence. ``g`` and ``h`` are balanced (equal norms) before
their fp16 rounding, so neither under- nor overflows.

Not here: OneBit's knowledge distillation of ``g``, ``h`` and the latent signs, and the non-affine LayerNorm its
trained layer puts after the product (without training it would change the function). The BitDistiller trainer
(:mod:`lowbit.distill`) trains a float weight through a scalar format's rounding and cannot hold a fixed sign matrix
with trainable value vectors yet (docs/methods.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..formats.binary import OneBitWeight, sign_bits
from .registry import register_method

__all__ = ["OneBitConfig", "svid", "onebit_quantize"]


@dataclass(frozen=True)
class OneBitConfig:
    svid_iters: int = 100     # most alternating least-squares steps for the rank-1 factor of |W|
    svid_tol: float = 1e-7    # stop once the relative change of the factor is below this

    def __post_init__(self):
        if self.svid_iters < 1 or self.svid_tol < 0:
            raise ConfigError("--svid-iters must be at least 1 and --svid-tol at least 0")


@torch.no_grad()
def svid(m: torch.Tensor, iters: int = 100, tol: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-1 least-squares factor ``(a (out,), b (in,))`` of a non-negative ``m`` ``(out, in)``, ``a b^T ~ m``,
    both non-negative with equal norms (float32)."""
    m = m.float()
    b = m.mean(0)
    if not bool(b.any()):
        return torch.zeros(m.shape[0], device=m.device), b
    for _ in range(iters):
        a = m @ b / b.dot(b)
        b_new = m.T @ a / a.dot(a).clamp_min(1e-30)
        done = float((b_new - b).norm()) <= tol * float(b_new.norm())
        b = b_new
        if done:
            break
    a = m @ b / b.dot(b)
    r = (a.norm() / b.norm()).sqrt()   # balance: a / r and b * r have equal norms, same product
    return a / r, b * r


@torch.no_grad()
def onebit_quantize(weight: torch.Tensor, cfg: OneBitConfig = OneBitConfig()) -> OneBitWeight:
    """OneBit's SVID of ``weight`` ``(out, in)``: signs and the rank-1 factor of ``|W|`` as fp16 value vectors."""
    w = weight.detach().float()
    g, h = svid(w.abs(), cfg.svid_iters, cfg.svid_tol)
    return OneBitWeight(w.shape[0], w.shape[1], sign_bits(w), g.half().float(), h.half().float())


@dataclass(frozen=True)
class _DistilledConfig:
    pass


@register_method("onebit-kd", config=_DistilledConfig, uses_format=False)
def onebit_kd(weight, stats, fmt, cfg):
    """The recipe name of a OneBit student trained by ``lowbit distill --init onebit``: a training run."""
    raise ConfigError("onebit-kd trains the whole model; run `lowbit distill MODEL --init onebit ...` instead")


@register_method("onebit", config=OneBitConfig, uses_format=False)
def onebit(weight, stats, fmt, cfg: OneBitConfig):
    """OneBit's data-free SVID: sign matrix times the rank-1 factor of |W| (no distillation)."""
    # a method with its own storage: the scalar ``fmt`` the engine passes is not used
    return onebit_quantize(weight, cfg)
