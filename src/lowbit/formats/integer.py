"""Uniform integer formats, symmetric and asymmetric."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from .base import Format, ParamSpec
from .registry import register_format

__all__ = ["IntFormat"]


@dataclass(frozen=True)
class IntFormat(Format):
    """b-bit uniform integers, per group.

    Asymmetric: ``w = (q - z) * s`` with ``q, z`` in ``[0, 2**b)``; the scale
    is fp16, the zero point is a b-bit integer (packed like the codes). The
    fitted range is widened to contain 0 so the zero point is representable.
    Symmetric: ``z = 2**(b-1)`` fixed and ``s = -p / 2**(b-1)``, ``p`` the group's
    weight of largest magnitude, which lands exactly on the level ``-2**(b-1)``
    (llama.cpp's Q4_0/Q8_0 rule): ``s`` is signed, so the grid's extra level serves
    whichever side the peak is on. Only the scale is stored.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    name: ClassVar[str] = "int"

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"int format supports 2..8 bits, got {self.bits!r}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def param_specs(self) -> dict[str, ParamSpec]:
        if self.sym:
            return {"scale": ParamSpec("fp16")}
        return {"scale": ParamSpec("fp16"), "zero": ParamSpec("code", self.bits)}

    def fit(self, w, mask=None, lo=None, hi=None):
        """Range from min/max of each group (``lo``/``hi`` override, for clipping searches)."""
        w = w.float()
        if self.sym:
            # the weight of largest magnitude lands exactly on the level -2**(b-1), so the scale takes the
            # opposite of its sign; with ``hi`` (a clip search's bound) the peak keeps its sign, at magnitude hi
            peak = torch.gather(w, -1, w.abs().argmax(dim=-1, keepdim=True))
            mag = peak.abs() if hi is None else hi
            scale = (torch.where(peak < 0, mag, -mag) / (1 << (self.bits - 1))).to(torch.float16).float()
            return {"scale": torch.where(scale == 0, torch.full_like(scale, 2.0 ** -14), scale)}  # all-zero group
        # the range always contains 0, so the integer zero point stays in [0, 2**b)
        lo = (w.amin(dim=-1, keepdim=True) if lo is None else lo).clamp_max(0)
        hi = (w.amax(dim=-1, keepdim=True) if hi is None else hi).clamp_min(0)
        scale = ((hi - lo) / self.maxq).clamp_min(1e-8)
        scale = scale.to(torch.float16).float().clamp_min(1e-8)
        zero = torch.round(-lo / scale).clamp(0, self.maxq)
        return {"scale": scale, "zero": zero}

    def _zero(self, params, like):
        if self.sym:
            return torch.full_like(params["scale"], float(1 << (self.bits - 1)))
        return params["zero"].to(like.dtype)

    def quantize(self, w, params):
        s = params["scale"]
        return torch.clamp(torch.round(w / s) + self._zero(params, s), 0, self.maxq).long()

    def dequantize(self, codes, params):
        s = params["scale"].float()
        return (codes.float() - self._zero(params, s)) * s


register_format("int", IntFormat)
