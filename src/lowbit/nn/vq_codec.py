"""The ``vq`` codec: vector-quantized weights (VPTQ) in plain buffers.

Spec keys (all JSON): ``out_features``, ``in_features``, ``v``, ``k``,
``k_res`` (0 = no residual codebook), ``n_outlier``, ``v0``, ``k0``
(outlier columns' own codebook), ``norm`` (per-input-column scale/bias).

Buffers (every one is counted by :mod:`lowbit.nn.bpw`):

==================  =====================================================  =========
name                content                                                dtype
==================  =====================================================  =========
``idx``             main codes ``(out//v, n_main)`` packed, ceil(log2 k)    uint8
``codebook``        ``(k, v)``                                              float16
``res_idx``         residual codes, packed at ceil(log2 k_res) bits        uint8
``res_codebook``    ``(k_res, v)``                                          float16
``outlier_cols``    ascending outlier column indices, packed at            uint8
                    ceil(log2 in) bits
``out_idx``         outlier codes ``(out//v0, n_outlier)`` packed          uint8
``out_codebook``    ``(k0, v0)``                                            float16
``col_scale``       ``(in,)`` per-input-column scale                        float16
``col_bias``        ``(in,)`` per-input-column offset                       float16
==================  =====================================================  =========

Optional buffers are absent when their feature is off. The column
permutation VPTQ visits columns in is not stored: codes are kept in
original column order, so decoding needs no permutation.
"""
from __future__ import annotations

from ..formats.codebook import VQWeight, code_bits
from .codecs import FieldCodec, Layout, check_dims, register_codec

__all__ = ["VQCodec"]


def _layout(spec: dict) -> Layout:
    """The buffers of a layer under ``spec``, in storage order; each is the :class:`VQWeight` field of its name."""
    out_f, in_f, v, k = check_dims(spec, "out_features", "in_features", "v", "k")
    n_out = spec.get("n_outlier", 0)
    if out_f % v or not 0 <= n_out <= in_f or (n_out and out_f % check_dims(spec, "v0")[0]):
        raise ValueError(f"vector length v={v} (v0 for outliers) must divide out_features={out_f} and "
                         f"n_outlier={n_out} lie within in_features={in_f}")
    main = (out_f // v, in_f - n_out)
    out = {"idx": (code_bits(k), main), "codebook": (None, (k, v))}
    if spec.get("k_res", 0):
        out["res_idx"] = (code_bits(spec["k_res"]), main)
        out["res_codebook"] = (None, (spec["k_res"], v))
    if n_out:
        out["outlier_cols"] = (code_bits(in_f), (n_out,))
        out["out_idx"] = (code_bits(spec["k0"]), (out_f // spec["v0"], n_out))
        out["out_codebook"] = (None, (spec["k0"], spec["v0"]))
    if spec.get("norm", False):
        out["col_scale"] = (None, (in_f,))
        out["col_bias"] = (None, (in_f,))
    return out


class VQCodec(FieldCodec):
    def __init__(self):
        super().__init__(_layout)

    def to_vq_weight(self, buffers, spec) -> VQWeight:
        """Unpacked codes with the stored codebooks (kept as given, so gradients can flow through them)."""
        return VQWeight(spec["out_features"], spec["in_features"], **self.unpacked(buffers, spec))

    to_weight = to_vq_weight


register_codec("vq", VQCodec())
