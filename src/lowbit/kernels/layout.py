"""Kernel-friendly layouts, derived at load time from the canonical checkpoint layout.

The checkpoint keeps codes in bit planes over the flattened ``(out, in)`` weight
(:mod:`lowbit.packing`). The CPU kernels want, for each output row, the codes of
each group contiguous and arranged so that eight consecutive columns land in the
eight 32-bit lanes of an AVX2 register with a single load and a shift. This module
builds that layout; the checkpoint format does not change.

Kernel layout of the codes, ``(out, row_bytes)`` uint8:

- each row is ``n_groups`` groups; a group is padded with code 0 to
  ``gsp = roundup(group_size, 32)`` columns (the last, possibly shorter group to
  ``roundup(its width, 32)``) and cut into blocks of 32 codes;
- inside a block, code ``c = 8*j + l`` (column ``c`` of the block) sits in lane ``l``
  (0..7), chunk ``j`` (0..3):

  ======  ========  ==================================================================
  bits    bytes     lane ``l`` holds
  ======  ========  ==================================================================
  4       16        uint16 at bytes ``2l, 2l+1``; code ``(j, l)`` in bits ``4j..4j+3``
  2       8         byte ``l``; code ``(j, l)`` in bits ``2j..2j+1``
  3       12        the low two bits as for 2 bits (8 bytes), then one uint32 whose
                    bit ``4l + j`` is bit 2 of code ``(j, l)``
  ======  ========  ==================================================================

so a block takes exactly ``4 * bits`` bytes. Padding codes meet zero-padded inputs
in the kernel, so they add nothing.

Per-group parameters stay as stored: fp16 scales ``(out, G)``; the integer zero
point is unpacked to uint8 ``(out, G)`` (symmetric: the constant ``2**(bits-1)``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KERNEL_BITS", "KernelGeometry", "kernel_geometry", "repack_codes", "unpack_kernel_codes"]

#: code widths the kernels handle
KERNEL_BITS = (2, 3, 4)


@dataclass(frozen=True)
class KernelGeometry:
    """Where groups and blocks fall in a kernel-layout row."""

    bits: int
    in_features: int
    group_size: int   # effective (in_features when per-channel)
    n_groups: int
    gsp: int          # padded width of every group but the last
    last_padded: int  # padded width of the last group

    @property
    def padded(self) -> int:
        """Padded row width in codes."""
        return (self.n_groups - 1) * self.gsp + self.last_padded

    @property
    def row_bytes(self) -> int:
        return self.padded // 32 * 4 * self.bits

    def padded_columns(self, device=None) -> torch.Tensor:
        """Position of each real column in the padded row, ``(in,)`` int64."""
        c = torch.arange(self.in_features, device=device)
        return (c // self.group_size) * self.gsp + c % self.group_size


def kernel_geometry(bits: int, group_size: int, in_features: int) -> KernelGeometry:
    # the groups of lowbit.formats.group_layout: -1 (or a group wider than the row) is one group per row,
    # and a group size that does not divide the width leaves a shorter last group
    gs = in_features if group_size == -1 or group_size >= in_features else group_size
    n_groups = -(-in_features // gs)
    tail = in_features - (n_groups - 1) * gs
    return KernelGeometry(bits, in_features, gs, n_groups, -(-gs // 32) * 32, -(-tail // 32) * 32)


def _le_bytes(v: torch.Tensor, n: int) -> torch.Tensor:
    """``(..., k)`` integers -> ``(..., k * n)`` uint8, little-endian."""
    shifts = torch.arange(n, device=v.device, dtype=torch.int64) * 8
    return ((v.to(torch.int64).unsqueeze(-1) >> shifts) & 255).to(torch.uint8).flatten(-2)


def repack_codes(codes: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Integer codes ``(out, in)`` -> kernel layout ``(out, row_bytes)`` uint8 (see module doc)."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"kernel layout supports {KERNEL_BITS} bits, got {bits}")
    out_f, in_f = codes.shape
    geo = kernel_geometry(bits, group_size, in_f)
    padded = torch.zeros(out_f, geo.padded, dtype=torch.int64, device=codes.device)
    padded[:, geo.padded_columns(codes.device)] = codes.to(torch.int64)
    q = padded.view(out_f, -1, 4, 8)  # (out, blocks, j, l)
    j = torch.arange(4, device=codes.device).view(1, 1, 4, 1)
    if bits == 4:
        lanes = (q << (4 * j)).sum(dim=2)  # (out, blocks, 8) 16-bit values
        blocks = _le_bytes(lanes, 2)
    else:
        lanes = ((q & 3) << (2 * j)).sum(dim=2)  # (out, blocks, 8) bytes
        blocks = lanes.to(torch.uint8)
        if bits == 3:
            l = torch.arange(8, device=codes.device).view(1, 1, 1, 8)
            hi = (((q >> 2) & 1) << (4 * l + j)).sum(dim=(2, 3), keepdim=False).unsqueeze(-1)  # (out, blocks, 1)
            blocks = torch.cat([blocks, _le_bytes(hi, 4)], dim=-1)
    return blocks.reshape(out_f, geo.row_bytes).contiguous()


def unpack_kernel_codes(kcodes: torch.Tensor, bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`repack_codes`: ``(out, in)`` int64 codes."""
    out_f = kcodes.shape[0]
    geo = kernel_geometry(bits, group_size, in_features)
    blk = kcodes.view(out_f, -1, 4 * bits).to(torch.int64)  # (out, blocks, bytes)
    j = torch.arange(4, device=kcodes.device).view(1, 1, 4, 1)
    if bits == 4:
        lanes = (blk[..., 0::2] | (blk[..., 1::2] << 8)).unsqueeze(2)  # (out, blocks, 1, 8)
        q = (lanes >> (4 * j)) & 15
    else:
        q = (blk[..., :8].unsqueeze(2) >> (2 * j)) & 3
        if bits == 3:
            w = blk[..., 8] | (blk[..., 9] << 8) | (blk[..., 10] << 16) | (blk[..., 11] << 24)
            l = torch.arange(8, device=kcodes.device).view(1, 1, 1, 8)
            q = q | (((w.view(out_f, -1, 1, 1) >> (4 * l + j)) & 1) << 2)
    return q.reshape(out_f, geo.padded)[:, geo.padded_columns(kcodes.device)]
