"""VPTQ checkpoints (``quant_method: vptq``) as the ``vptq`` package's ``VQuantLinear`` and transformers' vptq
quantizer read them.

lowbit's VQ layer (:class:`~lowbit.formats.codebook.VQWeight`) and ``VQuantLinear`` describe the same
weight: vectors of ``v`` consecutive output rows of one input column, a main codebook with an optional
residual codebook added to it, outlier columns with their own codebook, and per-input-column norms
``w = lookup * scale + bias``. Per linear ``(out, in)`` with ``n_out`` outlier columns and
``n_main = in - n_out`` main columns (one codebook group: ``group_num`` 1, ``group_size`` ``n_main``):

- ``centroids.weight`` ``(1, K * v)`` float16: the main codebook, ``K = 2**b`` rows (lowbit's ``k`` rows, then
  zero rows up to the power of two: ``VQuantLinear`` reads ``log2(K)`` bits per index);
- ``res_centroids.weight`` ``(1, KR * v)`` float16: the residual codebook, padded the same way;
- ``indices`` ``(1, out / v, ceil(n_main * (b + br) / 32))`` int32: per row of vectors, the codes of the main
  columns as one little-endian bit stream, field ``c`` at bits ``c*(b+br) ..``, main index in its low ``b``
  bits and residual index in the ``br`` bits above;
- ``outlier_centroids.weight`` ``(1, k0 * v0)`` float16 and ``outlier_indices`` ``(1, out / v0, n_out)`` int16
  (unsigned 16-bit codes), lowbit's outlier codebook and codes as they are;
- ``perm`` ``(in,)`` int16 (unsigned): ``VQuantLinear`` stores outlier columns first, then main columns, and
  puts stored column ``p`` at column ``perm[p]``; lowbit's order is ``outlier_cols`` then the main columns,
  both ascending (absent when that is the identity);
- ``weight_scale``, ``weight_bias`` ``(in,)`` float16: lowbit's ``col_scale``, ``col_bias``; ``bias`` float16.

The vptq package's unpacker masks the residual field with the main field's width, so when the residual
codebook is the larger one the two swap roles (``C[i] + R[j]`` equals ``R[j] + C[i]`` exactly). Every value is
lowbit's stored float16 value, so the reader rebuilds lowbit's float32 weight bit for bit when it computes
in float32 (in float16, each of its three operations rounds).

Refused, naming the tensor: a layer in any other format (int, FP/NF, W8A8); outlier vectors of length 1
(``VQuantLinear`` reads an outlier vector length below 2 as no outliers); more than 65,536 input columns with a
column permutation (16-bit ``perm``); a main group whose packed row the reader cannot split (fewer than 17
bits of codes, e.g. a layer of almost only outlier columns). Settings vptq's torch path reads but its CUDA kernels
do not dispatch on (index widths, vector lengths, no norms; for its GEMV outlier vectors other than 4) are named in a
warning (:func:`cuda_unsupported`). See docs/export.md.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from ..formats.codebook import code_bits
from ..nn import QuantizedLinear
from .folder import write_folder
from .layers import VQLinear, export_tensors, read_layers, refusal, require_layers

log = logging.getLogger(__name__)

OUTPUT = "folder"
TARGET = "vptq"
MAPS = ("VQ layers (lowbit's --method vptq): any vector length, codebook and residual codebook size, column norms "
        "on or off, and outlier columns with vectors of 2 or more")
#: what the vptq CUDA kernels dispatch on (read from VPTQ 0.0.5.post1's csrc/dequant.cu and csrc/quant_gemv.cu, not
#: run here): index and residual index widths, vector lengths; its GEMV (1-2 tokens) also needs outlier vectors of 4
#: and more than 256 input columns. The torch path reads every layout.
CUDA_INDEX_BITS = (4, 8, 10, 12, 13, 14, 15, 16)
CUDA_RES_BITS = (0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 16)
CUDA_VECTOR_LENS = (2, 4, 6, 8, 10, 12, 16)

__all__ = ["export", "pack_fields", "check_layer", "layer_tensors", "layer_config", "cuda_unsupported"]


def pack_fields(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """``(rows, n)`` fields in ``[0, 2**bits)`` -> ``(rows, ceil(n * bits / 32))`` int32: each row one little-endian
    bit stream, field ``c`` at bits ``c*bits .. c*bits+bits-1``, zero-padded at the row's end."""
    rows, n = fields.shape
    stream = torch.zeros(rows, n * bits + (-n * bits) % 32, dtype=torch.uint8)
    f = fields.long()
    for b in range(bits):
        stream[:, b : n * bits : bits] = ((f >> b) & 1).to(torch.uint8)
    stream = stream.view(rows, -1, 32)                                          # (rows, words, 32)
    words = torch.zeros(rows, stream.shape[1], dtype=torch.int64)
    for j in range(32):
        words |= stream[..., j].long() << j
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)   # two's complement


def _padded(codebook: torch.Tensor, bits: int) -> torch.Tensor:
    """``codebook`` ``(k, v)`` as float16 with zero rows up to ``2**bits`` (never indexed)."""
    c = codebook.detach().to(torch.float16)
    return torch.cat([c, c.new_zeros((1 << bits) - c.shape[0], c.shape[1])])


def _as_int16(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 16-bit values as the int16 bit patterns VPTQ stores them in."""
    v = values.long()
    return torch.where(v >= 1 << 15, v - (1 << 16), v).to(torch.int16)


def _main_and_residual(layer: VQLinear):
    """``(codebook, codes, res_codebook, res_codes)``, the residual ``None`` when off; swapped when the residual
    codebook needs more index bits (the vptq unpacker masks the residual field with the main field's width)."""
    qw = layer.qw
    c, idx, r, ridx = qw.codebook, qw.idx, qw.res_codebook, qw.res_idx
    if r is not None and code_bits(r.shape[0]) > code_bits(c.shape[0]):
        c, idx, r, ridx = r, ridx, c, idx
    return c, idx, r, ridx


def _order(layer: VQLinear) -> torch.Tensor:
    """The original column of each stored column: outlier columns, then main columns."""
    qw = layer.qw
    if not qw.n_outlier:
        return torch.arange(qw.in_features)
    return torch.cat([qw.outlier_cols.long(), qw.main_cols()])


def check_layer(layer) -> VQLinear:
    """``layer`` if ``VQuantLinear`` holds it exactly, else :class:`~lowbit.errors.ExportError` naming its tensor."""
    if not isinstance(layer, VQLinear):
        kind = layer.tag() if hasattr(layer, "tag") else layer.kind
        raise refusal(layer, TARGET, f"its format is {kind}, and VPTQ checkpoints hold vector codebooks", MAPS)
    qw = layer.qw
    if qw.n_outlier and qw.out_codebook.shape[1] < 2:
        raise refusal(layer, TARGET, "its outlier columns are quantized as vectors of length 1, and VQuantLinear "
                      "reads an outlier vector length below 2 as no outliers", MAPS)
    if qw.n_outlier and qw.in_features > 1 << 16:
        raise refusal(layer, TARGET, f"it has {qw.in_features} input columns, and the column permutation that "
                      f"places its outlier columns is stored as 16-bit indices", MAPS)
    c, _, r, _ = _main_and_residual(layer)
    n_main, total = qw.idx.shape[1], code_bits(c.shape[0]) + (code_bits(r.shape[0]) if r is not None else 0)
    row = n_main * total
    words = -(-row // 32)
    if row == 0 or (words * 32) % row != words * 32 - row:
        raise refusal(layer, TARGET, f"its {n_main} main columns pack {row} bits of codes per row of vectors, and "
                      f"the vptq unpacker finds a row's padding as (32 * words) mod bits, which is wrong below 17 "
                      f"bits", MAPS + "; quantize with fewer outlier columns")
    return layer


def layer_tensors(layer: VQLinear) -> dict[str, torch.Tensor]:
    """The layer's ``VQuantLinear`` tensors (without the module prefix; a bias is written with the float tensors)."""
    qw = layer.qw
    c, idx, r, ridx = _main_and_residual(layer)
    b = code_bits(c.shape[0])
    fields = idx.long()
    out = {"centroids.weight": _padded(c, b).reshape(1, -1)}                       # (1, K * v)
    if r is not None:
        br = code_bits(r.shape[0])
        fields = fields | (ridx.long() << b)
        out["res_centroids.weight"] = _padded(r, br).reshape(1, -1)                # (1, KR * v)
    else:
        br = 0
    out["indices"] = pack_fields(fields, b + br).unsqueeze(0)                      # (1, out / v, words)
    if qw.n_outlier:
        out["outlier_centroids.weight"] = qw.out_codebook.detach().to(torch.float16).reshape(1, -1)
        out["outlier_indices"] = _as_int16(qw.out_idx).unsqueeze(0)                # (1, out / v0, n_out)
    order = _order(layer)
    if not torch.equal(order, torch.arange(qw.in_features)):
        out["perm"] = _as_int16(order)
    if qw.col_scale is not None:
        out["weight_scale"] = qw.col_scale.detach().to(torch.float16).contiguous()
        out["weight_bias"] = qw.col_bias.detach().to(torch.float16).contiguous()
    return out


def layer_config(layer: VQLinear, bias: bool) -> dict:
    """The layer's ``config_for_layers`` entry: ``VQuantLinear``'s constructor arguments. Pairs are
    ``[outlier, main]``; ``-1`` is off."""
    qw = layer.qw
    c, _, r, _ = _main_and_residual(layer)
    v0, k0 = (qw.out_codebook.shape[1], qw.out_codebook.shape[0]) if qw.n_outlier else (-1, -1)
    return {"in_features": qw.in_features, "out_features": qw.out_features, "bias": bias,
            "vector_lens": [v0, qw.v], "num_centroids": [k0, 1 << code_bits(c.shape[0])],
            "num_res_centroids": [-1, -1 if r is None else 1 << code_bits(r.shape[0])],
            "group_num": 1, "group_size": qw.idx.shape[1], "outlier_size": qw.n_outlier,
            "enable_norm": qw.col_scale is not None,
            "enable_perm": not torch.equal(_order(layer), torch.arange(qw.in_features)),
            "indices_as_float": False, "is_indice_packed": True}


def cuda_unsupported(cfg: dict) -> list[str]:
    """What in this layer's settings the vptq CUDA kernels do not dispatch on (see :data:`CUDA_INDEX_BITS`)."""
    (v0, v), bits = cfg["vector_lens"], [int(math.log2(n)) if n > 0 else 0 for n in
                                         (cfg["num_centroids"][1], cfg["num_res_centroids"][1])]
    why = [f"{bits[0]}-bit indices"] if bits[0] not in CUDA_INDEX_BITS else []
    why += [f"{bits[1]}-bit residual indices"] if bits[1] not in CUDA_RES_BITS else []
    why += [f"vectors of {v}"] if v not in CUDA_VECTOR_LENS else []
    why += [] if cfg["enable_norm"] else ["no column norms"]
    why += [f"outlier vectors of {v0} (GEMV: 4)"] if cfg["outlier_size"] and v0 != 4 else []
    why += [f"{cfg['in_features']} input columns (GEMV: more than 256)"] if cfg["in_features"] <= 256 else []
    return why


def export(model, meta: dict, out: Path) -> None:
    """Write ``model`` to ``out`` as a VPTQ checkpoint: ``config.json`` with ``quantization_config``
    (``quant_method: vptq``, one ``config_for_layers`` entry per quantized linear, the float linears in
    ``modules_to_not_convert``), ``model.safetensors``, and the checkpoint's tokenizer files."""
    layers = {name: check_layer(x) for name, x in read_layers(model).items()}
    require_layers(layers, TARGET)
    tensors = export_tensors(model, layers, layer_tensors)
    config_for_layers = {n: layer_config(x, f"{n}.bias" in tensors) for n, x in layers.items()}
    cuda = {n: why for n, c in config_for_layers.items() if (why := cuda_unsupported(c))}
    if cuda:
        first = next(iter(cuda))
        log.warning("%d layers have settings the vptq CUDA kernels do not dispatch on (%s: %s; ...); vptq's torch "
                    "path reads them", len(cuda), first, ", ".join(cuda[first]))
    linears = (torch.nn.Linear, QuantizedLinear)
    dense = [n for n, m in model.named_modules() if isinstance(m, linears) and n not in layers]
    config = {"quant_method": "vptq", "config_for_layers": config_for_layers, "shared_layer_config": {},
              "enable_proxy_error": False, "modules_to_not_convert": dense}
    write_folder(Path(out), meta, tensors, quantization_config=config)

