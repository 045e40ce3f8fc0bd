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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import Format, quantize_rtn

__all__ = ["FakeQuantLinear", "fake_quant_weight"]


class _STE(torch.autograd.Function):
    """Forward: the quantized weight; backward: the gradient unchanged (straight-through)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, fmt: Format) -> torch.Tensor:
        # a custom Function (not w + (q - w).detach()) so the forward value is exactly q, bit for bit
        return quantize_rtn(w, fmt).dequantize().to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def fake_quant_weight(w: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``(out, in)`` weight rounded with ``fmt`` (params fitted on ``w``), straight-through gradient."""
    return _STE.apply(w, fmt)


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
