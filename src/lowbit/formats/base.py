"""The format interface: fit -> quantize -> dequantize on groups of weights.

A *format* turns a float group of weights into integer codes plus a few
per-group parameters, and back. Solvers (RTN, GPTQ, AWQ, ...) only talk to
this interface, so every solver works with every format.

Grouping convention (shared by every format): a weight ``W`` of shape
``(out, in)`` is split along the input dimension into groups of
``group_size`` columns (``-1``: one group per row). When ``group_size`` does
not divide ``in`` the last group is shorter; it is stored and counted like
any other. Grouped views are ``(out, n_groups, group_size)`` with the short
last group padded by repeating its last column (so min/max/absmax are
unchanged) and a mask marking real entries.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError

__all__ = ["Format", "ParamSpec", "GroupLayout", "group_layout"]


@dataclass(frozen=True)
class ParamSpec:
    """How one per-group parameter is stored.

    kind ``"fp16"``: a float16 tensor ``(out, n_groups)``; with ``span > 1`` one value per run of ``span``
    groups, ``(out, ceil(n_groups / span))`` (a K-quant's super-block scale, shared by its sub-blocks).
    kind ``"code"``: integers in ``[0, 2**bits)`` packed like weight codes.
    kind ``"tensor_fp32"``: one float32 value for the whole weight (NVFP4's per-tensor scale), stored as its 4
    bytes; in per-group views it is repeated over every ``(row, group)``.
    """

    kind: str
    bits: int = 16
    span: int = 1


@dataclass(frozen=True)
class GroupLayout:
    """Where the groups of an ``(out, in)`` weight fall along the input dimension."""

    in_features: int
    group_size: int  # effective size (in_features when per-channel)
    n_groups: int
    tail: int  # real columns in the last group

    @property
    def padded(self) -> int:
        return self.n_groups * self.group_size

    def column_group(self, device=None) -> torch.Tensor:
        """Group index of each input column, shape ``(in,)``."""
        return torch.arange(self.in_features, device=device) // self.group_size

    def to_groups(self, w: torch.Tensor) -> torch.Tensor:
        """``(rows, in)`` -> ``(rows, n_groups, group_size)``, short last group edge-padded."""
        pad = self.padded - self.in_features
        if pad:
            w = torch.cat([w, w[:, -1:].expand(w.shape[0], pad)], dim=1)
        return w.reshape(w.shape[0], self.n_groups, self.group_size)

    def from_groups(self, g: torch.Tensor) -> torch.Tensor:
        """``(rows, n_groups, group_size)`` -> ``(rows, in)`` dropping padding."""
        return g.reshape(g.shape[0], -1)[:, : self.in_features]

    def mask(self, device=None) -> torch.Tensor:
        """``(n_groups, group_size)`` bool, True on real (non-padding) entries."""
        m = torch.ones(self.n_groups, self.group_size, dtype=torch.bool, device=device)
        m[-1, self.tail :] = False
        return m


def group_layout(in_features: int, group_size: int) -> GroupLayout:
    """Layout for ``group_size`` (``-1`` = per output channel) over ``in_features`` columns."""
    if group_size == -1 or group_size >= in_features:
        return GroupLayout(in_features, in_features, 1, in_features)
    if group_size <= 0:
        raise ConfigError(
            f"group size must be a positive number of columns or -1 (one group per output channel), got {group_size}"
        )
    n = math.ceil(in_features / group_size)
    return GroupLayout(in_features, group_size, n, in_features - (n - 1) * group_size)


class Format(ABC):
    """A group-wise number format.

    Subclasses are small frozen dataclasses. ``fit`` computes per-group
    parameters from a grouped weight ``(rows, G, gs)`` and returns tensors of
    shape ``(rows, G, 1)``; ``quantize``/``dequantize`` broadcast those over
    the last dimension, so a solver can also call them on single columns
    ``(rows, 1)`` with parameters ``(rows, 1)``.
    """

    bits: int
    group_size: int

    #: registry name, set by subclasses
    name: ClassVar[str] = ""

    @abstractmethod
    def fit(self, w: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-group parameters for grouped weights ``w`` ``(rows, G, gs)``."""

    @abstractmethod
    def quantize(self, w: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Integer codes (int64) in ``[0, 2**bits)`` for ``w`` under ``params``."""

    @abstractmethod
    def dequantize(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Float weights for ``codes`` under ``params``."""

    @abstractmethod
    def param_specs(self) -> dict[str, ParamSpec]:
        """The stored per-group parameters and how each is stored."""

    @property
    def fit_span(self) -> int:
        """Groups whose parameters are fitted together (1: every group alone). A K-quant's sub-blocks share a
        super-block scale, so its ``fit`` takes whole super-blocks and solvers choose between candidates per
        span, never per group."""
        return 1

    def for_width(self, in_features: int) -> "Format":
        """The format a layer with rows of ``in_features`` columns is quantized with: ``self``, or the stated
        fallback of a format that needs some widths (a K-quant's super-blocks of 256 columns)."""
        return self

    def for_weight(self, weight: torch.Tensor) -> "Format":
        """The format a solver quantizes ``weight`` ``(out, in)`` with: :meth:`for_width`, bound to the weight's
        per-tensor parameters where the format has any (NVFP4's tensor scale, from the whole weight's absmax),
        so that fitting one group at a time (GPTQ) sees the same per-tensor value in every group."""
        return self.for_width(weight.shape[1])

    def layer_formats(self) -> tuple["Format", ...]:
        """Every format :meth:`for_width` can give (what a checkpoint made with this format may hold)."""
        return (self,)

    def spec(self) -> dict:
        """JSON-ready description (the checkpoint stores this)."""
        from dataclasses import asdict

        return {"format": self.name, **asdict(self)}

    def round_params(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameters as they will be stored (fp16 rounding), so fitting sees storage numerics."""
        out = {}
        for k, v in params.items():
            if self.param_specs()[k].kind == "fp16":
                v = v.to(torch.float16).to(v.dtype)
            out[k] = v
        return out

    def qdq(self, w: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Quantize then dequantize (the value a weight takes in the quantized model)."""
        return self.dequantize(self.quantize(w, params), params)
