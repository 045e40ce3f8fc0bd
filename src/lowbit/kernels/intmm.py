"""Integer matmuls on CPU: INT8 x INT8 -> INT32, exact.

``int_mm(a, b)`` computes ``a @ b.T`` for int8 ``a`` ``(M, K)`` (values in
[-127, 127]) and int8 ``b`` ``(N, K)``, returning int32 ``(M, N)``. Paths:

- C++: a small C++/OpenMP extension (AVX2 ``maddubs``/``madd`` with the
  sign trick, see ``csrc/int8_gemm.cpp``), compiled once into the lowbit cache;
- float: the plain-torch reference: a float matmul of the integer codes,
  in float32 when ``K * max|a| * max|b| < 2**24`` (every partial sum is then
  an exactly representable integer) and float64 otherwise (exact to 2**53).

Why not torch: ``torch._int_mm`` exists on CPU in torch 2.x but is ~50x
slower than an fp32 matmul there, and ``torch.matmul`` on int32 ~7x slower
(measured on the project machine; see docs/flattenquant.md).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .build import build_once

__all__ = ["int_mm", "int_mm_reference", "load_intmm", "pad_k"]

_SRC = Path(__file__).parent / "csrc" / "int8_gemm.cpp"


def load_intmm():
    """The compiled extension module, or None (``LOWBIT_INTMM=0``, no compiler / failed build: a warning, once)."""
    if os.environ.get("LOWBIT_INTMM", "1") == "0":
        return None
    return build_once("lowbit_intmm", [_SRC], "lowbit int8 GEMM", "using the exact float reference", verbose=False)


def pad_k(t: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """Zero-pad the last dimension of ``t`` to a multiple of ``multiple`` (zeros add nothing to a dot product)."""
    pad = (-t.shape[-1]) % multiple
    return F.pad(t, (0, pad)) if pad else t


def int_mm_reference(a: torch.Tensor, b: torch.Tensor, amax: int = 127, bmax: int = 128) -> torch.Tensor:
    """Exact ``a @ b.T`` as int32 through a float matmul (see module doc for the exactness bound)."""
    exact32 = a.shape[-1] * amax * bmax < 2 ** 24
    dt = torch.float32 if exact32 else torch.float64
    return (a.to(dt) @ b.to(dt).T).to(torch.int32)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` exactly, int8 ``(M, K)`` x int8 ``(N, K)`` -> int32 ``(M, N)``.

    ``a`` must lie in [-127, 127] (the C++ path's no-saturation condition). The C++ path runs on CPU when it
    builds; otherwise the float reference.
    """
    mod = load_intmm() if a.device.type == "cpu" else None
    if mod is None:
        return int_mm_reference(a, b)
    return mod.gemm_s8s8s32(pad_k(a), b if b.shape[-1] % 32 == 0 else pad_k(b), True)
