"""Non-uniform formats defined by a table of levels (FP4/FP3, NF4/NF3).

A table format maps each weight to the nearest entry of a fixed, sorted
table of levels times a per-group scale. Codes are indices into the sorted
table, so the dequantization is a lookup (a gather) followed by one multiply.

Two scale schemes, chosen by ``sym``:

- ``sym=True``: one fp16 ``scale`` per group, ``absmax / m`` with
  ``m = min(max(table), |min(table)|)``, so no weight of the group is clipped.
- ``sym=False`` (two-scale, as in AFPQ): ``scale_pos = max(w) / max(table)``
  for the non-negative weights and ``scale_neg = |min(w)| / |min(table)|``
  for the negative ones, so both extremes of the group land exactly on the
  table's extremes (up to the fp16 rounding of the scales).

``w ≈ table[code] * (scale_pos if table[code] > 0 else scale_neg)``; the
zero level needs no scale.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from .base import Format, ParamSpec

__all__ = ["TableFormat", "LevelGrid"]

#: smallest positive fp16 (subnormal) value: scales are clamped to it after fp16
#: rounding, so a stored scale is never 0 and equals the fitted one exactly
_MIN_SCALE = 2.0 ** -24


@functools.lru_cache(maxsize=128)
def _device_table(values: tuple, device: torch.device, midpoints: bool = False,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``values`` (or the float32 midpoints of consecutive ones) as a ``dtype`` tensor on ``device``, made once:
    GPTQ quantizes one column at a time, and a fresh host-to-device copy per column would stall a GPU.
    Callers must not modify it."""
    t = torch.tensor(values, dtype=dtype)
    return ((t[1:] + t[:-1]) / 2 if midpoints else t).to(device)


@dataclass(frozen=True)
class LevelGrid:
    """A sorted table of distinct levels, the code each level is stored as, and how ties round.

    ``levels``: sorted, distinct, containing 0. ``codes``: the stored code of each level (None: its index in
    ``levels``, as the ``fp``/``nf`` tables store them). ``ties_even``: a value exactly halfway between two
    levels goes to the one whose stored code is even, which is round-to-nearest-even when the codes are a
    float's or a two's-complement integer's bit patterns (consecutive levels differ by one in the code's last
    bit); otherwise it goes to the lower level. Values past the ends take the end levels (saturation).
    """

    levels: tuple[float, ...]
    bits: int
    codes: tuple[int, ...] | None = None
    ties_even: bool = False

    @classmethod
    def from_codes(cls, values, bits: int) -> "LevelGrid":
        """The grid of a code table: ``values[code]`` is the value of each of the ``2**bits`` codes (None for
        codes that are no number, NaN or infinity); a value held by several codes (+0 and -0) is stored as the
        lowest of them. Ties round to even."""
        first: dict[float, int] = {}
        for code, v in enumerate(values):
            if v is not None:
                first.setdefault(float(v), code)
        levels = tuple(sorted(first))
        return cls(levels, bits, tuple(first[v] for v in levels), ties_even=True)

    def lut(self, device=None) -> torch.Tensor:
        """Float32 ``(2**bits,)``: the level of each code, 0 for codes no level is stored as. Cached per device;
        callers must not modify it."""
        return _device_table(self._lut_values, torch.device(device or "cpu"))

    @functools.cached_property
    def _lut_values(self) -> tuple[float, ...]:
        lut = [0.0] * (1 << self.bits)
        for i, v in enumerate(self.levels):
            lut[i if self.codes is None else self.codes[i]] = v
        return tuple(lut)

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Int64 code of the level nearest to each element of ``x`` (ties as the class doc says)."""
        mids = _device_table(self.levels, x.device, midpoints=True)
        i = torch.bucketize(x, mids)          # mids[i-1] < x <= mids[i]: a tie goes to the lower level i
        if self.ties_even:
            at = i.clamp_max(len(mids) - 1)
            odd = _device_table(tuple(c & 1 for c in self.codes or range(len(self.levels))), x.device, dtype=torch.long)
            i = i + ((x == mids[at]) & (odd[i] == 1)).long()
        return i if self.codes is None else _device_table(self.codes, x.device, dtype=torch.long)[i]


@dataclass(frozen=True)
class TableFormat(Format):
    """Base for table formats. Subclasses set ``name`` and ``TABLES``.

    ``TABLES`` maps bits to a sorted tuple of distinct levels containing 0,
    at most ``2**bits`` long. Codes ``0..len(table)-1`` index the table;
    unused trailing codes (a table shorter than ``2**bits``) decode to 0 and
    are never produced by :meth:`quantize`.

    Parameters: ``sym=True`` -> ``{"scale"}``, ``sym=False`` ->
    ``{"scale_pos", "scale_neg"}``; all fp16, shape ``(rows, G, 1)`` from
    :meth:`fit` (``(rows, 1)`` when quantizing single columns).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False

    TABLES: ClassVar[dict[int, tuple[float, ...]]] = {}

    def __post_init__(self):
        if self.bits not in self.TABLES:
            have = ", ".join(str(b) for b in sorted(self.TABLES))
            raise ConfigError(f"{self.name} format supports bits in {{{have}}}, got {self.bits!r}")

    # -- the table -----------------------------------------------------------------

    @property
    def table(self) -> tuple[float, ...]:
        """The sorted distinct levels for ``bits``."""
        return self.TABLES[self.bits]

    @property
    def grid(self) -> LevelGrid:
        """The levels as a :class:`LevelGrid`: codes index the sorted table, ties go to the lower level."""
        return LevelGrid(self.table, self.bits)

    def lut(self, device=None) -> torch.Tensor:
        """Float32 lookup table of length ``2**bits``: level of each code (unused codes -> 0)."""
        return self.grid.lut(device if device is not None else torch.get_default_device()).clone()

    # -- Format interface ------------------------------------------------------------

    def param_specs(self) -> dict[str, ParamSpec]:
        if self.sym:
            return {"scale": ParamSpec("fp16")}
        return {"scale_pos": ParamSpec("fp16"), "scale_neg": ParamSpec("fp16")}

    def fit(self, w, mask=None):
        """Scales from each group's absmax (sym) or max and min (two-scale).

        ``mask`` is unused: padding repeats a real column, so max/min are unchanged.
        """
        w = w.float()
        tmax, tmin = max(self.table), min(self.table)
        if self.sym:
            amax = w.abs().amax(dim=-1, keepdim=True)
            return {"scale": self._fp16(amax / min(tmax, -tmin))}
        # a group without positive (negative) weights gets the minimal scale for that half; unused
        pos = w.amax(dim=-1, keepdim=True).clamp_min(0) / tmax
        neg = w.amin(dim=-1, keepdim=True).clamp_max(0) / tmin
        return {"scale_pos": self._fp16(pos), "scale_neg": self._fp16(neg)}

    @staticmethod
    def _fp16(s: torch.Tensor) -> torch.Tensor:
        return s.to(torch.float16).float().clamp_min(_MIN_SCALE)

    def _scales(self, params, w_or_levels: torch.Tensor) -> torch.Tensor:
        """Per-element scale: the group's scale, or the one for the element's sign (two-scale)."""
        if self.sym:
            return params["scale"].float()
        return torch.where(w_or_levels > 0, params["scale_pos"].float(), params["scale_neg"].float())

    def quantize(self, w, params):
        """Index of the nearest level to ``w / scale`` (ties go to the lower level)."""
        return self.grid.nearest(w.float() / self._scales(params, w))

    def dequantize(self, codes, params):
        """Table gather, then scale: ``lut[codes] * scale`` (scale by the level's sign for two-scale)."""
        levels = self.grid.lut(codes.device)[codes.long()]  # same shape as codes
        return levels * self._scales(params, levels)
