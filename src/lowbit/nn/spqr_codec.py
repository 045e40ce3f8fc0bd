"""The ``spqr`` codec: SpQR weights (:class:`lowbit.formats.spqr.SpQRWeight`) in plain buffers.

Spec keys (all JSON): ``out_features``, ``in_features``, ``bits``, ``group`` (β1), ``stat_bits``,
``stat_group`` (β2), ``n_outliers``. With ``G = ceil(in / group)`` and ``R = ceil(out / stat_group)``:

==================  ====================================================  ==========================
name                content                                               stored as
==================  ====================================================  ==========================
``codes``           weight codes ``(out, in)``                            packed, ``bits`` each
``scale_codes``     first-level scales ``(out, G)``                       packed, ``stat_bits`` each
``zero_codes``      first-level zeros ``(out, G)``                        packed, ``stat_bits`` each
``scale_step``      second-level step of the scales ``(R, G)``            float16
``scale_lo``        second-level minimum of the scales ``(R, G)``         float16
``zero_step``       second-level step of the zeros ``(R, G)``             float16
``zero_lo``         second-level minimum of the zeros ``(R, G)``          float16
``outlier_values``  outlier weights ``(n,)``, row-major                   float16
``outlier_cols``    their columns ``(n,)``                                packed, 16 bits each
``outlier_counts``  outliers per row ``(out,)`` (CSR row pointers as      packed, ``ceil(log2(in+1))``
                    differences)                                          bits each
==================  ====================================================  ==========================

The outlier buffers are absent when ``n_outliers`` is 0. Every buffer is counted by :mod:`lowbit.nn.bpw` at its
stored size, so a layer's bpw is exactly its bytes * 8 / weights.
"""
from __future__ import annotations

import math

from ..formats.codebook import code_bits
from ..formats.spqr import SpQRWeight
from .codecs import FieldCodec, Layout, check_dims, register_codec

__all__ = ["SpQRCodec", "OUTLIER_COL_BITS"]

#: bits of an outlier's column index (int16-sized: widths up to 65,536)
OUTLIER_COL_BITS = 16


def _layout(spec: dict) -> Layout:
    """The buffers of a layer under ``spec``, in storage order; each is the :class:`SpQRWeight` field of its name."""
    out_f, in_f, bits, group, stat_bits, stat_group = check_dims(
        spec, "out_features", "in_features", "bits", "group", "stat_bits", "stat_group")
    n = spec["n_outliers"]
    if bits > 8 or stat_bits > 8 or in_f > 1 << OUTLIER_COL_BITS or not isinstance(n, int) or not 0 <= n <= out_f * in_f:
        raise ValueError(f"spqr spec out of range: bits {bits} and stat_bits {stat_bits} at most 8, in_features "
                         f"{in_f} at most 65536, n_outliers {n!r} in [0, out*in]")
    stats = (math.ceil(out_f / stat_group), math.ceil(in_f / group))
    out = {"codes": (bits, (out_f, in_f)),
           "scale_codes": (stat_bits, (out_f, stats[1])), "zero_codes": (stat_bits, (out_f, stats[1])),
           "scale_step": (None, stats), "scale_lo": (None, stats), "zero_step": (None, stats), "zero_lo": (None, stats)}
    if n:
        out["outlier_values"] = (None, (n,))
        out["outlier_cols"] = (OUTLIER_COL_BITS, (n,))
        out["outlier_counts"] = (code_bits(in_f + 1), (out_f,))
    return out


class SpQRCodec(FieldCodec):
    def __init__(self):
        super().__init__(_layout)

    def to_spqr_weight(self, buffers, spec) -> SpQRWeight:
        t = self.unpacked(buffers, spec)
        if not spec["n_outliers"]:
            empty = t["codes"].new_zeros(0)
            t.update(outlier_values=empty.half(), outlier_cols=empty,
                     outlier_counts=t["codes"].new_zeros(spec["out_features"]))
        return SpQRWeight(spec["out_features"], spec["in_features"], spec["bits"], spec["group"], spec["stat_bits"],
                          spec["stat_group"], **t)

    to_weight = to_spqr_weight


register_codec("spqr", SpQRCodec())
