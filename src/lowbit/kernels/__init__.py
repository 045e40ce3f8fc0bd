"""Fast CPU kernels for packed formats, with a plain-torch reference for each.

- :mod:`.build`: compiles the C++/OpenMP/AVX2 extension once (cached under the
  lowbit cache) and registers ``torch.ops.lowbit.{gemm_int, gemm_lut,
  dequant_int, dequant_lut, isa, set_isa}``; falls back quietly without a compiler.
- :mod:`.layout`: the kernel layout derived at load time from the checkpoint layout.
- :mod:`.ops`: per-module layout cache and :func:`kernel_linear`, which
  :class:`lowbit.nn.QuantizedLinear` calls transparently (disable with
  ``LOWBIT_KERNELS=0`` or ``module.use_kernels = False``).
- :mod:`.reference`: the plain-torch references.
"""
from .build import kernels_available, load_kernels
from .ops import (
    FUSED_MAX_BATCH,
    ScalarKernelLayout,
    build_layout,
    kernel_linear,
    kernels_active,
    kernels_enabled,
    layout_for,
    register_layout,
)
from .vq_layout import VQKernelLayout

__all__ = [
    "FUSED_MAX_BATCH",
    "ScalarKernelLayout",
    "VQKernelLayout",
    "build_layout",
    "kernel_linear",
    "kernels_active",
    "kernels_available",
    "kernels_enabled",
    "layout_for",
    "load_kernels",
    "register_layout",
]
