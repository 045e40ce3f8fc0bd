"""Weight codecs: how a quantized weight is laid out in plain buffers and rebuilt.

A codec is chosen by ``spec["codec"]``. It declares the buffers a layer
holds (names, shapes, dtypes) and how to rebuild the float weight from them.
The scalar codec covers every group-wise format; vector codecs (VQ) register
their own.
"""
from __future__ import annotations

import math
from typing import Callable, Protocol

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


#: a codec's buffers: ``name -> (bits, shape)`` for packed codes of that shape, ``(None, shape)`` for float16,
#: ``(FP32, shape)`` for float32 values kept as their bytes (uint8, 4 per value, the host's little-endian order:
#: a checkpoint stores float tensors at its storage precision, bytes as they are)
Layout = dict[str, tuple[int | str | None, tuple[int, ...]]]
FP32 = "fp32"


def check_dims(spec: dict, *keys: str) -> tuple[int, ...]:
    """``spec[key]`` for each key, each a positive integer, else ValueError (a spec read from a file)."""
    vals = tuple(spec[k] for k in keys)
    for k, v in zip(keys, vals):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")
    return vals


def packed_shapes(layout: Layout) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The stored shape and dtype of each buffer of ``layout`` (packed codes are flat uint8)."""
    def one(bits, shape):
        if bits == FP32:
            return (4 * math.prod(shape),), torch.uint8
        return ((packed_nbytes(math.prod(shape), bits),), torch.uint8) if bits else (shape, torch.float16)

    return {name: one(bits, shape) for name, (bits, shape) in layout.items()}


def pack_all(tensors: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """``tensors`` stored as ``layout`` says: integer codes packed, float32 values as bytes, the rest float16."""
    def one(t, bits):
        if bits == FP32:
            return t.detach().to(torch.float32).reshape(-1).contiguous().view(torch.uint8).clone()
        return pack(t.round().long(), bits) if bits else t.to(torch.float16)

    return {name: one(tensors[name], bits) for name, (bits, _) in layout.items()}


def unpack_all(buffers: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_all`: codes as int64 tensors of their shape, float32 values as float32, float16
    buffers as they are."""
    def one(t, bits, shape):
        if bits == FP32:
            return t.contiguous().clone().view(torch.float32).view(shape)
        return unpack(t, bits, math.prod(shape)).view(shape).long() if bits else t

    return {name: one(buffers[name], bits, shape) for name, (bits, shape) in layout.items()}


class FieldCodec:
    """A codec whose buffers are the fields of one weight object, named as ``layout(spec)`` names them (VQ,
    SpQR): ``encode`` packs those fields, :meth:`unpacked` gives them back; a subclass builds its weight and
    ``decode`` dequantizes it."""

    def __init__(self, layout: Callable[[dict], Layout]):
        self.layout = layout

    def buffer_shapes(self, spec):
        return packed_shapes(self.layout(spec))

    def encode(self, qw, spec):
        layout = self.layout(spec)
        return pack_all({name: getattr(qw, name) for name in layout}, layout)

    def unpacked(self, buffers, spec) -> dict[str, torch.Tensor]:
        return unpack_all(buffers, self.layout(spec))

    def to_weight(self, buffers, spec):
        raise NotImplementedError

    def decode(self, buffers, spec):
        return self.to_weight(buffers, spec).dequantize()


class ScalarCodec:
    """Group-wise scalar formats.

    Buffers: ``codes`` (packed ``out*in`` codes, row-major), and per stored
    parameter either an fp16 ``(out, n_groups)`` tensor (``(out, ceil(n_groups /
    span))`` for a parameter shared by ``span`` groups, a K-quant's super-block
    scale), a packed uint8 buffer of ``out*n_groups`` codes, or the 4 bytes of
    one float32 for a per-tensor parameter (NVFP4's tensor scale).
    """

    @staticmethod
    def _layout(fmt, spec: dict) -> Layout:
        out_f, in_f = check_dims(spec, "out_features", "in_features")
        if not isinstance(fmt.group_size, int) or isinstance(fmt.group_size, bool):
            raise ValueError(f"group_size must be an integer, got {fmt.group_size!r}")
        n_groups = group_layout(in_f, fmt.group_size).n_groups

        def param(ps):
            if ps.kind == "tensor_fp32":
                return FP32, (1,)
            return (None, (out_f, -(-n_groups // ps.span))) if ps.kind == "fp16" else (ps.bits, (out_f, n_groups))

        return {"codes": (fmt.bits, (out_f, in_f)), **{name: param(ps) for name, ps in fmt.param_specs().items()}}

    def buffer_shapes(self, spec):
        return packed_shapes(self._layout(make_format(spec["format"]), spec))

    def encode(self, qw: QuantizedWeight, spec):
        params = dict(qw.params)
        for name, ps in qw.fmt.param_specs().items():
            v = params[name]
            if ps.kind == "fp16" and ps.span > 1:   # one value per run of ``span`` groups: store it once
                kept = v[:, :: ps.span]
                if not torch.equal(kept.repeat_interleave(ps.span, dim=1)[:, : v.shape[1]], v):
                    raise ValueError(f"parameter {name!r} must be equal over each run of {ps.span} groups")
                params[name] = kept
            elif ps.kind == "tensor_fp32":          # one value for the whole weight
                kept = v.reshape(-1)[:1]
                if not torch.all(v == kept):
                    raise ValueError(f"parameter {name!r} is per tensor and must be equal in every group")
                params[name] = kept
        return pack_all({"codes": qw.codes, **params}, self._layout(qw.fmt, spec))

    def to_quantized_weight(self, buffers, spec) -> QuantizedWeight:
        fmt = make_format(spec["format"])
        t = unpack_all(buffers, self._layout(fmt, spec))
        n_groups = group_layout(spec["in_features"], fmt.group_size).n_groups
        codes = t.pop("codes")

        def param(name, ps):
            v = t[name].float()
            if ps.kind == "tensor_fp32":
                if not torch.isfinite(v).all():
                    raise CheckpointError(f"per-tensor parameter {name!r} is {v.item()}: the checkpoint is corrupt")
                return v.view(1, 1).expand(codes.shape[0], n_groups)
            return v.repeat_interleave(ps.span, dim=1)[:, :n_groups] if ps.kind == "fp16" else v

        return QuantizedWeight(fmt, codes, {name: param(name, ps) for name, ps in fmt.param_specs().items()})

    def decode(self, buffers, spec):
        return self.to_quantized_weight(buffers, spec).dequantize()


register_codec("scalar", ScalarCodec())

__all__ = ["Codec", "Layout", "FP32", "register_codec", "get_codec", "FieldCodec", "ScalarCodec", "check_dims", "packed_shapes", "pack_all",
           "unpack_all"]
