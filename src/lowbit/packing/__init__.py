"""Exact bit packing of unsigned integer codes (1..16 bits).

Layout (the canonical checkpoint layout): codes are flattened row-major and
split into bit planes of width 8, 4, 2 and 1 (a b-bit code uses the planes of
b's binary decomposition, low bits first: 3 = 2 + 1, 12 = 8 + 4). Each plane
is packed little-endian within a byte (code i of a 2-bit plane sits in bits
2*(i%4)..2*(i%4)+1 of byte i//4) and the planes are concatenated. A tensor of
n b-bit codes therefore takes exactly sum(ceil(n*w/8) for w in planes) bytes,
at most one pad byte per plane.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

__all__ = ["pack", "unpack", "packed_nbytes", "plane_widths"]


def plane_widths(bits: int) -> list[int]:
    """Bit-plane widths for a ``bits``-wide code, low bits first (e.g. 3 -> [2, 1]).

    The low plane takes the lowest bits: 3 -> [2, 1] means bits 0-1 in a
    2-bit plane and bit 2 in a 1-bit plane.
    """
    if not 1 <= bits <= 16:
        raise ConfigError(f"can only pack codes of 1..16 bits, got {bits}")
    out, rest = [], bits
    for w in (8, 4, 2, 1):
        while rest >= w:
            out.append(w)
            rest -= w
    return out


def _plane_nbytes(n: int, w: int) -> int:
    return (n * w + 7) // 8


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes used by ``n`` packed codes of ``bits`` bits."""
    return sum(_plane_nbytes(n, w) for w in plane_widths(bits))


def _pack_plane(vals: torch.Tensor, w: int) -> torch.Tensor:
    # vals: (n,) int32 in [0, 2**w); shifted they stay below 256, so the bytes are ORed as uint8
    per = 8 // w
    vals = vals.to(torch.uint8)
    pad = (-vals.numel()) % per
    if pad:
        vals = torch.cat([vals, vals.new_zeros(pad)])
    vals = vals.view(-1, per)  # (n_bytes, per)
    out = vals[:, 0].clone()
    for j in range(1, per):
        out |= vals[:, j] << (j * w)
    return out


def _unpack_plane(data: torch.Tensor, w: int, n: int) -> torch.Tensor:
    per = 8 // w
    shifts = torch.arange(per, device=data.device, dtype=torch.int32) * w
    vals = (data.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << w) - 1)  # (n_bytes, per)
    return vals.reshape(-1)[:n]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into a flat uint8 tensor.

    ``codes`` may have any shape; it is flattened row-major. The shape is not
    stored: callers keep it (the checkpoint JSON does).
    """
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel():
        lo, hi = (int(v) for v in torch.aminmax(flat))
        if lo < 0 or hi >= (1 << bits):
            raise ValueError(f"codes out of range for {bits}-bit packing: [{lo}, {hi}]")
    planes, shift = [], 0
    for w in plane_widths(bits):
        planes.append(_pack_plane((flat >> shift) & ((1 << w) - 1), w))
        shift += w
    return torch.cat(planes) if planes else flat.new_zeros(0, dtype=torch.uint8)


def unpack(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``n`` codes as a flat int32 tensor."""
    expected = packed_nbytes(n, bits)
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != expected:
        raise ValueError(
            f"packed buffer should be a flat uint8 tensor of {expected} bytes for {n} {bits}-bit codes, "
            f"got {tuple(data.shape)} {data.dtype}"
        )
    out = torch.zeros(n, dtype=torch.int32, device=data.device)
    off, shift = 0, 0
    for w in plane_widths(bits):
        nb = _plane_nbytes(n, w)
        out |= _unpack_plane(data[off : off + nb], w, n) << shift
        off += nb
        shift += w
    return out
