"""Modules holding packed quantized weights as plain buffers."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .kernel_layouts import kernel_linear
from .codecs import get_codec

#: token count up to which QuantizedLinear uses the fused kernels of layouts without a batch GEMM (int, VQ;
#: env LOWBIT_KERNEL_MAX_TOKENS); table formats measure their crossovers instead
KERNEL_MAX_TOKENS = int(os.environ.get("LOWBIT_KERNEL_MAX_TOKENS", "16"))

__all__ = ["QuantizedLinear", "QuantizedEmbedding", "scalar_spec"]


def scalar_spec(fmt, out_features: int, in_features: int) -> dict:
    """Layer spec for a group-wise scalar format."""
    return {"codec": "scalar", "format": fmt.spec(), "out_features": out_features, "in_features": in_features}


class _PackedWeight(nn.Module):
    """Shared machinery: buffers from a codec spec, dequantization with a cache.

    ``spec`` is JSON-ready and fully describes the buffers, so a checkpoint
    rebuilds the module from the JSON alone. The dequantized weight is cached
    (not saved) for the plain-torch path; it is dropped whenever buffers are
    loaded.
    """

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        self.codec = get_codec(spec["codec"])
        for name, (shape, dtype) in self.codec.buffer_shapes(spec).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))
        self._wcache: torch.Tensor | None = None
        self.cache_weight = True

    def packed_buffers(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.codec.buffer_shapes(self.spec)}

    def set_packed(self, buffers: dict[str, torch.Tensor]) -> None:
        for n, t in buffers.items():
            setattr(self, n, t.to(getattr(self, n).device))
        self._drop_caches()

    def set_weight_cache(self, enabled: bool) -> None:
        """Cache the dequantized weight or not (not while buffers are being tuned); drops what it holds."""
        self.cache_weight = enabled
        self._wcache = None

    def dequantize_weight(self) -> torch.Tensor:
        """The float32 ``(out, in)`` weight this layer computes with."""
        w = self._wcache
        if w is None or w.device != next(iter(self.buffers())).device:
            w = self.codec.decode(self.packed_buffers(), self.spec).float()
            if self.cache_weight:
                self._wcache = w
        return w

    def _drop_caches(self) -> None:
        """Forget what was derived from the buffers (they are being loaded or moved)."""
        self._wcache = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._drop_caches()
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._drop_caches()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        f = self.spec.get("format", {})
        desc = ", ".join(f"{k}={v}" for k, v in f.items()) if f else self.spec["codec"]
        return f"in_features={self.spec['in_features']}, out_features={self.spec['out_features']}, {desc}"


class QuantizedLinear(_PackedWeight):
    """``y = x W^T + b`` with ``W`` stored packed (see :mod:`lowbit.nn.codecs`)."""

    def __init__(self, spec: dict, bias: bool = False):
        super().__init__(spec)
        self.in_features = spec["in_features"]
        self.out_features = spec["out_features"]
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None
        #: use the fused CPU kernels when one fits (see lowbit.kernels; LOWBIT_KERNELS=0 disables them all)
        self.use_kernels = True

    @classmethod
    def from_quantized(cls, qw, spec: dict, bias: torch.Tensor | None = None) -> "QuantizedLinear":
        m = cls(spec, bias=bias is not None)
        m.set_packed(m.codec.encode(qw, spec))
        if bias is not None:
            m.bias.data.copy_(bias.detach().float())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # table formats choose GEMV, LUT GEMM or the dequantized weight by measured timings per batch size
        # (lowbit.kernels.ops.BatchDispatcher); other kernels win where decode is memory-bound (few tokens),
        # and above KERNEL_MAX_TOKENS a cached dequantized weight through the BLAS GEMM is faster
        if self.use_kernels and x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
            y = kernel_linear(self, x, KERNEL_MAX_TOKENS)
            if y is not None:
                return y
        w = self.dequantize_weight()
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), b)


class QuantizedEmbedding(_PackedWeight):
    """Token embedding with the ``(num_embeddings, dim)`` table stored packed.

    The table is quantized like a linear weight with ``out = num_embeddings``
    and ``in = dim``. ``embed_scale`` keeps the multiplier some architectures
    (Gemma) apply inside their embedding module.
    """

    def __init__(self, spec: dict, padding_idx: int | None = None, embed_scale: float | None = None):
        super().__init__(spec)
        self.num_embeddings = spec["out_features"]
        self.embedding_dim = spec["in_features"]
        self.padding_idx = padding_idx
        self.embed_scale = embed_scale

    @classmethod
    def from_quantized(cls, qw, spec, padding_idx=None, embed_scale=None) -> "QuantizedEmbedding":
        m = cls(spec, padding_idx, embed_scale)
        m.set_packed(m.codec.encode(qw, spec))
        return m

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize_weight()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.dequantize_weight(), self.padding_idx)
        if self.embed_scale is not None:
            out = out * torch.tensor(self.embed_scale, dtype=out.dtype)
        return out


def to_module(lin: nn.Linear, qw) -> nn.Module:
    """A QuantizedLinear holding ``qw`` (a QuantizedWeight) and ``lin``'s bias.

    A method may instead return a finished module (e.g. QuantizedActLinear): it is used as is, given ``lin``'s bias.
    The new module lives on ``lin``'s device (a calibrated block keeps running on its compute device).
    """
    if isinstance(qw, nn.Module):
        if lin.bias is not None:
            qw.bias = nn.Parameter(lin.bias.detach().float().clone(), requires_grad=False)
        return qw.to(lin.weight.device)
    # vector codecs (VQ) carry their own layer spec; scalar formats use the group-wise codec
    spec = qw.layer_spec() if hasattr(qw, "layer_spec") else scalar_spec(qw.fmt, lin.out_features, lin.in_features)
    return QuantizedLinear.from_quantized(qw, spec, lin.bias).to(lin.weight.device)
