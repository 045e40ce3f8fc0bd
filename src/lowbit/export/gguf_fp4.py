"""ggml's MXFP4 and NVFP4 blocks packed from a lowbit ``mxfp4`` / ``nvfp4`` weight.

lowbit's codes are e2m1 bit patterns (sign bit 3, then exponent and mantissa), the order of ggml's
``kvalues_mxfp4`` table, and its block scales are the E8M0 and E4M3 codes ggml stores, so packing only moves
bytes. Layouts, little endian, as ggml's structs and gguf-py's dequantizers read them:

=====  ===============  ===================================================================================
type   block            bytes
=====  ===============  ===================================================================================
MXFP4  32 columns, 17   ``e`` (E8M0 code), ``qs[16]``: element ``j`` in the low nibble of ``qs[j]``, element
                        ``j + 16`` in its high nibble
NVFP4  64 columns, 36   ``d[4]`` (one unsigned E4M3 code per 16 columns), ``qs[32]``: sub-block ``s`` in
                        ``qs[8s .. 8s+7]``, element ``j`` of it in the low nibble of ``qs[8s + j]``, ``j + 8``
                        in the high one
=====  ===============  ===================================================================================

NVFP4's per-tensor scale has no place in the blocks: llama.cpp's converter writes it as a separate F32 tensor of
one value, ``<name>.scale`` (left out when it is 1), which llama.cpp multiplies in; gguf-py's dequantizer of the
blocks times that value is lowbit's weight bit for bit (lowbit computes ``(e2m1 * d) * g`` in that order).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["pack_mxfp4", "pack_nvfp4", "MXFP4_BLOCK", "NVFP4_BLOCK"]

#: columns per ggml block
MXFP4_BLOCK = 32
NVFP4_BLOCK = 64


def _ints(t) -> np.ndarray:
    return np.asarray(t.cpu().numpy() if isinstance(t, torch.Tensor) else t).round().astype(np.uint8)


def _nibbles(c: np.ndarray) -> np.ndarray:
    """``(..., 2n)`` 4-bit codes -> ``(..., n)`` bytes: element ``j`` low nibble, ``j + n`` high nibble."""
    half = c.shape[-1] // 2
    return c[..., :half] | (c[..., half:] << 4)


def pack_mxfp4(codes, shared_exp) -> np.ndarray:
    """MXFP4 blocks, uint8 ``(rows, in/32 * 17)``, for e2m1 ``codes`` ``(rows, in)`` and E8M0 ``shared_exp``
    ``(rows, in/32)``."""
    c = _ints(codes)
    rows, in_f = c.shape
    nb = in_f // MXFP4_BLOCK
    e = _ints(shared_exp).reshape(rows, nb, 1)
    return np.concatenate([e, _nibbles(c.reshape(rows, nb, MXFP4_BLOCK))], axis=-1).reshape(rows, -1)


def pack_nvfp4(codes, block_scale) -> np.ndarray:
    """NVFP4 blocks, uint8 ``(rows, in/64 * 36)``, for e2m1 ``codes`` ``(rows, in)`` and E4M3 ``block_scale``
    codes ``(rows, in/16)``."""
    c = _ints(codes)
    rows, in_f = c.shape
    ns = in_f // NVFP4_BLOCK
    d = _ints(block_scale).reshape(rows, ns, 4)
    qs = _nibbles(c.reshape(rows, ns, 4, 16)).reshape(rows, ns, 32)
    return np.concatenate([d, qs], axis=-1).reshape(rows, -1)
