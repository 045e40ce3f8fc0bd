"""The scalar kernel layout (packed int/LUT codes in the kernels' block order) and the kernel switches.

A :class:`ScalarKernelLayout` runs one fused ``torch.ops.lowbit`` GEMV/GEMM (float32 or int8-quantized
input, ``LOWBIT_KERNEL_ACT``). Building a layout from a packed module, and caching it per module, is
:mod:`lowbit.nn.kernel_layouts`; ``LOWBIT_KERNELS=0`` disables every kernel (:func:`kernels_enabled`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..utils import env_var
from .build import kernel_module, load_kernels
from .intmm import _time_once
from .reference import dequant_ref

__all__ = ["BATCH_PATHS", "BatchDispatcher", "FUSED_MAX_BATCH", "MAX_TIMED_ROWS", "batch_dispatcher", "batch_path_mode", "KERNEL_ACTIVATIONS", "Q8_MAX_LEVEL", "Q8Tables", "ScalarKernelLayout", "check_kernel_activations", "kernel_activations", "kernels_active", "kernels_enabled", "q8_tables", "use_kernel_activations"]

log = logging.getLogger(__name__)

#: inputs with more rows than this never use the fused GEMV/GEMM (it decodes every weight again for each
#: few input rows); int layouts then dequantize the weight and use torch's matmul
FUSED_MAX_BATCH = 128

#: how a table-format layer multiplies a batch (``LOWBIT_BATCH_PATH`` forces one; ``auto`` measures):
#: ``fused`` the GEMV kernel (``gemm_lut``), ``tile`` the LUT GEMM (``gemm_lut_tiled`` mode 0: a tile of
#: weights decoded once and reused for the whole batch), ``mm`` the same tiles multiplied by torch's BLAS
#: (mode 1), ``dense`` the dequantized weight (kept once chosen) and ``F.linear``
BATCH_PATHS = ("fused", "tile", "mm", "dense")
#: the largest row count a batch decision is timed at (larger batches share its decision)
MAX_TIMED_ROWS = 1024


def batch_path_mode() -> str:
    """``LOWBIT_BATCH_PATH``: ``auto`` (unset: measure) or one of :data:`BATCH_PATHS`."""
    v = os.environ.get("LOWBIT_BATCH_PATH", "auto").strip().lower() or "auto"
    if v != "auto" and v not in BATCH_PATHS:
        raise ValueError(f"LOWBIT_BATCH_PATH must be auto or one of {', '.join(BATCH_PATHS)}; got {v!r}")
    return v


def _bucket(rows: int) -> int:
    """The row count a decision is timed at: ``rows`` rounded up to a power of two, at most :data:`MAX_TIMED_ROWS`."""
    return min(1 << max(rows - 1, 0).bit_length(), MAX_TIMED_ROWS)


@dataclass
class BatchDispatcher:
    """The batch path per (layer signature, threads, row bucket), measured once per process.

    A signature is a layout's format and shape (:meth:`ScalarKernelLayout.signature`), so layers of the same
    shape and format share one measurement. The first call of a bucket times every candidate path on random
    inputs of the bucket's row count (each the minimum of 3 calls after a warm-up; the candidates are computed
    from the layout, so the timing uses that layer's weights) and keeps the fastest. ``decisions`` maps each
    measured key to ``(path, {path: seconds})``: the crossovers are where the chosen path changes.
    """

    decisions: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def clear(self) -> None:
        with self._lock:
            self.decisions.clear()

    def choose(self, lay: "ScalarKernelLayout", rows: int) -> str:
        key = (lay.signature(), torch.get_num_threads(), _bucket(rows))
        hit = self.decisions.get(key)
        if hit is None:
            with self._lock:
                hit = self.decisions.get(key)
                if hit is None:
                    hit = self.decisions[key] = self._measure(lay, key[2])
        return hit[0]

    @staticmethod
    def _measure(lay: "ScalarKernelLayout", rows: int) -> tuple[str, dict[str, float]]:
        x = torch.randn(rows, lay.in_features, generator=torch.Generator().manual_seed(0))
        w = lay.dequantize()
        times = {}
        for path in lay.batch_paths(rows):
            fn = (lambda: F.linear(x, w)) if path == "dense" else (lambda p=path: lay.run_path(p, x, None))
            times[path] = _time_once(fn)
        best = min(times, key=times.get)
        log.debug("%s at %d rows: %s (%s)", lay.signature(), rows, best,
                  ", ".join(f"{p} {t * 1e6:.0f} us" for p, t in times.items()))
        return best, times


#: the process-wide batch dispatcher of :class:`ScalarKernelLayout`
batch_dispatcher = BatchDispatcher()


#: ``LOWBIT_KERNEL_ACT`` values: ``fp32`` multiplies the float input exactly (the default);
#: ``q8`` quantizes the input to int8 per block of 32 (llama.cpp's Q8_0 scheme) for integer dot
#: products, on INT2/3/4 and the 3- and 4-bit table formats (see ``gemm_q8`` and :func:`q8_tables`)
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


#: the largest integer level of a ``gemm_q8`` table: four products of a level and an int8 input
#: (4 * 64 * 127) still fit vpmaddubsw's int16 sums
Q8_MAX_LEVEL = 64


class Q8Tables(NamedTuple):
    """A table format's levels as ``gemm_q8`` multiplies them (see :func:`q8_tables`).

    The kernel's level of code ``q`` is ``level_pos * pos[q] - level_neg * neg[q]``; ``pos`` and ``neg``
    are uint8 ``(16,)`` (a 3-bit table fills the first 8, the rest are 0).
    """

    pos: torch.Tensor
    neg: torch.Tensor
    level_pos: float
    level_neg: float
    exact: bool  # every level is represented exactly (FP4, FP3); else rounded (NF)

    def levels(self) -> torch.Tensor:
        """The levels the kernel multiplies, float32 ``(16,)``."""
        return self.level_pos * self.pos.float() - self.level_neg * self.neg.float()


def _integer_side(mag: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One side's magnitudes (``>= 0``) as ``(ints <= Q8_MAX_LEVEL, step)``: exact when they are integer multiples
    of 1, 1/2 or 1/4; else the step in ``[max / 64, max / 48]`` with the least squared rounding error."""
    top = float(mag.max())
    if top == 0.0:
        return torch.zeros_like(mag, dtype=torch.uint8), 1.0
    for k in (1, 2, 4):
        lv = mag * k
        if bool((lv == lv.round()).all()) and top * k <= Q8_MAX_LEVEL:
            return lv.to(torch.uint8), 1.0 / k
    ks = torch.linspace(0.75 * Q8_MAX_LEVEL / top, Q8_MAX_LEVEL / top, 513, dtype=torch.float64)  # (K,)
    m = mag.double()
    err = ((torch.round(ks[:, None] * m) / ks[:, None] - m) ** 2).sum(dim=1)  # (K,)
    k = float(ks[int(err.argmin())])
    return torch.round(m * k).clamp(max=Q8_MAX_LEVEL).to(torch.uint8), float(torch.tensor(1.0 / k, dtype=torch.float32))


def q8_tables(table: torch.Tensor) -> Q8Tables | None:
    """The int8-activation kernel's integer tables of a 3- or 4-bit table format, or ``None`` (more than 16 levels).

    Positive levels and the magnitudes of negative levels are kept as integers up to
    :data:`Q8_MAX_LEVEL` times a step per side, so each side meets its own scale (two-scale formats) in
    the kernel. FP4 (e2m1, step 1/2) and FP3 (step 1) are exact; NF levels are rounded to the nearest of
    48-64 steps of the largest (at most 1/96 of the largest level off), which changes the weight the kernel
    multiplies: :func:`lowbit.kernels.reference.dequant_q8_ref` is that weight.
    """
    t = table.float().flatten()
    if t.numel() > 16:
        return None
    t = torch.cat([t, t.new_zeros(16 - t.numel())])
    pos, lp = _integer_side(t.clamp_min(0))
    neg, ln = _integer_side((-t).clamp_min(0))
    q = Q8Tables(pos, neg, lp, ln, exact=False)
    return q._replace(exact=bool(torch.equal(q.levels(), t)))


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
    #: a table format's levels as integers for ``gemm_q8`` (see :func:`q8_tables`)
    q8: Q8Tables | None = None
    #: the dequantized weight, kept once the ``dense`` batch path is chosen for this layer
    dense: torch.Tensor | None = field(default=None, repr=False)

    def signature(self) -> tuple:
        """What a batch decision depends on: the format and the shape."""
        return (self.kind, self.bits, self.group_size, self.scale_b is not None, self.out_features,
                self.in_features)

    @property
    def gemm_capable(self) -> bool:
        """Whether the LUT GEMM (``gemm_lut_tiled``) handles this layout: table formats."""
        return self.kind == "lut"

    def batch_paths(self, rows: int) -> tuple[str, ...]:
        """The paths a batch of ``rows`` may take (see :data:`BATCH_PATHS`)."""
        fused = ("fused",) if rows <= FUSED_MAX_BATCH else ()
        return fused + (("tile", "mm") if self.gemm_capable else ()) + ("dense",)

    def batch_path(self, rows: int) -> str:
        """The path for ``rows`` input rows: forced by ``LOWBIT_BATCH_PATH`` or measured (:class:`BatchDispatcher`).

        One row is always the GEMV (``fused``). Layouts without a GEMM kernel (int codes) keep the fixed
        rule: fused up to :data:`FUSED_MAX_BATCH` rows, else ``dense``.
        """
        if rows <= 1:
            return "fused"
        if not self.gemm_capable:
            return "fused" if rows <= FUSED_MAX_BATCH else "dense"
        mode = batch_path_mode()
        if mode != "auto":
            if mode not in self.batch_paths(rows):
                raise ValueError(f"LOWBIT_BATCH_PATH={mode}: not available for {rows} rows of this layer "
                                 f"(available: {', '.join(self.batch_paths(rows))})")
            return mode
        return batch_dispatcher.choose(self, rows)

    def run_path(self, path: str, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias`` through one path of :data:`BATCH_PATHS` (float32 exact inputs)."""
        ops = kernel_module()
        if path == "dense" or ops is None:
            if self.dense is None:
                self.dense = self.dequantize()
            return F.linear(x, self.dense, bias)
        if path == "fused":
            if self.kind == "int":
                return ops.gemm_int(x, self.codes, self.scale_a, self.zero, bias, self.bits, self.group_size,
                                    self.in_features)
            return ops.gemm_lut(x, self.codes, self.scale_a, self.scale_b, self.table, bias, self.bits,
                                self.group_size, self.in_features)
        if path not in ("tile", "mm") or not self.gemm_capable:
            raise ValueError(f"batch path {path!r} is not one of {', '.join(self.batch_paths(2))}")
        return ops.gemm_lut_tiled(x, self.codes, self.scale_a, self.scale_b, self.table, bias, self.bits,
                                  self.group_size, self.in_features, 0 if path == "tile" else 1)

    @property
    def q8_capable(self) -> bool:
        """Whether ``gemm_q8`` (int8 activations) handles this layout: 2-, 3- and 4-bit INT, 3- and 4-bit tables."""
        if self.kind == "int":
            return self.bits in (2, 3, 4)
        return self.bits in (3, 4) and self.q8 is not None

    @property
    def q8_args(self) -> tuple:
        """``(pos, neg, level_pos, level_neg)`` of ``gemm_q8``: the tables, or ``None``s for int codes."""
        return tuple(self.q8[:4]) if self.q8 is not None else (None, None, 1.0, 1.0)

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
        """``x @ W.T + bias`` for float32 ``x`` ``(..., in)``, through :meth:`batch_path`'s path.

        With ``LOWBIT_KERNEL_ACT=q8`` batches of up to :data:`FUSED_MAX_BATCH` rows take the fused kernel with
        int8-quantized inputs (``gemm_q8``), as before; larger ones multiply exact inputs.
        """
        ops = kernel_module()   # the torch ops' functions, bound directly (no dispatcher cost per call)
        rows = x.numel() // self.in_features
        q8 = self.q8_capable and kernel_activations() == "q8"
        if ops is None:
            path = "dense"
        elif q8 and rows <= FUSED_MAX_BATCH:
            path = "fused"   # int8 inputs: the fused kernel, as for one row
        else:
            path = self.batch_path(rows)
        if path == "fused" and q8:
            return ops.gemm_q8(x, self.codes, self.scale_a, self.scale_b, self.zero, *self.q8_args, bias,
                               self.bits, self.group_size, self.in_features)
        if path == "dense" and self.dense is None and not self.gemm_capable:
            return F.linear(x, self.dequantize(), bias)   # int codes: not kept (the old large-batch rule)
        return self.run_path(path, x, bias)
