"""DGQ's A8W4 linear: dual-grained int4 weights (:mod:`lowbit.formats.dual_grained`) through the int8 GEMM.

``QuantizedDGQLinear`` is a :class:`lowbit.nn.w8a8.QuantizedActLinear` whose int8 weight operand is made once from
the stored int4 codes and int8 group scales, ``w8[r, j] = c[r, j] * k[r, j // g]`` (always within int8), and whose
per-channel scale is the fp16 channel scale ``s``. Everything else is the W8A8 path's: per-token dynamic int8
activation codes, the exact INT8 x INT8 -> INT32 GEMM of :func:`lowbit.kernels.intmm.int_linear` (its backend
chosen per shape) and one float rescale per (token, output channel):

    y = (qa @ w8^T) * (s_a outer s) + b

Stored buffers (``codec: "dgq_linear"``):

- ``qweight`` uint8 ``(out, Kp / 2)``: the signed int4 codes as nibbles (low nibble = even column), ``Kp`` = the
  input width rounded up to 32 with zero columns (:func:`lowbit.nn.w8a8.padded_k`);
- ``group_scale`` int8 ``(out, G)``: the integer group scales ``k`` in ``[-15, 16]``, ``G = ceil(in / g)``;
- ``w_scale`` float16 ``(out,)``: the channel scales ``s``.

So a layer takes ``4 * Kp / in + 8 * G / in + 16 / in`` bits per weight (4.097 for 576 x 576 at g128). At run time
it also holds the int8 operand (a byte per weight; not saved, dropped when the buffers change), like a W4A4 layer.
"""
from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..formats import group_layout
from ..formats.dual_grained import K_MAX, K_MIN, DualGrained, group_index
from .codecs import check_dims, register_codec
from .w8a8 import QuantizedActLinear, pack_int4, padded_k, unpack_int4

__all__ = ["QuantizedDGQLinear", "dgq_spec", "from_dual_grained"]


def dgq_spec(in_features: int, out_features: int, group_size: int) -> dict:
    """JSON-ready spec of a DGQ A8W4 layer: int4 weights in groups of ``group_size``, per-token int8 activations."""
    return {"codec": "dgq_linear", "in_features": in_features, "out_features": out_features, "w_bits": 4,
            "a_bits": 8, "group_size": group_size, "dynamic": True, "flat_features": in_features, "flatten": False}


class _DGQCodec:
    """Buffers of a QuantizedDGQLinear (checkpoints validate them like any codec's)."""

    def buffer_shapes(self, spec):
        in_f, out_f, g = check_dims(spec, "in_features", "out_features", "group_size")
        if spec.get("w_bits") != 4 or spec.get("a_bits") != 8 or not spec.get("dynamic") or spec.get("flatten"):
            raise ValueError("a dgq_linear layer is W4 A8 with per-token dynamic activations, unflattened")
        if spec.get("flat_features") != in_f:
            raise ValueError("flat_features must equal in_features")
        return {"qweight": ((out_f, padded_k(in_f) // 2), torch.uint8),
                "group_scale": ((out_f, group_layout(in_f, g).n_groups), torch.int8),
                "w_scale": ((out_f,), torch.float16)}

    def decode(self, buffers, spec):
        """The float32 ``(out, in)`` weight ``c * k * s``."""
        in_f = spec["in_features"]
        k = buffers["group_scale"]
        idx = group_index(in_f, spec["group_size"], k.shape[1], k.device)
        q = unpack_int4(buffers["qweight"])[:, :in_f].float()
        return q * k.float()[:, idx] * buffers["w_scale"].float()[:, None]


register_codec("dgq_linear", _DGQCodec())


class QuantizedDGQLinear(QuantizedActLinear):
    """A8W4 linear with dual-grained weight scales and an int8 GEMM (see module doc)."""

    def int_weight(self) -> torch.Tensor:
        """Signed int8 ``c * k`` ``(out, Kp)``, row-major, made from the nibbles once and kept (padding columns 0).

        Group scales outside ``[-15, 16]`` (an edited checkpoint) could overflow int8: refused."""
        w = self._w8
        if w is None or w.device != self.qweight.device:
            k = self.group_scale
            if bool(((k < K_MIN) | (k > K_MAX) | (k == 0)).any()):
                raise CheckpointError(f"DGQ group scales must lie in [{K_MIN}, {K_MAX}] without 0; "
                                      "the checkpoint is corrupt")
            q = unpack_int4(self.qweight)                                             # (out, Kp) int8
            idx = group_index(q.shape[1], self.spec["group_size"], k.shape[1], q.device)
            w = self._w8 = (q.to(torch.int16) * k.to(torch.int16)[:, idx]).to(torch.int8)
        return w

    def extra_repr(self) -> str:
        sp = self.spec
        return (f"in_features={sp['in_features']}, out_features={sp['out_features']}, "
                f"DGQ W4 g{sp['group_size']} (int8 group scales) A8 (dynamic), mode={self.mode}")


def from_dual_grained(dg: DualGrained) -> QuantizedDGQLinear:
    """A QuantizedDGQLinear holding ``dg`` (codes zero-padded to ``padded_k`` columns)."""
    out_f, in_f = dg.codes.shape
    m = QuantizedDGQLinear(dgq_spec(in_f, out_f, dg.group_size))
    q = torch.zeros(out_f, padded_k(in_f), dtype=torch.int8)
    q[:, :in_f] = dg.codes.cpu()
    m.qweight = pack_int4(q)
    m.group_scale = dg.group_int.cpu().to(torch.int8).clone()
    m.w_scale = dg.channel_scale.cpu().to(torch.float16).clone()
    return m
