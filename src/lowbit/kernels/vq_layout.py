"""Kernel layout for ``vq`` (VPTQ) layers and its fused GEMV (``torch.ops.lowbit.vq_linear``).

Derived at load time from the checkpoint buffers (:mod:`lowbit.nn.vq_codec`), which do not change:

- main (and residual) codes unpacked to int16 ``(out // v, n_main)`` holding the 16-bit index bit
  pattern (indices are at most 16 bits; the packed checkpoint keeps ``ceil(log2 k)`` bits);
- codebooks with rows zero-padded to 8 or 16 values (one or two AVX2 registers), kept in float16 when
  the checkpoint stores them so (main and residual; exact, and half the bytes per index), else float32;
- the outlier codebook as float32 ``(k0, v0)``; column norm as float32 vectors.

The kernel computes ``y = W x + b`` for the weight :meth:`lowbit.formats.codebook.VQWeight.dequantize`
returns, without building it: every index adds one codebook row, scaled by one (column-scaled)
input, into ``v`` outputs (``src/lowbit/kernels/csrc/vq_ops.cpp``). Its memory traffic is the int16
codes plus the codebooks, which stay in cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .build import kernel_module

__all__ = ["VQKernelLayout"]


def as_i16(idx: torch.Tensor) -> torch.Tensor:
    """Indices ``< 2**16`` as int16 with the same 16-bit pattern (the low half of each little-endian int32)."""
    return idx.to(torch.int32).contiguous().view(torch.int16)[..., 0::2].contiguous()


def padded_codebook(cb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    k, v = cb.shape
    vp = 8 if v <= 8 else 16  # the builder takes v <= 16 only
    out = torch.zeros(k, vp, dtype=dtype)
    out[:, :v] = cb.to(dtype)
    return out


@dataclass
class VQKernelLayout:
    out_features: int
    in_features: int
    v: int
    codes: torch.Tensor
    codebook: torch.Tensor
    main_cols: torch.Tensor
    res_codes: torch.Tensor | None = None
    res_codebook: torch.Tensor | None = None
    out_codes: torch.Tensor | None = None
    out_codebook: torch.Tensor | None = None
    outlier_cols: torch.Tensor | None = None
    col_scale: torch.Tensor | None = None
    col_bias: torch.Tensor | None = None
    v0: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes one call reads: codes of every kind, codebooks, column norm."""
        ts = (self.codes, self.codebook, self.res_codes, self.res_codebook, self.out_codes, self.out_codebook,
              self.col_scale, self.col_bias)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + bias`` for float32 ``x`` ``(..., in)``."""
        return kernel_module().vq_linear(x, self.codes, self.codebook, self.res_codes, self.res_codebook,
                                         self.main_cols, self.out_codes, self.out_codebook, self.outlier_cols,
                                         self.col_scale, self.col_bias, bias, self.v, self.v0)
