"""Shared-scale block formats: OCP Microscaling (MXFP4, MXFP6, MXFP8, MXINT8) and NVIDIA's NVFP4.

A row is cut into blocks along the input dimension (the format's groups, of a size the format fixes); every
element of a block is a code of a small element type (a float's or an int8's bit pattern) and the block
shares one 8-bit scale code:

===========  =======  =====  ===========================  =========================================  ==============
tag          element  block  block scale                  weight                                     bits per weight
===========  =======  =====  ===========================  =========================================  ==============
mxfp4        e2m1     32     E8M0 ``2^(s-127)``           ``elem(c) * 2^(s-127)``                    4.25
mxfp6_e2m3   e2m3     32     E8M0                         same                                       6.25
mxfp6_e3m2   e3m2     32     E8M0                         same                                       6.25
mxfp8_e4m3   e4m3     32     E8M0                         same                                       8.25
mxfp8_e5m2   e5m2     32     E8M0                         same                                       8.25
mxint8       int8     32     E8M0                         ``(k / 64) * 2^(s-127)``, k in -127..127   8.25
nvfp4        e2m1     16     FP8 E4M3 ``d``, fp32 ``g``   ``(elem(c) * e4m3(d)) * g``                4.5 + 32/(rows*cols)
===========  =======  =====  ===========================  =========================================  ==============

Element values are a table of each code's value (:class:`~lowbit.formats.table.LevelGrid`), so dequantizing is a
lookup and one multiply by a power of two (MX) or by the block's scale (NVFP4).

Scales, MX (OCP Microscaling Formats spec v1.0, section 6.3): the block's shared exponent is
``floor(log2(max|x|)) - emax``, ``emax`` the exponent of the element type's largest normal (2 for e2m1 and
e2m3, 4 for e3m2, 8 for e4m3, 15 for e5m2, 0 for int8), clamped to E8M0's range -127..127 and stored biased by
127; an all-zero block stores code 0. Each element is ``x / 2^shared`` rounded to the nearest element value,
ties to even, and saturated to the largest normal (6 for e2m1: the block's largest element may be clipped
from up to ``8 * 2^shared``). MXINT8's elements are int8 with an implicit scale of 2^-6, used symmetrically
(-127..127; the code of -128 is never produced and decodes to 0).

Scales, NVFP4 (as NVIDIA's Model Optimizer quantizes it): a per-tensor fp32 ``g = max|W| / (6 * 448)`` (1 for
an all-zero weight), so every block scale fits E4M3; per block ``d = e4m3(max|x| / (6 g))`` (round to nearest
even, saturating at 448; 1 for an all-zero block, the smallest subnormal 2^-9 where it would round to 0); the
elements ``x / (d * g)`` rounded to e2m1 as above. ``g`` is a per-tensor parameter
(``ParamSpec("tensor_fp32")``): solvers take it from the whole weight (:meth:`NVFP4Format.for_weight`).

Every format here fixes its element type, block size and symmetry: ``--format mxfp4``; a ``--bits``,
``--group-size`` or ``--sym`` that disagrees is a ConfigError naming the fix.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import ConfigError
from .base import Format, ParamSpec
from .registry import register_format, register_preset
from .table import LevelGrid

__all__ = ["ElemType", "ELEMS", "MXFormat", "NVFP4Format", "MX_TAGS", "BLOCK_FORMATS", "e8m0_value", "E8M0_BIAS"]

#: E8M0's exponent bias: code ``s`` is ``2^(s - 127)``; 255 is NaN and never stored
E8M0_BIAS = 127


def _float_values(ebits: int, mbits: int, bias: int, special: str) -> tuple[float | None, ...]:
    """Value of every code (sign, exponent, mantissa bits) of a small float; None for NaN and infinity.
    ``special``: ``"none"`` (all codes finite: FP4, FP6), ``"fn"`` (OCP E4M3: only all-ones is NaN), ``"ieee"``
    (E5M2: the top exponent is infinity and NaN)."""
    out = []
    top = (1 << ebits) - 1
    for code in range(1 << (1 + ebits + mbits)):
        sign = -1.0 if code >> (ebits + mbits) else 1.0
        e, m = (code >> mbits) & top, code & ((1 << mbits) - 1)
        if (special == "ieee" and e == top) or (special == "fn" and e == top and m == (1 << mbits) - 1):
            out.append(None)
            continue
        mag = m / (1 << mbits) * 2.0 ** (1 - bias) if e == 0 else (1 + m / (1 << mbits)) * 2.0 ** (e - bias)
        out.append(sign * mag)
    return tuple(out)


@dataclass(frozen=True)
class ElemType:
    """An element type: name, code bits and the value of each code (None: not a number)."""

    name: str
    bits: int
    values: tuple[float | None, ...]

    @functools.cached_property
    def grid(self) -> LevelGrid:
        """Nearest value, ties to even, saturating; codes are the type's bit patterns."""
        return LevelGrid.from_codes(self.values, self.bits)

    @property
    def max_normal(self) -> float:
        return max(v for v in self.values if v is not None)

    @property
    def emax(self) -> int:
        """Exponent of the largest normal value, ``floor(log2(max_normal))``."""
        return math.frexp(self.max_normal)[1] - 1


ELEMS: dict[str, ElemType] = {e.name: e for e in (
    ElemType("e2m1", 4, _float_values(2, 1, 1, "none")),
    ElemType("e2m3", 6, _float_values(2, 3, 1, "none")),
    ElemType("e3m2", 6, _float_values(3, 2, 3, "none")),
    ElemType("e4m3", 8, _float_values(4, 3, 7, "fn")),
    ElemType("e5m2", 8, _float_values(5, 2, 15, "ieee")),
    # two's complement k / 64; -128 (code 0x80) left out so the range is symmetric
    ElemType("int8", 8, tuple(None if c == 128 else (c - 256 if c > 127 else c) / 64 for c in range(256))),
)}


def e8m0_value(code: torch.Tensor) -> torch.Tensor:
    """Float32 ``2^(code - 127)`` for E8M0 codes 0..254, built from the bit pattern (exact, 2^-127 subnormal)."""
    c = code.long()
    bits = torch.where(c > 0, c << 23, torch.full_like(c, 1 << 22))
    return bits.to(torch.int32).view(torch.float32)


@dataclass(frozen=True)
class _BlockFormat(Format):
    """A format whose name fixes its element type, block size (``group_size``) and symmetry."""

    bits: int = 4
    group_size: int = 32
    sym: bool = True

    ELEM: ClassVar[ElemType]

    def __post_init__(self):
        want = (self.ELEM.bits, type(self).group_size, True)
        if (self.bits, self.group_size, self.sym) != want:
            raise ConfigError(
                f"{self.name} has blocks of {want[1]} columns of {self.ELEM.name} ({want[0]}-bit) elements and one "
                f"scale, so its settings are bits={want[0]}, group_size={want[1]}, sym=True, not bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym} (the name {self.name} sets them; drop the others)")

    def spec(self) -> dict:
        return {"format": self.name, "bits": self.bits, "group_size": self.group_size, "sym": self.sym}

    def _elements(self, x: torch.Tensor) -> torch.Tensor:
        return self.ELEM.grid.nearest(x)

    def _levels(self, codes: torch.Tensor) -> torch.Tensor:
        return self.ELEM.grid.lut(codes.device)[codes.long()]


#: the MX formats: tag -> element type
MX_TAGS: dict[str, str] = {"mxfp4": "e2m1", "mxfp6_e2m3": "e2m3", "mxfp6_e3m2": "e3m2", "mxfp8_e4m3": "e4m3",
                           "mxfp8_e5m2": "e5m2", "mxint8": "int8"}


@dataclass(frozen=True)
class MXFormat(_BlockFormat):
    """OCP MX: one E8M0 shared exponent per block of 32 (module doc). ``elem`` picks the element type; each tag
    of :data:`MX_TAGS` is registered with its own, and the spec names the tag, not ``elem``.

    Parameter ``shared_exp``: the biased 8-bit code ``s``, ``(rows, G, 1)`` from :meth:`fit`; the block scale is
    ``2^(s - 127)``.
    """

    elem: str = "e2m1"

    def __post_init__(self):
        if self.elem not in MX_TAGS.values():
            raise ConfigError(f"MX element types are {', '.join(MX_TAGS.values())}, got {self.elem!r}")
        super().__post_init__()

    @property
    def name(self) -> str:
        return next(t for t, e in MX_TAGS.items() if e == self.elem)

    @property
    def ELEM(self) -> ElemType:
        return ELEMS[self.elem]

    def param_specs(self) -> dict[str, ParamSpec]:
        return {"shared_exp": ParamSpec("code", 8)}

    def fit(self, w, mask=None):
        """Shared exponent ``floor(log2(max|x|)) - emax`` per block (``mask`` unused: padding repeats a real
        column, so the maximum is unchanged)."""
        amax = w.float().abs().amax(dim=-1, keepdim=True)
        exp = torch.frexp(amax)[1] - 1 - self.ELEM.emax          # amax = m * 2^e, m in [0.5, 1)
        code = (exp + E8M0_BIAS).clamp(0, 2 * E8M0_BIAS)
        return {"shared_exp": torch.where(amax > 0, code, torch.zeros_like(code)).float()}

    def quantize(self, w, params):
        return self._elements(w.float() / e8m0_value(params["shared_exp"]))

    def dequantize(self, codes, params):
        return self._levels(codes) * e8m0_value(params["shared_exp"])


@dataclass(frozen=True)
class NVFP4Format(_BlockFormat):
    """NVFP4: e2m1 elements, an FP8 E4M3 scale per block of 16 and an fp32 scale per tensor (module doc).

    Parameters: ``block_scale``, the E4M3 code (8 bits); ``tensor_scale``, the float32 ``g``, the same in every
    ``(row, group)``. ``tensor_scale`` (not part of the spec) binds a format to one weight's ``g``
    (:meth:`for_weight`); unbound, :meth:`fit` takes ``g`` from the groups it is given.
    """

    bits: int = 4
    group_size: int = 16
    sym: bool = True
    tensor_scale: float | None = field(default=None, compare=False)

    name: ClassVar[str] = "nvfp4"
    ELEM: ClassVar[ElemType] = ELEMS["e2m1"]
    SCALE: ClassVar[ElemType] = ELEMS["e4m3"]

    def param_specs(self) -> dict[str, ParamSpec]:
        return {"block_scale": ParamSpec("code", 8), "tensor_scale": ParamSpec("tensor_fp32")}

    def global_scale(self, w: torch.Tensor) -> float:
        """``g = max|w| / (6 * 448)`` in float32 (1 for an all-zero weight)."""
        amax = w.detach().float().abs().max()
        g = float(amax / (self.ELEM.max_normal * self.SCALE.max_normal))
        return g if g > 0 else 1.0

    def for_weight(self, weight):
        return NVFP4Format(tensor_scale=self.global_scale(weight))

    def fit(self, w, mask=None):
        """E4M3 block scales ``max|x| / (6 g)`` and the tensor scale ``g`` (``mask`` unused)."""
        w = w.float()
        g = self.tensor_scale if self.tensor_scale is not None else self.global_scale(w)
        amax = w.abs().amax(dim=-1, keepdim=True)
        code = self.SCALE.grid.nearest(amax / (self.ELEM.max_normal * torch.tensor(g, dtype=torch.float32)))
        one = self.SCALE.grid.nearest(torch.ones(()))
        code = torch.where(amax == 0, one, torch.where(code == 0, torch.ones_like(code), code))
        return {"block_scale": code.float(), "tensor_scale": torch.full_like(amax, g)}

    def block_scale(self, params) -> torch.Tensor:
        """The E4M3 block scales as float32."""
        return self.SCALE.grid.lut(params["block_scale"].device)[params["block_scale"].long()]

    def quantize(self, w, params):
        return self._elements(w.float() / (self.block_scale(params) * params["tensor_scale"].float()))

    def dequantize(self, codes, params):
        """``(e2m1 * d) * g`` in float32, in this order (the first product is exact), as NVIDIA's dequantizers and
        llama.cpp (blocks, then the tensor scale) compute it."""
        return (self._levels(codes) * self.block_scale(params)) * params["tensor_scale"].float()


#: every block format by its tag (also its registered name): a callable taking the spec's fields
BLOCK_FORMATS = {**{t: functools.partial(MXFormat, bits=ELEMS[e].bits, elem=e) for t, e in MX_TAGS.items()},
                 "nvfp4": NVFP4Format}

for _tag, _make in BLOCK_FORMATS.items():
    register_format(_tag, _make)
    register_preset(_tag, _make().spec())
