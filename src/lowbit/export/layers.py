"""A lowbit model's quantized layers in the terms export targets map from, and its float tensors.

:func:`read_layers` describes every quantized module of a loaded checkpoint as one of

- :class:`IntLinear`: a linear in lowbit's int format, ``w = (q - z) * s`` per group of columns;
- :class:`ActLinear`: a :class:`~lowbit.nn.w8a8.QuantizedActLinear` (int weights per output channel and
  int activations, e.g. lowbit's ``w8a8`` and ``smoothquant`` methods);
- :class:`VQLinear`: a linear in lowbit's VQ format (``--method vptq``): codebooks, codes, outliers, norms;
- :class:`OtherLayer`: anything else (FP/NF tables, two-scale AFPQ, DGQ's dual-grained int4), which an integer
  target cannot hold.

:func:`float_tensors` gives the rest of the model as float16 tensors under transformers' names, with every
quantized module the target does not pack dequantized to ``<name>.weight``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..config import FormatConfig
from ..errors import ExportError
from ..formats import group_layout
from ..formats.codebook import VQWeight
from ..nn import QuantizedEmbedding, QuantizedLinear, get_codec
from ..nn.dgq import QuantizedDGQLinear
from ..nn.w8a8 import QuantizedActLinear

__all__ = ["IntLinear", "ActLinear", "VQLinear", "OtherLayer", "read_layers", "float_tensors",
           "with_group_size", "regrouped", "common_group_size", "to_float16", "require_layers", "export_tensors",
           "refusal"]

log = logging.getLogger(__name__)

QUANTIZED = (QuantizedLinear, QuantizedActLinear, QuantizedEmbedding)


@dataclass
class IntLinear:
    """A linear in lowbit's int format: ``w[r, c] = (codes[r, c] - zero[r, g]) * scale[r, g]``, with
    ``g = c // group_size``.

    Groups are contiguous runs of ``group_size`` columns in the original column order (act-order GPTQ keeps
    that order too); the last group is shorter when ``group_size`` does not divide ``in_features``.
    ``group_size`` is the effective one: ``in_features`` when the layer has one group per row.
    """

    name: str
    bits: int
    sym: bool
    group_size: int
    codes: torch.Tensor          # (out, in) int64 in [0, 2**bits)
    scale: torch.Tensor          # (out, G) float16
    zero: torch.Tensor           # (out, G) int64 in [0, 2**bits); 2**(bits-1) everywhere when sym

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    @property
    def per_channel(self) -> bool:
        return self.n_groups == 1

    @property
    def ragged(self) -> bool:
        """The last group is shorter than the others."""
        return self.in_features % self.group_size != 0

    def tag(self) -> str:
        g = -1 if self.per_channel else self.group_size
        return FormatConfig("int", self.bits, g, self.sym).tag()


@dataclass
class ActLinear:
    """Integer weights per output channel and integer activations: ``y = (qa * sa) @ (qw * sw)^T + b``.

    ``qweight`` holds signed codes; ``act_scale`` is the static per-tensor activation scale (None: dynamic
    per token, ``max|x_t| / (2**(a_bits-1) - 1)``). ``flatten``: FlattenQuant's split input channels.
    """

    name: str
    w_bits: int
    a_bits: int
    dynamic: bool
    flatten: bool
    qweight: torch.Tensor            # (out, in) int8, signed
    w_scale: torch.Tensor            # (out,) float16
    act_scale: torch.Tensor | None   # (1,) float16, static activations only

    def tag(self) -> str:
        return f"W{self.w_bits}A{self.a_bits} ({'dynamic per-token' if self.dynamic else 'static per-tensor'}" \
               f"{', flattened' if self.flatten else ''})"


@dataclass
class VQLinear:
    """A linear in lowbit's VQ format: ``qw`` holds its codes, fp16 codebooks, outlier columns and column norms
    (:class:`~lowbit.formats.codebook.VQWeight`). ``kind`` is what an integer target's refusal names."""

    name: str
    qw: VQWeight
    kind: str = "VQ (vector codebooks, VPTQ)"


@dataclass
class OtherLayer:
    """A quantized module no integer target holds; ``kind`` says what it is."""

    name: str
    kind: str


def _describe(spec: dict) -> str:
    f = spec.get("format", {})
    tag = FormatConfig(**{k: f[k] for k in ("format", "bits", "group_size", "sym")}).tag()
    if f.get("format") in ("fp", "nf"):
        kind = "FP" if f["format"] == "fp" else "NF"
        return f"{tag} ({'one-scale' if f['sym'] else 'two-scale, AFPQ'} {kind} table, not an integer grid)"
    return tag


def read_layers(model: nn.Module) -> dict[str, IntLinear | ActLinear | VQLinear | OtherLayer]:
    """Every quantized linear of ``model`` by name, in module order, but the output head.

    The head and a quantized embedding are not among them: engines load those unquantized, so every target
    writes them dequantized (:func:`float_tensors`).
    """
    head = model.get_output_embeddings()
    out = {}
    for name, m in model.named_modules():
        if m is head or not isinstance(m, (QuantizedLinear, QuantizedActLinear)):
            continue
        if isinstance(m, QuantizedDGQLinear):   # int4 codes under int8 group scales: no target's integer layout
            out[name] = OtherLayer(name, f"DGQ A8W4 g{m.spec['group_size']} (int4 codes times int8 group scales, "
                                         "one fp16 scale per channel)")
        elif isinstance(m, QuantizedActLinear):
            sp = m.spec
            q = m.int_weight()[:, : sp["flat_features"]]
            out[name] = ActLinear(name, sp["w_bits"], sp["a_bits"], sp["dynamic"], sp["flatten"], q.clone(),
                                  m.w_scale.clone(), None if sp["dynamic"] else m.act_scale.clone())
        elif m.spec["codec"] == "scalar" and m.spec["format"]["format"] == "int":
            qw = get_codec("scalar").to_quantized_weight(m.packed_buffers(), m.spec)
            fmt = qw.fmt
            lay = group_layout(m.in_features, fmt.group_size)
            zero = (torch.full_like(qw.params["scale"], 1 << (fmt.bits - 1)) if fmt.sym else qw.params["zero"]).long()
            out[name] = IntLinear(name, fmt.bits, fmt.sym, lay.group_size, qw.codes, qw.params["scale"].half(), zero)
        elif m.spec["codec"] == "vq":
            out[name] = VQLinear(name, get_codec("vq").to_vq_weight(m.packed_buffers(), m.spec))
        else:
            out[name] = OtherLayer(name, _describe(m.spec))
    return out


def with_group_size(layer: IntLinear, group_size: int) -> IntLinear:
    """The same weight with groups of ``group_size`` columns, which must divide the layer's group size and
    width: each group's scale and zero point repeat over the smaller groups it splits into (exact)."""
    if layer.group_size % group_size or layer.in_features % group_size:
        raise ValueError(f"{group_size} does not divide group size {layer.group_size} and width {layer.in_features}")
    first = torch.arange(0, layer.in_features, group_size) // layer.group_size   # old group of each new group
    return replace(layer, group_size=group_size, scale=layer.scale[:, first].clone(), zero=layer.zero[:, first].clone())


def refusal(layer, target: str, why: str, maps: str) -> ExportError:
    """The error for a layer ``target`` cannot hold: the tensor, why, what maps, and the float way out."""
    return ExportError(f"cannot export {layer.name}.weight to {target}: {why}. {target} holds {maps}. Re-quantize "
                       f"to a format that maps, or export with --dequantize f16 for a plain float16 folder")


def to_float16(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as float16 (values as stored, since lowbit stores float16 by default); an error when a value of a
    bfloat16/float32 checkpoint lies beyond float16's range."""
    h = t.detach().to(torch.float16).contiguous()
    if t.is_floating_point() and bool(torch.isinf(h).any()) and not bool(torch.isinf(t).any()):
        big = float(t.detach().abs().max())
        raise ExportError(f"{name} holds values up to {big:.4g}, beyond float16's range (65504): this checkpoint's "
                          f"float tensors do not fit the float16 export")
    return h


def float_tensors(model: nn.Module, packed: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` but the modules in ``packed`` (the target writes those), as float16 under
    transformers' names; other quantized modules become a dequantized ``<name>.weight``. A tensor shared with
    an earlier one (tied embeddings) is written once, as transformers saves it."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QUANTIZED)}
    out, seen = {}, set()
    for key, t in model.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        if mod in quantized and leaf != "bias":
            continue   # packed buffers: the target's tensors or the dequantized weight below replace them
        ident = (t.data_ptr(), t.numel(), tuple(t.shape))
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = to_float16(key, t) if t.is_floating_point() else t.contiguous()
    for name, m in quantized.items():
        if name not in packed:
            out[f"{name}.weight"] = to_float16(f"{name}.weight", m.dequantize_weight())
    return out


def regrouped(layers: dict) -> dict:
    """``layers`` with every :class:`IntLinear` stored with :func:`common_group_size` columns per group (exact);
    the other layers as they are."""
    g = common_group_size(layers.values())
    return {n: with_group_size(x, g) if isinstance(x, IntLinear) and x.group_size != g else x
            for n, x in layers.items()}


def common_group_size(layers) -> int:
    """The largest group size dividing every :class:`IntLinear`'s group size and width (0 when there is none):
    regrouped to it, all of them share one group size and none has a shorter last group."""
    return math.gcd(*(n for x in layers if isinstance(x, IntLinear) for n in (x.group_size, x.in_features)))


def require_layers(layers: dict, target: str) -> None:
    if not layers:
        raise ExportError(f"the checkpoint has no quantized linears to export to {target}; use --dequantize f16")


def export_tensors(model: nn.Module, layers: dict, tensors_of) -> dict[str, torch.Tensor]:
    """Everything a target writes: each of ``layers`` as ``tensors_of(layer)`` (names without the module
    prefix), the rest of the model, biases included, as :func:`float_tensors`."""
    dense = [n for n, m in model.named_modules() if isinstance(m, QUANTIZED) and n not in layers]
    if dense:
        log.info("written as float16 weights (engines load them unquantized): %s", ", ".join(dense))
    tensors = float_tensors(model, packed=set(layers))
    for name, layer in layers.items():
        tensors.update({f"{name}.{k}": v for k, v in tensors_of(layer).items()})
    return tensors
