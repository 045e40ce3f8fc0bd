"""Fake-quantized linears for quantization-aware training, with a straight-through estimator.

Design (as in BitDistiller's code): the student keeps a *float* weight per
linear; every forward re-fits the format's per-group parameters on the
current weight and rounds it, ``W_q = dequantize(quantize(W, fit(W)))``,
through exactly the functions PTQ uses (:func:`lowbit.formats.quantize_rtn`).
Nothing about the quantizer is learned: clipping enters only through the
initial weights (the clipping search clamps them, so the fitted ranges start
clipped), and the ranges follow the weights as they train. The backward pass
is the identity on ``W`` (straight-through), so gradients reach every weight.

Because the forward *is* ``quantize_rtn(W).dequantize()``, exporting with
``quantize_rtn(W)`` into a packed :class:`~lowbit.nn.QuantizedLinear` gives a
module whose decoded weight is bit-identical, hence identical logits.

:class:`OneBitFakeLinear` is OneBit's trainable 1-bit layer (Xu et al., 2024):
``W_q = diag(g) . sign(W) . diag(h)`` with the latent float ``W`` and both value
vectors ``g``, ``h`` trained, straight-through the sign and the fp16 rounding of
``g`` and ``h``; its export is the ``onebit`` codec's weight, bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import Format, quantize_rtn
from ..formats.binary import OneBitWeight, pm_one, sign_bits

__all__ = ["FakeQuantLinear", "OneBitFakeLinear", "fake_quant_weight", "TRAINABLE"]


class _STE(torch.autograd.Function):
    """Forward: ``fn(x)``, a rounding (the format's round trip, the sign, fp16); backward: the gradient unchanged
    (straight-through). A custom Function, not ``x + (fn(x) - x).detach()``, so the forward value is exactly
    ``fn(x)``, bit for bit."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn) -> torch.Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def fake_quant_weight(w: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``(out, in)`` weight rounded with ``fmt`` (params fitted on ``w``), straight-through gradient."""
    return _STE.apply(w, lambda v: quantize_rtn(v, fmt).dequantize().to(v.dtype))


class FakeQuantLinear(nn.Module):
    """``y = x Q(W)^T + b`` with ``Q`` the format's round trip on the current float ``W``.

    ``weight`` ``(out, in)`` is a trainable float parameter; ``bias`` (if any) is
    a frozen parameter (the packed export keeps it as stored).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: Format):
        super().__init__()
        self.fmt = fmt
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Module, fmt: Format, weight: torch.Tensor | None = None) -> "FakeQuantLinear":
        """From an ``nn.Linear`` (or a packed QuantizedLinear: its decoded weight) unless ``weight`` is given."""
        if weight is None:
            weight = lin.dequantize_weight() if hasattr(lin, "dequantize_weight") else lin.weight
        return cls(weight, getattr(lin, "bias", None), fmt)

    def trainable(self) -> list[nn.Parameter]:
        return [self.weight]

    def quantized_weight(self) -> torch.Tensor:
        return fake_quant_weight(self.weight, self.fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), b)

    def to_packed(self):
        """The packed QuantizedLinear this layer computes with (same weight, bit for bit)."""
        from ..nn import to_module

        return to_module(self, quantize_rtn(self.weight, self.fmt))

    def extra_repr(self) -> str:
        f = ", ".join(f"{k}={v}" for k, v in self.fmt.spec().items())
        return f"in_features={self.in_features}, out_features={self.out_features}, {f}"


def _pm_sign(w: torch.Tensor) -> torch.Tensor:
    return pm_one(sign_bits(w)).to(w.dtype)


def _fp16(v: torch.Tensor) -> torch.Tensor:
    return v.half().to(v.dtype)


class OneBitFakeLinear(nn.Module):
    """``y = x (diag(g) sign(W) diag(h))^T + b``: OneBit's 1-bit layer with a latent float ``weight`` and trainable
    ``out_scale`` (g) and ``in_scale`` (h); the sign and the fp16 rounding of g and h are straight-through.

    OneBit's paper also puts a LayerNorm after the product; lowbit's ``onebit`` codec has none, so it is not here.
    """

    def __init__(self, weight: torch.Tensor, out_scale: torch.Tensor, in_scale: torch.Tensor,
                 bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.out_scale = nn.Parameter(out_scale.detach().float().clone())
        self.in_scale = nn.Parameter(in_scale.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @classmethod
    def from_onebit(cls, weight: torch.Tensor, qw: OneBitWeight, bias=None) -> "OneBitFakeLinear":
        """Latent ``weight`` (its signs should be ``qw``'s) and ``qw``'s value vectors."""
        return cls(weight, qw.out_scale, qw.in_scale, bias)

    def trainable(self) -> list[nn.Parameter]:
        return [self.weight, self.out_scale, self.in_scale]

    def quantized_weight(self) -> torch.Tensor:
        g = _STE.apply(self.out_scale, _fp16)
        h = _STE.apply(self.in_scale, _fp16)
        return g[:, None] * _STE.apply(self.weight, _pm_sign) * h[None, :]   # OneBitWeight.dequantize's order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.quantized_weight().to(x.dtype), b)

    @torch.no_grad()
    def to_packed(self):
        """The packed ``onebit`` QuantizedLinear (its decoded weight equals :meth:`quantized_weight`, bit for bit)."""
        from ..nn import to_module

        qw = OneBitWeight(self.out_features, self.in_features, sign_bits(self.weight),
                          _fp16(self.out_scale.float()), _fp16(self.in_scale.float()))
        return to_module(self, qw)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onebit"


#: the trainable stand-ins a student holds (each has ``trainable()`` and ``to_packed()``)
TRAINABLE = (FakeQuantLinear, OneBitFakeLinear)
