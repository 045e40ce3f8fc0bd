"""SpQR's sparse-quantized weight (Dettmers et al., 2023): small groups, quantized statistics, sparse outliers.

Pure functions on tensors, shared by the SpQR solver (:mod:`lowbit.methods.spqr`), the ``spqr`` storage codec
(:mod:`lowbit.nn.spqr_codec`) and tests, so the numerics of quantizing and of the stored model cannot drift.

Layout of an ``(out, in)`` weight:

- **first level**: groups of ``group`` (β1) consecutive input columns per row; each (row, group) has a min-max
  scale ``s`` (the range widened to contain 0) and a real-valued zero ``z`` (not rounded): ``w = (q - z) * s``
  with ``q`` in ``[0, 2**bits)``;
- **second level**: the scales (and, separately, the zeros) of one column group are quantized to
  ``stat_bits`` with min-max over runs of ``stat_group`` (β2) consecutive rows: ``s = code * step + lo`` with an
  fp16 ``step`` and ``lo`` per (row run, column group); a short last run is padded with its last row;
- **outliers**: weights stored exactly (fp16) in a CSR-like sparse matrix, row by row in ascending column order:
  ``outlier_values`` (fp16), ``outlier_cols`` (column of each, 16 bits) and ``outlier_counts`` (outliers per
  row: the CSR row pointers as differences, ``row_ptr = cumsum``). Decoding replaces the dense value at each
  outlier's position by its stored value.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import group_layout

__all__ = ["SpQRWeight", "minmax_fit", "minmax_qdq", "quantize_stats", "dequantize_stats", "expand_groups",
           "SCALE_FLOOR"]

#: smallest first-level scale used (a dequantized scale of 0 would divide by zero); encoder and decoder both clamp
SCALE_FLOOR = 1e-8


def minmax_fit(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max asymmetric ``(scale, zero)`` over the last dim of ``w`` (kept as size 1); ``zero = -lo / scale``.

    The range ``[lo, hi]`` is widened to contain 0 (as GPTQ's quantizer does), so ``zero`` lies in
    ``[0, 2**bits - 1]`` even for a constant or one-signed group, and its second-level quantization stays well
    conditioned (a group of equal values would otherwise get a floor scale and a zero of ~1e8, beyond fp16)."""
    lo, hi = w.amin(-1, keepdim=True).clamp_max(0), w.amax(-1, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / ((1 << bits) - 1)).clamp_min(SCALE_FLOOR)
    return scale, -lo / scale


def minmax_qdq(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``w`` rounded with its own min-max fit over the last dim (unquantized statistics)."""
    scale, zero = minmax_fit(w, bits)
    return (torch.round(w / scale + zero).clamp(0, (1 << bits) - 1) - zero) * scale


def _row_runs(stats: torch.Tensor, stat_group: int) -> torch.Tensor:
    """``(out, G)`` -> ``(G, R, stat_group)``: each column group's rows in runs of ``stat_group``."""
    return group_layout(stats.shape[0], stat_group).to_groups(stats.T)


def quantize_stats(stats: torch.Tensor, stat_bits: int, stat_group: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second-level quantization of first-level statistics ``(out, G)``: ``(codes (out, G), step (R, G),
    lo (R, G))``, ``step``/``lo`` rounded to fp16 before the codes are chosen (the stored values)."""
    runs = _row_runs(stats.float(), stat_group)                       # (G, R, stat_group)
    lo = runs.amin(-1).half().float()                                 # (G, R)
    step = ((runs.amax(-1) - lo) / ((1 << stat_bits) - 1)).half().float()
    step = torch.where(step > 0, step, torch.ones_like(step))         # a constant run: any step, codes 0
    codes = torch.round((runs - lo[..., None]) / step[..., None]).clamp(0, (1 << stat_bits) - 1)
    codes = group_layout(stats.shape[0], stat_group).from_groups(codes).T   # (out, G)
    return codes.long(), step.T.contiguous(), lo.T.contiguous()


def dequantize_stats(codes: torch.Tensor, step: torch.Tensor, lo: torch.Tensor, stat_group: int) -> torch.Tensor:
    """Statistics ``(out, G)`` from their codes and the per-run ``step``/``lo`` ``(R, G)``."""
    out = codes.shape[0]
    return codes.float() * step.float().repeat_interleave(stat_group, 0)[:out] + lo.float().repeat_interleave(
        stat_group, 0)[:out]


def expand_groups(v: torch.Tensor, group: int, in_features: int) -> torch.Tensor:
    """Per-group values ``(out, G)`` repeated over each group's columns: ``(out, in)``."""
    return v.repeat_interleave(group, 1)[:, :in_features]


@dataclass
class SpQRWeight:
    """An SpQR-quantized ``(out, in)`` weight (see the module doc). Codes are int64; second-level statistics and
    outlier values are float tensors holding fp16 values."""

    out_features: int
    in_features: int
    bits: int
    group: int
    stat_bits: int
    stat_group: int
    codes: torch.Tensor             # (out, in) in [0, 2**bits)
    scale_codes: torch.Tensor       # (out, G) in [0, 2**stat_bits)
    zero_codes: torch.Tensor        # (out, G)
    scale_step: torch.Tensor        # (R, G) fp16 values
    scale_lo: torch.Tensor          # (R, G)
    zero_step: torch.Tensor         # (R, G)
    zero_lo: torch.Tensor           # (R, G)
    outlier_values: torch.Tensor    # (n,) fp16 values, row-major order
    outlier_cols: torch.Tensor      # (n,) column of each outlier
    outlier_counts: torch.Tensor    # (out,) outliers per row

    @property
    def n_outliers(self) -> int:
        return int(self.outlier_values.numel())

    def scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First-level ``(scale, zero)`` ``(out, G)`` as the dequantizer uses them."""
        s = dequantize_stats(self.scale_codes, self.scale_step, self.scale_lo, self.stat_group).clamp_min(SCALE_FLOOR)
        return s, dequantize_stats(self.zero_codes, self.zero_step, self.zero_lo, self.stat_group)

    def outlier_rows(self) -> torch.Tensor:
        """Row of each outlier ``(n,)`` (the CSR row pointers expanded)."""
        rows = torch.arange(self.out_features, device=self.outlier_counts.device)
        return rows.repeat_interleave(self.outlier_counts.long())

    def dequantize(self) -> torch.Tensor:
        """Float32 ``(out, in)``: the dense part, with every outlier's position holding its stored value."""
        s, z = self.scales_zeros()
        w = (self.codes.float() - expand_groups(z, self.group, self.in_features)) * expand_groups(
            s, self.group, self.in_features)
        if self.n_outliers:
            w[self.outlier_rows(), self.outlier_cols.long()] = self.outlier_values.float()
        return w

    def layer_spec(self) -> dict:
        """JSON-ready layer spec for the ``spqr`` codec (:mod:`lowbit.nn.spqr_codec`)."""
        return {"codec": "spqr", "out_features": self.out_features, "in_features": self.in_features,
                "bits": self.bits, "group": self.group, "stat_bits": self.stat_bits, "stat_group": self.stat_group,
                "n_outliers": self.n_outliers}
