"""The ``billm`` and ``onebit`` codecs: 1-bit weights (:mod:`lowbit.formats.binary`) in plain buffers.

``billm`` spec keys (all JSON): ``out_features``, ``in_features``, ``block``, ``n_salient`` (salient columns in
the layer). With ``B = ceil(in / block)``:

================  ==================================================  ===================
name              content                                             stored as
================  ==================================================  ===================
``signs``         sign of every weight ``(out, in)``                  packed, 1 bit each
``res_signs``     second signs of the salient columns                 packed, 1 bit each
                  ``(out, n_salient)``
``split``         dense/sparse group of the other weights             packed, 1 bit each
                  ``(out, in - n_salient)``
``salient_cols``  salient-column bitmap ``(in,)``                     packed, 1 bit each
``scale_sal1``    first salient scale per (row, block) ``(out, B)``   float16
``scale_sal2``    second (residual) salient scale ``(out, B)``        float16
``scale_dense``   scale of the dense group ``(out, B)``               float16
``scale_sparse``  scale of the sparse group ``(out, B)``              float16
================  ==================================================  ===================

``res_signs`` is absent when ``n_salient`` is 0, ``split`` when every column is salient.

``onebit`` spec keys: ``out_features``, ``in_features``. Buffers: ``signs`` ``(out, in)`` packed at 1 bit,
``out_scale`` (g) ``(out,)`` and ``in_scale`` (h) ``(in,)`` float16.

Every buffer is counted by :mod:`lowbit.nn.bpw` at its stored size, so a layer's bpw is its bytes * 8 / weights.
"""
from __future__ import annotations

import math

from ..formats.binary import BiLLMWeight, OneBitWeight
from .codecs import FieldCodec, Layout, check_dims, register_codec

__all__ = ["BiLLMCodec", "OneBitCodec"]


def _billm_layout(spec: dict) -> Layout:
    """The buffers of a BiLLM layer under ``spec``, in storage order; each is the :class:`BiLLMWeight` field of
    its name."""
    out_f, in_f, block = check_dims(spec, "out_features", "in_features", "block")
    n = spec["n_salient"]
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= in_f:
        raise ValueError(f"n_salient must be an integer in [0, in_features={in_f}], got {n!r}")
    scales = (None, (out_f, math.ceil(in_f / block)))
    out = {"signs": (1, (out_f, in_f))}
    if n:
        out["res_signs"] = (1, (out_f, n))
    if n < in_f:
        out["split"] = (1, (out_f, in_f - n))
    out["salient_cols"] = (1, (in_f,))
    out.update(scale_sal1=scales, scale_sal2=scales, scale_dense=scales, scale_sparse=scales)
    return out


class BiLLMCodec(FieldCodec):
    def __init__(self):
        super().__init__(_billm_layout)

    def to_weight(self, buffers, spec) -> BiLLMWeight:
        t = self.unpacked(buffers, spec)
        out_f, in_f, n = spec["out_features"], spec["in_features"], spec["n_salient"]
        if int(t["salient_cols"].sum()) != n:
            raise ValueError(f"the salient-column bitmap has {int(t['salient_cols'].sum())} columns, the spec {n}")
        t.setdefault("res_signs", t["signs"].new_zeros(out_f, 0))
        t.setdefault("split", t["signs"].new_zeros(out_f, 0))
        return BiLLMWeight(out_f, in_f, spec["block"], **t)


def _onebit_layout(spec: dict) -> Layout:
    out_f, in_f = check_dims(spec, "out_features", "in_features")
    return {"signs": (1, (out_f, in_f)), "out_scale": (None, (out_f,)), "in_scale": (None, (in_f,))}


class OneBitCodec(FieldCodec):
    def __init__(self):
        super().__init__(_onebit_layout)

    def to_weight(self, buffers, spec) -> OneBitWeight:
        return OneBitWeight(spec["out_features"], spec["in_features"], **self.unpacked(buffers, spec))


register_codec("billm", BiLLMCodec())
register_codec("onebit", OneBitCodec())
