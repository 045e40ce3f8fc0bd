"""Fast CPU kernels for packed formats, with a plain-torch reference for each.

- :mod:`.build`: compiles the C++/OpenMP/AVX2 extension once (cached under the
  lowbit cache) and registers ``torch.ops.lowbit.{gemm_int, gemm_lut,
  dequant_int, dequant_lut, isa, set_isa}``; falls back quietly without a compiler.
- :mod:`.layout`: the kernel layout derived at load time from the checkpoint layout.
- :mod:`.ops`: the scalar kernel layout and the kernel switches (``LOWBIT_KERNELS=0`` disables them all);
  :mod:`lowbit.nn.kernel_layouts` builds layouts from packed modules, and :class:`lowbit.nn.QuantizedLinear`
  calls them transparently (``module.use_kernels = False`` opts one module out).
- :mod:`.intmm`: exact INT8 x INT8 -> INT32 GEMM for the weight+activation methods (torch._int_mm or the
  hand-written kernel, chosen per shape by a timing at first use; ``LOWBIT_INTMM`` forces one).
- :mod:`.reference`: the plain-torch references.

``LOWBIT_KERNEL_ACT=q8`` makes the INT2/3/4 and 3-/4-bit table-format (FP, NF) GEMV kernels quantize their input to int8
per block of 32 (llama.cpp's Q8_0 scheme) and use integer dot products (``gemm_q8``); the
default ``fp32`` multiplies the float input exactly.
"""
from .build import load_kernels
from .ops import (
    FUSED_MAX_BATCH,
    KERNEL_ACTIVATIONS,
    ScalarKernelLayout,
    kernel_activations,
    kernels_active,
    kernels_enabled,
    use_kernel_activations,
)
from .vq_layout import VQKernelLayout

__all__ = [
    "FUSED_MAX_BATCH",
    "KERNEL_ACTIVATIONS",
    "ScalarKernelLayout",
    "VQKernelLayout",
    "kernel_activations",
    "kernels_active",
    "kernels_enabled",
    "load_kernels",
    "use_kernel_activations",
]
