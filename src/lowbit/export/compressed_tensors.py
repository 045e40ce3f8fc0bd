"""compressed-tensors (vLLM, transformers): ``pack-quantized`` int weights and ``int-quantized`` W8A8.

compressed-tensors dequantizes ``w = (q_s - zp) * s`` with signed codes ``q_s`` and a signed zero point
``zp`` in ``[-2**(b-1), 2**(b-1))``; lowbit's ``w = (q - z) * s`` has ``q, z`` in ``[0, 2**b)``. So
``q_s = q - 2**(b-1)``, ``zp = z - 2**(b-1)`` and the scale is lowbit's float16 scale, unchanged; a
symmetric lowbit format (``z = 2**(b-1)``) is compressed-tensors' symmetric ``zp = 0``. Per linear:

- lowbit int2/int4/int8, per group or per channel -> ``pack-quantized``, exact:
  ``weight_packed`` ``(out, ceil(in * b / 32))`` int32 (compressed-tensors' own ``pack_to_int32``: it adds
  ``2**(b-1)`` back, so the words hold lowbit's codes, 32/b per word, code ``i`` at bits ``b*i`` up),
  ``weight_scale`` ``(out, G)`` float16, ``weight_zero_point`` ``(ceil(out * b / 32), G)`` int32 packed along
  the output dimension (asymmetric only), ``weight_shape`` ``[out, in]``.
- W8A8 (:class:`~lowbit.nn.w8a8.QuantizedActLinear`, int8 weights and activations) -> ``int-quantized``:
  ``weight`` int8 ``(out, in)``, ``weight_scale`` ``(out, 1)``; activations int8 symmetric per token and
  dynamic (lowbit's ``w8a8``), or per tensor with a static ``input_scale``.

Refused, naming the tensor: 3, 5, 6 and 7 bits (compressed-tensors 0.10 packed ``32 // b`` codes per word,
0.20 packs densely across words, so those files read differently by version, and vLLM has no kernel for
them); a shorter last group (compressed-tensors needs the group size to divide the width; ``regroup=True``
stores every layer with groups of the gcd of all group sizes and widths, repeating scales and zero points,
exact); FP/NF tables (AFPQ), VQ, W4 act-quantized and flattened layers.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ExportError
from ..nn import QuantizedLinear
from .folder import write_folder
from .layers import (ActLinear, IntLinear, common_group_size, export_tensors, read_layers, refusal, regrouped,
                     require_layers)

OUTPUT = "folder"
TARGET = "compressed-tensors"
PACK_BITS = (2, 4, 8)
MAPS = ("int2, int4 and int8 weights (symmetric or asymmetric, per group or per channel, the group size dividing "
        "the width) and W8A8 (int8 per-channel weights, int8 activations)")

__all__ = ["export", "scheme_of", "layer_tensors"]


def _require():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ExportError("export to compressed-tensors needs the compressed-tensors package: "
                          "pip install 'lowbit[export]'") from None


def check_layer(layer, group: int):
    """``layer`` if it maps, else the refusal naming it (``group``: the group size ``--regroup`` would use)."""
    if isinstance(layer, ActLinear):
        if layer.w_bits != 8 or layer.a_bits != 8 or layer.flatten:
            raise refusal(layer, TARGET, f"its layer is {layer.tag()}; only unflattened W8A8 maps", MAPS)
        return layer
    if not isinstance(layer, IntLinear):
        raise refusal(layer, TARGET, f"its format is {layer.kind}", MAPS)
    if layer.bits not in PACK_BITS:
        raise refusal(layer, TARGET, f"its format is {layer.tag()}: the {layer.bits}-bit pack layout differs "
                      f"between compressed-tensors versions and no vLLM kernel reads it", MAPS)
    if layer.ragged:
        raise refusal(layer, TARGET, f"its {layer.in_features} columns end in a group of "
                      f"{layer.in_features % layer.group_size} at group size {layer.group_size}, and compressed-"
                      f"tensors needs the group size to divide the width (pass --regroup to store every layer with "
                      f"groups of {group} columns, repeating scales and zero points: exact)", MAPS)
    return layer


def scheme_of(layer) -> tuple:
    """``(format, weights args, input activation args)`` as plain dicts: the layers sharing it form one group."""
    if isinstance(layer, ActLinear):
        w = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
        a = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": layer.dynamic,
             "strategy": "token" if layer.dynamic else "tensor"}
        return "int-quantized", w, a
    w = {"num_bits": layer.bits, "type": "int", "symmetric": layer.sym, "dynamic": False,
         "strategy": "channel" if layer.per_channel else "group"}
    if not layer.per_channel:
        w["group_size"] = layer.group_size
    return "pack-quantized", w, None


def layer_tensors(layer) -> dict[str, torch.Tensor]:
    """The layer's weight tensors under compressed-tensors' names (without the module prefix; a bias is written
    with the float tensors)."""
    from compressed_tensors.compressors import pack_to_int32

    if isinstance(layer, ActLinear):
        out = {"weight": layer.qweight.to(torch.int8).contiguous(), "weight_scale": layer.w_scale.half()[:, None]}
        if not layer.dynamic:
            out["input_scale"] = layer.act_scale.half().reshape(1)
    else:
        off = 1 << (layer.bits - 1)
        out = {"weight_packed": pack_to_int32((layer.codes - off).to(torch.int8), layer.bits),
               "weight_scale": layer.scale.half().contiguous(),
               "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)}
        if not layer.sym:
            out["weight_zero_point"] = pack_to_int32((layer.zero - off).to(torch.int8), layer.bits, packed_dim=0)
    return out


def _config(groups: list[tuple[tuple, list[str]]], ignore: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    formats = {scheme[0] for scheme, _ in groups}
    single = len(groups) == 1   # then one group over every Linear, the unquantized ones ignored
    config_groups = {}
    for i, ((fmt, w, a), names) in enumerate(groups):
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=["Linear"] if single else names, weights=QuantizationArgs(**w),
            input_activations=None if a is None else QuantizationArgs(**a),
            format=None if len(formats) == 1 else fmt)
    fmt = formats.pop() if len(formats) == 1 else "mixed-precision"
    return QuantizationConfig(config_groups=config_groups, format=fmt, quantization_status="compressed", ignore=ignore)


def export(model, meta: dict, out: Path, regroup: bool = False) -> None:
    """Write ``model`` to ``out`` as compressed-tensors.

    ``regroup``: when the group size does not divide some layer's width (576 columns at g128), store every int
    layer with groups of one size, the largest dividing every group size and width (64 there), each group's
    scale and zero point repeated over the groups it splits into: exact, and the whole model one scheme.
    """
    layers = read_layers(model)
    if regroup and any(isinstance(x, IntLinear) and x.ragged for x in layers.values()):
        layers = regrouped(layers)
    group = common_group_size(layers.values())
    layers = {name: check_layer(layer, group) for name, layer in layers.items()}
    require_layers(layers, TARGET)
    _require()   # after the checks: a refusal needs no compressed-tensors
    from compressed_tensors.compressors import ModelCompressor

    tensors = export_tensors(model, layers, layer_tensors)
    groups: dict[str, tuple[tuple, list[str]]] = {}
    for name, layer in layers.items():
        scheme = scheme_of(layer)
        groups.setdefault(json.dumps(scheme, sort_keys=True), (scheme, []))[1].append(name)
    linears = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, QuantizedLinear))]
    ignore = [n for n in linears if n not in layers]
    config = _config(list(groups.values()), ignore)
    out = Path(out)
    write_folder(out, meta, tensors)
    ModelCompressor(quantization_config=config).update_config(str(out))
