"""Every quantized module type by kind: its JSON entry (``{"type": kind, "spec": module.spec, ...}``, plus what
its constructor needs besides the spec) and how it is rebuilt from one. Checkpoints and the calibration engine's
resume folders both use this one table, so every module type is recorded and rebuilt alike."""
from __future__ import annotations

from torch import nn

from ..errors import CheckpointError
from .dgq import QuantizedDGQLinear
from .qlinear import QuantizedEmbedding, QuantizedLinear
from .w8a8 import QuantizedActLinear

__all__ = ["MODULE_KINDS", "module_entry", "module_entries", "build_module"]


def _bias(m):
    return {"bias": m.bias is not None}


#: kind -> (class, module -> entry fields besides type and spec, (spec, entry) -> module with zero buffers);
#: a subclass comes before its base (module_entry takes the first kind the module is an instance of)
MODULE_KINDS = {
    "linear": (QuantizedLinear, _bias, lambda spec, e: QuantizedLinear(spec, e.get("bias", False))),
    "dgq_linear": (QuantizedDGQLinear, _bias, lambda spec, e: QuantizedDGQLinear(spec, e.get("bias", False))),
    "act_linear": (QuantizedActLinear, _bias, lambda spec, e: QuantizedActLinear(spec, e.get("bias", False))),
    "embedding": (QuantizedEmbedding, lambda m: {"padding_idx": m.padding_idx, "embed_scale": m.embed_scale},
                  lambda spec, e: QuantizedEmbedding(spec, e.get("padding_idx"), e.get("embed_scale"))),
}


def module_entry(m: nn.Module) -> dict | None:
    """The JSON-ready entry of a quantized module, or None for any other module."""
    for kind, (cls, entry, _) in MODULE_KINDS.items():
        if isinstance(m, cls):
            return {"type": kind, "spec": m.spec, **entry(m)}
    return None


def module_entries(model: nn.Module) -> dict:
    """``{module name: entry}`` for every quantized module of ``model``."""
    entries = ((name, module_entry(m)) for name, m in model.named_modules())
    return {name: e for name, e in entries if e is not None}


def build_module(name: str, entry: dict) -> nn.Module:
    """An empty quantized module (zero buffers) from its :func:`module_entry`; load the state dict next."""
    if entry["type"] not in MODULE_KINDS:
        raise CheckpointError(f"module {name!r} has unknown type {entry['type']!r}; known: {', '.join(MODULE_KINDS)}")
    return MODULE_KINDS[entry["type"]][2](entry["spec"], entry)
