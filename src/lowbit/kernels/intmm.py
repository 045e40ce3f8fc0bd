"""Integer matmuls on CPU: INT8 x INT8 -> INT32, exact.

``int_mm(a, b)`` computes ``a @ b.T`` for int8 ``a`` ``(M, K)`` (values in
[-127, 127]) and int8 ``b`` ``(N, K)``, returning int32 ``(M, N)``. Paths:

- ``"cpp"``: a small C++/OpenMP extension (AVX2 ``maddubs``/``madd`` with the
  sign trick, see ``csrc/int8_gemm.cpp``), compiled once into the lowbit cache;
- ``"float"``: the plain-torch reference: a float matmul of the integer codes,
  in float32 when ``K * max|a| * max|b| < 2**24`` (every partial sum is then
  an exactly representable integer) and float64 otherwise (exact to 2**53).

Why not torch: ``torch._int_mm`` exists on CPU in torch 2.x but is ~50x
slower than an fp32 matmul there, and ``torch.matmul`` on int32 ~7x slower
(measured on the project machine; see docs/flattenquant.md).
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["int_mm", "int_mm_reference", "intmm_available", "load_intmm", "pad_k"]

log = logging.getLogger(__name__)

_SRC = Path(__file__).parent / "csrc" / "int8_gemm.cpp"
_lock = threading.Lock()
_state: dict = {}


def load_intmm():
    """The compiled extension module, or None (no compiler / failed build: a warning, once)."""
    if "mod" in _state:
        return _state["mod"]
    with _lock:
        if "mod" not in _state:
            mod = None
            if os.environ.get("LOWBIT_INTMM", "1") != "0":
                try:
                    from .build import load_extension

                    mod = load_extension("lowbit_intmm", [_SRC], extra_cflags=["-O3", "-fopenmp"],
                                         extra_ldflags=["-fopenmp"], verbose=False)
                except Exception as e:  # no compiler or a failed build: use the float reference, never fail
                    msg = str(e).strip().splitlines()
                    log.warning("lowbit int8 GEMM unavailable (%s); using the exact float reference",
                                msg[-1] if msg else type(e).__name__)
            _state["mod"] = mod
    return _state["mod"]


def intmm_available() -> bool:
    return load_intmm() is not None


def pad_k(t: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """Zero-pad the last dimension of ``t`` to a multiple of ``multiple`` (zeros add nothing to a dot product)."""
    pad = (-t.shape[-1]) % multiple
    return F.pad(t, (0, pad)) if pad else t


def int_mm_reference(a: torch.Tensor, b: torch.Tensor, amax: int = 127, bmax: int = 128) -> torch.Tensor:
    """Exact ``a @ b.T`` as int32 through a float matmul (see module doc for the exactness bound)."""
    exact32 = a.shape[-1] * amax * bmax < 2 ** 24
    dt = torch.float32 if exact32 else torch.float64
    return (a.to(dt) @ b.to(dt).T).to(torch.int32)


def int_mm(a: torch.Tensor, b: torch.Tensor, path: str = "auto") -> torch.Tensor:
    """``a @ b.T`` exactly, int8 ``(M, K)`` x int8 ``(N, K)`` -> int32 ``(M, N)``.

    ``a`` must lie in [-127, 127] (the C++ path's no-saturation condition).
    ``path``: ``"auto"`` (C++ when it loads, on CPU), ``"cpp"``, ``"float"``.
    """
    if path == "float" or a.device.type != "cpu":
        return int_mm_reference(a, b)
    mod = load_intmm()
    if mod is None:
        if path == "cpp":
            raise RuntimeError("the int8 GEMM extension did not build (see the warning above)")
        return int_mm_reference(a, b)
    return mod.gemm_s8s8s32(pad_k(a), b if b.shape[-1] % 32 == 0 else pad_k(b), True)
