"""GPTQ checkpoints (``quant_method: gptq``) as transformers + gptqmodel and vLLM read them.

Per linear ``(out, in)`` with ``G`` groups of ``group_size`` columns:

- ``qweight`` ``(ceil(in * b / 32), out)`` int32: codes packed along the input dimension, each run of 32
  codes of a column into ``b`` words as one little-endian bit stream (code ``i`` of the run at bits
  ``b*i .. b*i+b-1``; for 2, 4 and 8 bits that is ``32 / b`` whole codes per word, for 3 bits codes 10 and
  21 straddle two words);
- ``qzeros`` ``(G, ceil(out * b / 32))`` int32: zero points packed the same way along the output dimension;
  ``checkpoint_format`` ``gptq`` (v1, what every reader takes) stores ``z - 1``, ``gptq_v2`` stores ``z``;
- ``scales`` ``(G, out)`` float16; ``g_idx`` ``(in,)`` int32, the group of each column; ``bias`` float16.

gptqmodel dequantizes ``w = scales[g_idx] * (q - z)`` (after adding the 1 back to v1 zeros), which is
lowbit's ``(q - z) * s`` with lowbit's own codes, zero points and float16 scales: exact for symmetric
(``z = 2**(b-1)``) and asymmetric int formats at 2, 3, 4 and 8 bits. lowbit keeps codes in the original
column order with contiguous groups, also after act-order GPTQ, so ``g_idx`` is ``c // group_size`` and
``desc_act`` is false. A shorter last group is GPTQ's own layout (``ceil(in / group_size)`` groups), read
by gptqmodel's torch kernel; kernels that need the group size to divide the width (vLLM's, Marlin,
gptqmodel's AVX-512 CPU kernel) refuse such layers, so a warning names them, and ``regroup=True`` stores
every layer with groups of the gcd of all group sizes and widths instead (exact; 64 for 576 columns at g128).

Refused, naming the tensor: a zero point 0 in v1 (``z - 1`` wraps to all ones and v1 readers add 1 with a
carry into the next code: write ``checkpoint_format="gptq_v2"``), 3-bit layers whose width or height is
not a multiple of 32 (3-bit words hold whole runs of 32 codes), 5-7 bits, more than one format in the
model, FP/NF tables (AFPQ), VQ and act-quantized (W8A8) layers.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import ExportError
from .folder import write_folder
from .layers import IntLinear, export_tensors, read_layers, refusal, regrouped, require_layers

log = logging.getLogger(__name__)

OUTPUT = "folder"
TARGET = "gptq"
BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")
MAPS = "int2, int3, int4 and int8 weights, symmetric or asymmetric, per group or per channel, all layers one format"

__all__ = ["export", "pack_int32", "layer_tensors", "config_format"]


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(n, m)`` codes in ``[0, 2**bits)`` -> ``(ceil(n * bits / 32), m)`` int32, packed along dim 0: each run
    of 32 codes of a column is one little-endian stream of ``bits`` words (zero-padded at the end)."""
    n, m = codes.shape
    pad = (-n) % 32
    c = torch.cat([codes.long(), codes.new_zeros(pad, m).long()]).view(-1, 32, m)    # (runs, 32, m)
    words = torch.zeros(c.shape[0], bits, m, dtype=torch.int64)                      # (runs, bits, m)
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        words[:, word] |= c[:, i] << shift            # bits above 31 are masked off below ...
        if shift + bits > 32:
            words[:, word + 1] |= c[:, i] >> (32 - shift)   # ... and start the next word
    words = (words & 0xFFFFFFFF).reshape(-1, m)[: -(-n * bits // 32)]
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)   # two's complement


def check_layer(layer, checkpoint_format: str) -> IntLinear:
    if not isinstance(layer, IntLinear):
        kind = layer.tag() if hasattr(layer, "tag") else layer.kind
        raise refusal(layer, TARGET, f"its format is {kind}, and GPTQ checkpoints hold weight-only int "
                      f"formats", MAPS + "; compressed-tensors holds W8A8")
    if layer.bits not in BITS:
        raise refusal(layer, TARGET, f"its format is {layer.tag()}: GPTQ readers take 2, 3, 4 and 8 bits", MAPS)
    if layer.bits == 3 and (layer.in_features % 32 or layer.out_features % 32):
        raise refusal(layer, TARGET, f"it is {layer.out_features}x{layer.in_features}: 3-bit GPTQ words hold "
                      f"runs of 32 codes, so both sides must be multiples of 32", MAPS)
    if checkpoint_format == "gptq" and not layer.sym and bool((layer.zero == 0).any()):
        raise ExportError(f"cannot export {layer.name}.weight to GPTQ v1: some groups have zero point 0, which v1 "
                          f"stores as -1 and its readers cannot add back; write it with --checkpoint-format "
                          f"gptq_v2 (gptqmodel reads it; vLLM reads v1 only)")
    return layer


def layer_tensors(layer: IntLinear, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """The layer's GPTQ weight tensors (without the module prefix; a bias is written with the float tensors)."""
    zero = layer.zero - 1 if checkpoint_format == "gptq" else layer.zero
    return {"qweight": pack_int32(layer.codes.T, layer.bits),                 # (in * b / 32, out)
            "qzeros": pack_int32(zero, layer.bits).T.contiguous(),             # (G, out * b / 32)
            "scales": layer.scale.T.contiguous().half(),                       # (G, out)
            "g_idx": (torch.arange(layer.in_features) // layer.group_size).to(torch.int32)}


def config_format(layers: dict) -> tuple[int, bool, int, list[str]]:
    """``(bits, sym, group_size, ragged)`` of the config that holds every layer, ``ragged`` the layers whose width
    the group size does not divide; an error when the layers differ (a GPTQ config has one format)."""
    formats = {(x.bits, x.sym) for x in layers.values()}
    sizes = {x.group_size for x in layers.values() if not x.per_channel}
    if len(formats) > 1 or len(sizes) > 1:
        raise ExportError(f"cannot export to {TARGET}: its config holds one format for every layer, and this model "
                          f"has {', '.join(sorted({x.tag() for x in layers.values()}))}")
    bits, sym = formats.pop()
    # a layer no wider than the group size has one group, as GPTQ's ceil(in / group_size) gives it
    group_size = sizes.pop() if sizes else -1
    return bits, sym, group_size, [n for n, x in layers.items() if group_size != -1 and x.in_features % group_size]


def export(model, meta: dict, out: Path, checkpoint_format: str = "gptq", regroup: bool = False) -> None:
    """Write ``model`` to ``out`` as a GPTQ checkpoint, zero points as ``checkpoint_format`` (``gptq``: v1,
    ``gptq_v2``). ``regroup``: when the group size does not divide some width, store every layer with groups of
    the largest size dividing every group size and width (exact), which every GPTQ kernel reads."""
    if checkpoint_format not in FORMATS:
        raise ExportError(f"--checkpoint-format must be one of {', '.join(FORMATS)}, got {checkpoint_format!r}")
    layers = {name: check_layer(x, checkpoint_format) for name, x in read_layers(model).items()}
    require_layers(layers, TARGET)
    bits, sym, group_size, ragged = config_format(layers)
    if ragged and regroup:
        layers = regrouped(layers)
        bits, sym, group_size, ragged = config_format(layers)
    if ragged:
        log.warning("%d layers end in a shorter group (%s, ...): gptqmodel's torch kernel reads them "
                    "(backend='torch'); vLLM's, Marlin and gptqmodel's other CPU kernels need the group size to "
                    "divide the width: pass --regroup for those", len(ragged), ragged[0])
    tensors = export_tensors(model, layers, lambda x: layer_tensors(x, checkpoint_format))
    config = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False, "sym": sym,
              "checkpoint_format": checkpoint_format, "pack_dtype": "int32", "true_sequential": True,
              "damp_percent": 0.01, "static_groups": False, "lm_head": False}
    write_folder(Path(out), meta, tensors, quantization_config=config)
