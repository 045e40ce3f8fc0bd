"""Weight codecs: how a quantized weight is laid out in plain buffers and rebuilt.

A codec is chosen by ``spec["codec"]``. It declares the buffers a layer
holds (names, shapes, dtypes) and how to rebuild the float weight from them.
The scalar codec covers every group-wise format; vector codecs (VQ) register
their own.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..errors import CheckpointError
from ..formats import QuantizedWeight, group_layout, make_format
from ..packing import pack, packed_nbytes, unpack


class Codec(Protocol):
    def buffer_shapes(self, spec: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]: ...
    def encode(self, qw, spec: dict) -> dict[str, torch.Tensor]: ...
    def decode(self, buffers: dict[str, torch.Tensor], spec: dict) -> torch.Tensor: ...


_CODECS: dict[str, Codec] = {}


def register_codec(name: str, codec: Codec) -> None:
    _CODECS[name] = codec


def get_codec(name: str) -> Codec:
    if name not in _CODECS:
        raise CheckpointError(f"unknown weight codec {name!r}; known: {', '.join(sorted(_CODECS))}")
    return _CODECS[name]


def check_dims(spec: dict, *keys: str) -> tuple[int, ...]:
    """``spec[key]`` for each key, each a positive integer, else ValueError (a spec read from a file)."""
    vals = tuple(spec[k] for k in keys)
    for k, v in zip(keys, vals):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")
    return vals


class ScalarCodec:
    """Group-wise scalar formats.

    Buffers: ``codes`` (packed ``out*in`` codes, row-major), and per stored
    parameter either an fp16 ``(out, n_groups)`` tensor (``(out, ceil(n_groups /
    span))`` for a parameter shared by ``span`` groups, a K-quant's super-block
    scale) or a packed uint8 buffer of ``out*n_groups`` codes.
    """

    def buffer_shapes(self, spec):
        fmt = make_format(spec["format"])
        out_f, in_f = check_dims(spec, "out_features", "in_features")
        if not isinstance(fmt.group_size, int) or isinstance(fmt.group_size, bool):
            raise ValueError(f"group_size must be an integer, got {fmt.group_size!r}")
        n_groups = group_layout(in_f, fmt.group_size).n_groups
        shapes = {"codes": ((packed_nbytes(out_f * in_f, fmt.bits),), torch.uint8)}
        for name, ps in fmt.param_specs().items():
            if ps.kind == "fp16":
                shapes[name] = ((out_f, -(-n_groups // ps.span)), torch.float16)
            else:
                shapes[name] = ((packed_nbytes(out_f * n_groups, ps.bits),), torch.uint8)
        return shapes

    def encode(self, qw: QuantizedWeight, spec):
        fmt = qw.fmt
        bufs = {"codes": pack(qw.codes, fmt.bits)}
        for name, ps in fmt.param_specs().items():
            v = qw.params[name]
            if ps.kind == "fp16" and ps.span > 1:
                kept = v[:, :: ps.span]
                if not torch.equal(kept.repeat_interleave(ps.span, dim=1)[:, : v.shape[1]], v):
                    raise ValueError(f"parameter {name!r} must be equal over each run of {ps.span} groups")
                v = kept
            bufs[name] = v.to(torch.float16) if ps.kind == "fp16" else pack(v.round().long(), ps.bits)
        return bufs

    def to_quantized_weight(self, buffers, spec) -> QuantizedWeight:
        fmt = make_format(spec["format"])
        out_f, in_f = spec["out_features"], spec["in_features"]
        n_groups = group_layout(in_f, fmt.group_size).n_groups
        codes = unpack(buffers["codes"], fmt.bits, out_f * in_f).view(out_f, in_f).long()
        params = {}
        for name, ps in fmt.param_specs().items():
            b = buffers[name]
            if ps.kind == "fp16":
                params[name] = b.float().repeat_interleave(ps.span, dim=1)[:, :n_groups] if ps.span > 1 else b.float()
            else:
                params[name] = unpack(b, ps.bits, out_f * n_groups).view(out_f, n_groups).float()
        return QuantizedWeight(fmt, codes, params)

    def decode(self, buffers, spec):
        return self.to_quantized_weight(buffers, spec).dequantize()


register_codec("scalar", ScalarCodec())

__all__ = ["Codec", "register_codec", "get_codec", "ScalarCodec", "check_dims"]
