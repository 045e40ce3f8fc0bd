"""Kernel dispatch for quantized layers: derived layouts, cached per module, and the ops.

:func:`kernel_linear` is what :class:`lowbit.nn.QuantizedLinear` calls on CPU float32
inputs. It builds (once per module, and again only when the module's buffers
change) a kernel layout from the layer's canonical buffers, and runs the fused
``torch.ops.lowbit`` kernel. It returns ``None`` whenever no kernel applies
(kernels disabled with ``LOWBIT_KERNELS=0``, extension not built, a format or bit
width without a kernel), and the caller then takes the plain-torch path.

Layouts are registered per codec (:func:`register_layout`): the ``scalar`` codec
(every group-wise int and table format at 2-4 bits) has one here; a vector
codec (VQ) adds its own builder returning an object with the same
``linear(x, bias)`` / ``nbytes`` interface.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..utils import env_var
from .build import kernel_module, load_kernels
from .layout import KERNEL_BITS, kernel_geometry, repack_codes
from .reference import dequant_ref

__all__ = [
    "FUSED_MAX_BATCH",
    "KERNEL_ACTIVATIONS",
    "ScalarKernelLayout",
    "build_layout",
    "check_kernel_activations",
    "kernel_activations",
    "kernel_linear",
    "kernels_active",
    "kernels_enabled",
    "layout_for",
    "register_layout",
    "use_kernel_activations",
]

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


def _scalar_layout(spec: dict, buffers: dict[str, torch.Tensor]) -> ScalarKernelLayout | None:
    from ..formats import IntFormat, TableFormat, make_format
    from ..nn.codecs import get_codec

    fmt = make_format(spec["format"])
    if fmt.bits not in KERNEL_BITS or not isinstance(fmt, (IntFormat, TableFormat)):
        return None
    if buffers["codes"].device.type != "cpu":
        return None
    out_f, in_f = spec["out_features"], spec["in_features"]
    qw = get_codec("scalar").to_quantized_weight(buffers, spec)
    codes = repack_codes(qw.codes, fmt.bits, fmt.group_size)
    geo = kernel_geometry(fmt.bits, fmt.group_size, in_f)
    common = dict(bits=fmt.bits, group_size=geo.group_size, in_features=in_f, out_features=out_f, codes=codes)
    if isinstance(fmt, IntFormat):
        if fmt.sym:
            zero = torch.full((out_f, geo.n_groups), 1 << (fmt.bits - 1), dtype=torch.uint8)
        else:
            zero = qw.params["zero"].round().to(torch.uint8).contiguous()
        return ScalarKernelLayout("int", scale_a=buffers["scale"].contiguous(), zero=zero, **common)
    table = fmt.lut()
    common["q8"] = q8_tables(table) if fmt.bits == 4 else None
    if fmt.sym:
        return ScalarKernelLayout("lut", scale_a=buffers["scale"].contiguous(), table=table, **common)
    return ScalarKernelLayout("lut", scale_a=buffers["scale_pos"].contiguous(),
                              scale_b=buffers["scale_neg"].contiguous(), table=table, **common)


_LAYOUTS: dict[str, Callable] = {"scalar": _scalar_layout}


def register_layout(codec: str, builder: Callable) -> None:
    """Register ``builder(spec, buffers) -> layout | None`` for layers of ``codec``.

    The layout needs ``linear(x, bias) -> Tensor`` (float32 ``x``) and ``nbytes``.
    """
    _LAYOUTS[codec] = builder


def build_layout(spec: dict, buffers: dict[str, torch.Tensor]):
    """The kernel layout for a layer, or ``None`` when no kernel handles its spec."""
    builder = _LAYOUTS.get(spec.get("codec"))
    return None if builder is None else builder(spec, buffers)


def _buffers_key(module) -> tuple:
    # identity + in-place version of every buffer: a load_state_dict, set_packed or
    # .to() changes one of them, and the cached layout is rebuilt
    return tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in module._buffers.values()
                 if t is not None)


def layout_for(module):
    """The module's cached kernel layout (built on first use; ``None`` if no kernel applies).

    Kept in the module's ``__dict__`` (not a buffer), so ``state_dict`` is unchanged.
    """
    key = _buffers_key(module)
    cached = module.__dict__.get("_kernel_layout")
    if cached is not None and cached[0] == key:
        return cached[1]
    lay = build_layout(module.spec, module.packed_buffers())
    module.__dict__["_kernel_layout"] = (key, lay)
    return lay


def kernel_linear(module, x: torch.Tensor) -> torch.Tensor | None:
    """``module(x)`` through a fused kernel, or ``None`` when none applies.

    Used by :meth:`lowbit.nn.QuantizedLinear.forward` for CPU float32 inputs that
    do not require grad.
    """
    if not kernels_active():
        return None
    lay = layout_for(module)
    if lay is None:
        return None
    return lay.linear(x, module.bias)
