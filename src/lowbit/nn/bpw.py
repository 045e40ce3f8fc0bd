"""Exact, itemised bits-per-weight accounting.

Every tensor a checkpoint stores is counted at the size it is stored:
packed codes and packed zero points byte for byte, fp16 scales at 16 bits,
unquantized tensors at the storage dtype. Two totals:

- ``blocks``: bits of the decoder-block linears / their weight count;
- ``all_in``: bits of everything stored (embedding, head, norms included)
  / the original model's parameter count (tied tensors counted once).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..models.arch import arch_for, get_module
from .qlinear import _PackedWeight

__all__ = ["layer_bits", "bpw_report", "count_params", "stored_bits", "codec_bits", "ITEM_KINDS", "item_kind"]

_DTYPE_BITS = {"float16": 16, "bfloat16": 16, "float32": 32}


def _float_bits(t: torch.Tensor, storage_dtype: str) -> int:
    """Bits ``t`` takes on disk: float32 tensors are saved at the storage dtype, others as they are."""
    return t.numel() * (_DTYPE_BITS[storage_dtype] if t.dtype == torch.float32 else t.element_size() * 8)


def layer_bits(module: nn.Module, storage_dtype: str = "float16") -> dict:
    """Itemised storage of one linear/embedding: ``{"items": {name: bits}, "weights": n, "bpw": x}``."""
    if isinstance(module, _PackedWeight):
        items = {n: _float_bits(t, storage_dtype) for n, t in module.packed_buffers().items()}
        n = module.spec["out_features"] * module.spec["in_features"]
    else:
        items = {"weight": _float_bits(module.weight, storage_dtype)}
        n = module.weight.numel()
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        items["bias"] = _float_bits(bias, storage_dtype)
    return {"items": items, "weights": n, "bpw": sum(items.values()) / n}


def codec_bits(codec: str, spec: dict, storage_dtype: str | None = None) -> dict[str, int]:
    """Bits per stored buffer of one layer under ``spec``, from the codec's buffer shapes (no weights needed).

    ``storage_dtype``: count float32 buffers at that width, as a checkpoint stores them (:func:`layer_bits`)."""
    from .codecs import get_codec

    def width(dtype) -> int:
        return _DTYPE_BITS[storage_dtype] if storage_dtype and dtype == torch.float32 else dtype.itemsize * 8

    return {name: math.prod(shape) * width(dtype)
            for name, (shape, dtype) in get_codec(codec).buffer_shapes(spec).items()}


#: what each stored buffer is, for itemised reports: (kind, buffer names)
ITEM_KINDS = (
    ("codes", ("codes", "idx", "res_idx", "qweight", "signs", "res_signs", "split")),
    ("codebooks", ("codebook", "res_codebook")),
    ("scales", ("scale", "zero", "scale_pos", "scale_neg", "w_scale", "act_scale", "super_scale", "super_min",
                "sub_scale", "sub_min", "shared_exp", "block_scale", "tensor_scale", "scale_codes", "zero_codes",
                "scale_step", "scale_lo", "zero_step", "zero_lo", "scale_sal1", "scale_sal2", "scale_dense",
                "scale_sparse", "out_scale", "in_scale", "group_scale")),
    ("outliers", ("outlier_cols", "out_idx", "out_codebook", "outlier_values", "outlier_counts", "salient_cols")),
    ("norms", ("col_scale", "col_bias")),
)


def item_kind(name: str) -> str:
    """The kind (``codes``, ``codebooks``, ``scales``, ``outliers``, ``norms``, else ``other``) of a buffer."""
    return next((kind for kind, names in ITEM_KINDS if name in names), "other")


def count_params(model: nn.Module) -> int:
    """Parameters of a float model, tied tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def stored_bits(model: nn.Module, storage_dtype: str) -> int:
    """Bits of every tensor ``model`` stores (its state dict at the storage dtype, tied tensors counted once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += _float_bits(t, storage_dtype)
    return total


def bpw_report(model: nn.Module, storage_dtype: str = "float16", n_params: int | None = None) -> dict:
    """Per-layer and whole-model bpw. ``n_params``: original parameter count for ``all_in``."""
    arch = arch_for(model)
    layers, bits, weights, items = {}, 0, 0, {}
    for i, block in enumerate(get_module(model, arch.blocks)):
        for name in arch.linears:
            rep = layer_bits(get_module(block, name), storage_dtype)
            layers[f"{arch.blocks}.{i}.{name}"] = rep
            bits += sum(rep["items"].values())
            weights += rep["weights"]
            for item, b in rep["items"].items():
                items[item] = items.get(item, 0) + b
    for path in (arch.embed, arch.head):
        layers[path] = layer_bits(get_module(model, path), storage_dtype)
    total_bits = stored_bits(model, storage_dtype)
    n_params = n_params or getattr(model, "lowbit_n_params", None) or count_params(model)
    return {
        "blocks": bits / weights,
        "all_in": total_bits / n_params,
        "blocks_bits": bits,
        "blocks_weights": weights,
        "blocks_items": items,
        "total_bits": total_bits,
        "n_params": n_params,
        "storage_dtype": storage_dtype,
        "layers": layers,
    }
