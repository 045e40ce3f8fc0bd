"""ggml's K-quant super-blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) packed from a lowbit ``kquant`` weight.

lowbit's :class:`~lowbit.formats.KQuantFormat` holds exactly ggml's grid (codes, integer sub-scales and mins,
fp16 ``d``/``dmin`` per 256 columns), so packing only moves bits. Layouts of one super-block of 256 weights,
little endian, as ggml's ``block_q*_K`` structs and gguf-py's dequantizers read them (element ``e`` of the
super-block, ``c`` its lowbit code):

=====  =====  ==========================================================================================
type   bytes  fields, in order
=====  =====  ==========================================================================================
Q2_K   84     ``scales[16]`` (sub-scale low nibble, sub-min high nibble), ``qs[64]``, ``d``, ``dmin``;
              ``e = 128h + 32j + l`` sits in ``qs[32h + l]`` at bits ``2j``
Q3_K   110    ``hmask[32]``, ``qs[64]``, ``scales[12]``, ``d``; low 2 bits of ``c`` as Q2_K's ``qs``, bit 2
              of ``e = 32k + l`` at bit ``k`` of ``hmask[l]``; 6-bit sub-scales: low nibbles of 0-7 in bytes
              0-7, of 8-15 in their high nibbles, top 2 bits of ``i`` at bits ``2(i // 4)`` of byte ``8 + i % 4``
Q4_K   144    ``d``, ``dmin``, ``scales[12]``, ``qs[128]``; ``e = 64c + 32s + l`` is nibble ``s`` of
              ``qs[32c + l]``; 6-bit sub-scales and mins: 0-3 in the low 6 bits of bytes 0-3 (scales) and
              4-7 (mins), 4-7 split into a low nibble in bytes 8-11 (scale low, min high) and 2 top bits in
              bits 6-7 of bytes 0-3 (scales) and 4-7 (mins)
Q5_K   176    ``d``, ``dmin``, ``scales[12]``, ``qh[32]``, ``qs[128]``; Q4_K's nibbles, bit 4 of
              ``e = 32k + l`` at bit ``k`` of ``qh[l]``
Q6_K   210    ``ql[128]``, ``qh[64]``, ``scales[16]`` (int8, ``sc - 128``), ``d``; ``e = 128h + 64s + i`` is
              nibble ``s`` of ``ql[64h + i]``, bits 4-5 of ``e = 128h + 32j + l`` at bits ``2j`` of
              ``qh[32h + l]``
=====  =====  ==========================================================================================

Q3_K's and Q6_K's codes are stored unsigned as lowbit keeps them (ggml subtracts 4 or 32 when decoding), and
Q3_K's sub-scales with lowbit's offset of 32.
"""
from __future__ import annotations

import numpy as np
import torch

from ..formats.kquant import SUPER_BLOCK, KQuantFormat

__all__ = ["pack_kblocks", "KBLOCK_BYTES"]

#: bytes per super-block of each type
KBLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _u8(t) -> np.ndarray:
    return np.asarray(t.cpu().numpy() if isinstance(t, torch.Tensor) else t).round().astype(np.int64)


def _fp16_bytes(v) -> np.ndarray:
    """``(R,)`` values as fp16, ``(R, 2)`` little-endian bytes."""
    return np.ascontiguousarray(np.asarray(v, dtype=np.float32).astype("<f2").reshape(-1, 1)).view(np.uint8)


def _bit_planes(c: np.ndarray, shift: int, width: int, n_fields: int) -> np.ndarray:
    """Bytes holding ``n_fields`` fields of ``width`` bits: ``c`` ``(R, ..., n_fields, L)`` -> ``(R, ..., L)``
    with field ``j`` (bits ``shift ..`` of each code) at bits ``width * j``."""
    mask = (1 << width) - 1
    out = np.zeros(c.shape[:-2] + c.shape[-1:], dtype=np.int64)
    for j in range(n_fields):
        out |= ((c[..., j, :] >> shift) & mask) << (width * j)
    return out


def _scales_q4k(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit sub-scales and mins ``(R, 8)`` each -> ``(R, 12)`` bytes (Q4_K/Q5_K)."""
    b = np.zeros((sc.shape[0], 12), dtype=np.int64)
    b[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    b[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    b[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return b


def _scales_q3k(s: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit sub-scales ``(R, 16)`` -> ``(R, 12)`` bytes (Q3_K)."""
    low = s & 0xF
    high = ((s >> 4) & 3).reshape(-1, 4, 4)                     # [k, b] = sub-scale 4k + b
    return np.concatenate([low[:, :8] | (low[:, 8:] << 4), _bit_planes(high, 0, 2, 4)], axis=1)


def pack_kblocks(fmt: KQuantFormat, codes, params: dict) -> np.ndarray:
    """ggml super-blocks of ``fmt``'s type for a lowbit K-quant weight, uint8 ``(rows, in/256 * bytes)``.

    ``codes``: ``(rows, in)`` in ``[0, 2**bits)``; ``params``: lowbit's per-group ``(rows, in/sub)`` tensors
    (``super_scale``/``super_min`` repeated over each super-block's sub-blocks, as the codec rebuilds them).
    """
    c = _u8(codes)
    rows, in_f = c.shape
    if in_f % SUPER_BLOCK:
        raise ValueError(f"{in_f} columns are not whole super-blocks of {SUPER_BLOCK}")
    n_super, n = in_f // SUPER_BLOCK, fmt.fit_span
    r = rows * n_super
    c = c.reshape(r, SUPER_BLOCK)
    sub = {k: v.reshape(r, n) for k, v in ((k, _u8(params[k])) for k in params if k.startswith("sub"))}
    sup = {k: np.asarray(params[k].float().cpu().numpy() if isinstance(params[k], torch.Tensor) else params[k],
                         dtype=np.float32).reshape(r, n)[:, 0] for k in params if k.startswith("super")}
    d = _fp16_bytes(sup["super_scale"])
    qtype = fmt.ktype.ggml
    if qtype == "Q2_K":
        scales = sub["sub_scale"] | (sub["sub_min"] << 4)
        qs = _bit_planes(c.reshape(r, 2, 4, 32), 0, 2, 4).reshape(r, 64)
        parts = [scales, qs, d, _fp16_bytes(sup["super_min"])]
    elif qtype == "Q3_K":
        hmask = _bit_planes(c.reshape(r, 8, 32), 2, 1, 8)
        qs = _bit_planes(c.reshape(r, 2, 4, 32), 0, 2, 4).reshape(r, 64)
        parts = [hmask, qs, _scales_q3k(sub["sub_scale"]), d]
    elif qtype in ("Q4_K", "Q5_K"):
        qs = _bit_planes(c.reshape(r, 4, 2, 32), 0, 4, 2).reshape(r, 128)
        parts = [d, _fp16_bytes(sup["super_min"]), _scales_q4k(sub["sub_scale"], sub["sub_min"])]
        if qtype == "Q5_K":
            parts.append(_bit_planes(c.reshape(r, 8, 32), 4, 1, 8))
        parts.append(qs)
    elif qtype == "Q6_K":
        ql = _bit_planes(c.reshape(r, 2, 2, 64), 0, 4, 2).reshape(r, 128)
        qh = _bit_planes(c.reshape(r, 2, 4, 32), 4, 2, 4).reshape(r, 64)
        scales = (sub["sub_scale"] - 128).astype(np.int8).view(np.uint8)
        parts = [ql, qh, scales, d]
    else:
        raise ValueError(f"no K-quant type {qtype!r}")
    blocks = np.concatenate([p.astype(np.uint8) for p in parts], axis=1)
    assert blocks.shape[1] == KBLOCK_BYTES[qtype], (qtype, blocks.shape)
    return blocks.reshape(rows, n_super * KBLOCK_BYTES[qtype])
