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

import torch

from ..formats.codebook import VQWeight, code_bits
from ..packing import pack, packed_nbytes, unpack
from .codecs import check_dims, register_codec

__all__ = ["VQCodec"]

_FP16 = torch.float16


class VQCodec:
    def buffer_shapes(self, spec):
        out_f, in_f, v, k = check_dims(spec, "out_features", "in_features", "v", "k")
        n_out = spec.get("n_outlier", 0)
        if out_f % v or not 0 <= n_out <= in_f or (n_out and out_f % check_dims(spec, "v0")[0]):
            raise ValueError(f"vector length v={v} (v0 for outliers) must divide out_features={out_f} and "
                             f"n_outlier={n_out} lie within in_features={in_f}")
        n_main = in_f - n_out
        shapes = {
            "idx": ((packed_nbytes((out_f // v) * n_main, code_bits(k)),), torch.uint8),
            "codebook": ((k, v), _FP16),
        }
        if spec.get("k_res", 0):
            kr = spec["k_res"]
            shapes["res_idx"] = ((packed_nbytes((out_f // v) * n_main, code_bits(kr)),), torch.uint8)
            shapes["res_codebook"] = ((kr, v), _FP16)
        if n_out:
            v0, k0 = spec["v0"], spec["k0"]
            shapes["outlier_cols"] = ((packed_nbytes(n_out, code_bits(in_f)),), torch.uint8)
            shapes["out_idx"] = ((packed_nbytes((out_f // v0) * n_out, code_bits(k0)),), torch.uint8)
            shapes["out_codebook"] = ((k0, v0), _FP16)
        if spec.get("norm", False):
            shapes["col_scale"] = ((in_f,), _FP16)
            shapes["col_bias"] = ((in_f,), _FP16)
        return shapes

    def encode(self, qw: VQWeight, spec):
        bufs = {"idx": pack(qw.idx, code_bits(spec["k"])), "codebook": qw.codebook.to(_FP16)}
        if spec.get("k_res", 0):
            bufs["res_idx"] = pack(qw.res_idx, code_bits(spec["k_res"]))
            bufs["res_codebook"] = qw.res_codebook.to(_FP16)
        if spec.get("n_outlier", 0):
            bufs["outlier_cols"] = pack(qw.outlier_cols, code_bits(spec["in_features"]))
            bufs["out_idx"] = pack(qw.out_idx, code_bits(spec["k0"]))
            bufs["out_codebook"] = qw.out_codebook.to(_FP16)
        if spec.get("norm", False):
            bufs["col_scale"] = qw.col_scale.to(_FP16)
            bufs["col_bias"] = qw.col_bias.to(_FP16)
        return bufs

    def to_vq_weight(self, buffers, spec) -> VQWeight:
        """Unpacked codes with the stored codebooks (kept as given, so gradients can flow through them)."""
        out_f, in_f, v, k = spec["out_features"], spec["in_features"], spec["v"], spec["k"]
        n_out = spec.get("n_outlier", 0)
        n_main = in_f - n_out

        def codes(name, bits, rows, cols):
            return unpack(buffers[name], bits, rows * cols).view(rows, cols).long()

        qw = VQWeight(out_f, in_f, buffers["codebook"], codes("idx", code_bits(k), out_f // v, n_main))
        if spec.get("k_res", 0):
            qw.res_codebook = buffers["res_codebook"]
            qw.res_idx = codes("res_idx", code_bits(spec["k_res"]), out_f // v, n_main)
        if n_out:
            qw.outlier_cols = unpack(buffers["outlier_cols"], code_bits(in_f), n_out).long()
            qw.out_codebook = buffers["out_codebook"]
            qw.out_idx = codes("out_idx", code_bits(spec["k0"]), out_f // spec["v0"], n_out)
        if spec.get("norm", False):
            qw.col_scale, qw.col_bias = buffers["col_scale"], buffers["col_bias"]
        return qw

    def decode(self, buffers, spec):
        return self.to_vq_weight(buffers, spec).dequantize()


register_codec("vq", VQCodec())
