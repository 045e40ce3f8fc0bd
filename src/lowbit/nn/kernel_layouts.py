"""From a packed module's spec and buffers to the layout a CPU kernel reads, cached per module.

:class:`QuantizedLinear` asks :func:`kernel_linear` first for CPU float32 inputs; a codec with a kernel
registers a builder here (``scalar``: int and LUT formats, ``vq``: codebooks). The kernels themselves
(:mod:`lowbit.kernels`) know nothing about formats or codecs.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..formats import IntFormat, TableFormat, make_format
from ..kernels import kernels_active, load_kernels
from ..kernels.layout import KERNEL_BITS, kernel_geometry, repack_codes
from ..kernels.ops import ScalarKernelLayout, q8_tables
from ..kernels.vq_layout import VQKernelLayout, as_i16, padded_codebook
from .codecs import get_codec

__all__ = ["build_layout", "kernel_linear", "layout_for", "register_layout"]


def _scalar_layout(spec: dict, buffers: dict[str, torch.Tensor]) -> ScalarKernelLayout | None:
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
    common["q8"] = q8_tables(table)
    if fmt.sym:
        return ScalarKernelLayout("lut", scale_a=buffers["scale"].contiguous(), table=table, **common)
    return ScalarKernelLayout("lut", scale_a=buffers["scale_pos"].contiguous(),
                              scale_b=buffers["scale_neg"].contiguous(), table=table, **common)


def _vq_layout(spec: dict, buffers: dict[str, torch.Tensor]) -> VQKernelLayout | None:
    if buffers["codebook"].device.type != "cpu" or not load_kernels() or not hasattr(torch.ops.lowbit, "vq_linear"):
        return None
    if max(spec["k"], spec.get("k_res", 0), spec.get("k0", 0)) > 65536 or spec["v"] > 16:
        return None
    qw = get_codec("vq").to_vq_weight(buffers, spec)
    books = [qw.codebook] + ([qw.res_codebook] if qw.res_codebook is not None else [])
    dtype = torch.float16 if all(b.dtype == torch.float16 for b in books) else torch.float32  # the kernel's two
    lay = VQKernelLayout(spec["out_features"], spec["in_features"], spec["v"], as_i16(qw.idx),
                         padded_codebook(qw.codebook.detach(), dtype), qw.main_cols().contiguous())
    if qw.res_codebook is not None:
        lay.res_codes, lay.res_codebook = as_i16(qw.res_idx), padded_codebook(qw.res_codebook.detach(), dtype)
    if qw.n_outlier:
        lay.out_codes, lay.out_codebook = as_i16(qw.out_idx), qw.out_codebook.detach().float().contiguous()
        lay.outlier_cols, lay.v0 = qw.outlier_cols.contiguous(), spec["v0"]
    if qw.col_scale is not None:
        lay.col_scale = qw.col_scale.detach().float().contiguous()
        lay.col_bias = qw.col_bias.detach().float().contiguous()
    return lay


_LAYOUTS: dict[str, Callable] = {"scalar": _scalar_layout, "vq": _vq_layout}


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


def kernel_linear(module, x: torch.Tensor, max_rows: int | None = None) -> torch.Tensor | None:
    """``module(x)`` through a kernel layout, or ``None`` when none applies.

    Used by :meth:`lowbit.nn.QuantizedLinear.forward` for CPU float32 inputs that do not require grad.
    Layouts with a batch GEMM (table formats, ``gemm_capable``) take every row count and choose their path
    by measured timings (:meth:`lowbit.kernels.ops.ScalarKernelLayout.batch_path`); the others only inputs of
    at most ``max_rows`` rows (``None``: any).
    """
    if not kernels_active():
        return None
    lay = layout_for(module)
    if lay is None:
        return None
    if max_rows is not None and not getattr(lay, "gemm_capable", False) and x.numel() // x.shape[-1] > max_rows:
        return None
    return lay.linear(x, module.bias)
