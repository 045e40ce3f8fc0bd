"""The scalar kernel layout (packed int/LUT codes in the kernels' block order) and the kernel switches.

A :class:`ScalarKernelLayout` runs one fused ``torch.ops.lowbit`` GEMV/GEMM (float32 or int8-quantized
input, ``LOWBIT_KERNEL_ACT``). Building a layout from a packed module, and caching it per module, is
:mod:`lowbit.nn.kernel_layouts`; ``LOWBIT_KERNELS=0`` disables every kernel (:func:`kernels_enabled`).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..utils import env_var
from .build import kernel_module, load_kernels
from .reference import dequant_ref

__all__ = ["FUSED_MAX_BATCH", "KERNEL_ACTIVATIONS", "ScalarKernelLayout", "check_kernel_activations", "kernel_activations", "kernels_active", "kernels_enabled", "use_kernel_activations"]

#: inputs with more rows than this dequantize the weight (fast, exact) and use
#: torch's matmul: at prefill sizes the GEMM is compute-bound and BLAS wins
FUSED_MAX_BATCH = 128


#: ``LOWBIT_KERNEL_ACT`` values: ``fp32`` multiplies the float input exactly (the default);
#: ``q8`` quantizes the input to int8 per block of 32 (llama.cpp's Q8_0 scheme) for integer dot
#: products, on INT2/3/4 and FP4 (levels that are small integers; see ``gemm_q8``)
KERNEL_ACTIVATIONS = ("fp32", "q8")


def check_kernel_activations(mode: str, what: str) -> str:
    """``mode`` if it is one of :data:`KERNEL_ACTIVATIONS`, else a ConfigError ``"<what>: use one of ..."``."""
    if mode not in KERNEL_ACTIVATIONS:
        from ..errors import ConfigError

        raise ConfigError(f"{what}: use one of {', '.join(KERNEL_ACTIVATIONS)}")
    return mode


def kernel_activations() -> str:
    """The input precision of the fused GEMV kernels: ``LOWBIT_KERNEL_ACT`` (``fp32`` or ``q8``)."""
    mode = os.environ.get("LOWBIT_KERNEL_ACT", "fp32")
    # called on every GEMV: the error text is built only for a bad value
    return mode if mode in KERNEL_ACTIVATIONS else check_kernel_activations(mode, f"LOWBIT_KERNEL_ACT={mode!r}")


@contextlib.contextmanager
def use_kernel_activations(mode: str | None):
    """Run a block with ``LOWBIT_KERNEL_ACT=mode`` (``None``: leave it as it is)."""
    if mode is None:
        yield
        return
    with env_var("LOWBIT_KERNEL_ACT", check_kernel_activations(mode, f"kernel activations {mode!r}")):
        yield


def q8_tables(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(pos, neg, level_scale)`` for the int8-activation kernel, or ``None`` if the table has none.

    The levels must be integer multiples of ``level_scale`` (1, 1/2 or 1/4) of at most 64 in
    magnitude (FP4 e2m1: twice the level, ``level_scale = 0.5``); NF tables are not, and keep the
    float kernel.
    """
    for k in (1, 2, 4):
        lv = table.float() * k
        if bool((lv == lv.round()).all()) and float(lv.abs().max()) <= 64:
            return lv.clamp_min(0).to(torch.uint8), (-lv).clamp_min(0).to(torch.uint8), 1.0 / k
    return None


def kernels_enabled() -> bool:
    """``False`` when ``LOWBIT_KERNELS=0`` (forces the plain-torch reference path)."""
    return os.environ.get("LOWBIT_KERNELS", "1") != "0"


def kernels_active(op: str | None = None) -> bool:
    """Kernels enabled, the extension loaded and (when named) ``torch.ops.lowbit.<op>`` registered."""
    return kernels_enabled() and load_kernels() and (op is None or hasattr(torch.ops.lowbit, op))


@dataclass
class ScalarKernelLayout:
    """A group-wise scalar weight in kernel layout (see :mod:`lowbit.kernels.layout`).

    kind ``"int"``: ``w = (q - zero) * scale_a``; ``zero`` uint8 ``(out, G)``.
    kind ``"lut"``: ``w = table[q] * scale_a`` or, with ``scale_b`` (two-scale),
    ``table[q] * (scale_a if table[q] > 0 else scale_b)``; ``table`` float32 ``(2**bits,)``.
    Scales are the stored fp16 ``(out, G)`` tensors.
    """

    kind: str
    bits: int
    group_size: int
    in_features: int
    out_features: int
    codes: torch.Tensor
    scale_a: torch.Tensor
    scale_b: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    table: torch.Tensor | None = None
    #: ``(pos, neg, level_scale)`` of a 4-bit table format with integer levels (see :func:`q8_tables`)
    q8: tuple | None = None

    @property
    def q8_capable(self) -> bool:
        """Whether ``gemm_q8`` (int8 activations) handles this layout: 2-, 3- and 4-bit INT, or a 4-bit
        table with small integer levels (FP4). (FP3's integer levels would fit, but a table path for
        3-bit codes measured no faster than the float kernel, so FP3 keeps it.)"""
        if self.kind == "int":
            return self.bits in (2, 3, 4)
        return self.bits == 4 and self.q8 is not None

    @property
    def nbytes(self) -> int:
        """Bytes the kernel streams per call (codes + per-group parameters)."""
        ts = (self.codes, self.scale_a, self.scale_b, self.zero)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def dequantize(self) -> torch.Tensor:
        """Float32 ``(out, in)`` weight, bitwise equal to the format's dequantize."""
        if not load_kernels():
            return dequant_ref(self)
        if self.kind == "int":
            return torch.ops.lowbit.dequant_int(self.codes, self.scale_a, self.zero, self.bits, self.group_size,
                                                self.in_features)
        return torch.ops.lowbit.dequant_lut(self.codes, self.scale_a, self.scale_b, self.table, self.bits,
                                            self.group_size, self.in_features)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + bias`` for float32 ``x`` ``(..., in)``."""
        ops = kernel_module()   # the torch ops' functions, bound directly (no dispatcher cost per call)
        if ops is None or x.numel() // self.in_features > FUSED_MAX_BATCH:
            return F.linear(x, self.dequantize(), bias)
        if self.q8_capable and kernel_activations() == "q8":
            pos, neg, ls = self.q8 or (None, None, 1.0)
            return ops.gemm_q8(x, self.codes, self.scale_a, self.scale_b, self.zero, pos, neg, ls, bias,
                               self.bits, self.group_size, self.in_features)
        if self.kind == "int":
            return ops.gemm_int(x, self.codes, self.scale_a, self.zero, bias, self.bits, self.group_size,
                                self.in_features)
        return ops.gemm_lut(x, self.codes, self.scale_a, self.scale_b, self.table, bias, self.bits,
                            self.group_size, self.in_features)
