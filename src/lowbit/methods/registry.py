"""Methods by name. Each declares its config class and the statistics it needs.

The calibration engine reads ``needs`` to decide what to collect (nothing for
data-free methods) and never branches on a method's name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import ConfigError

__all__ = ["Method", "register_method", "get_method", "method_names"]


@dataclass(frozen=True)
class Method:
    name: str
    config: type
    quantize_linear: Callable  # (weight, stats, fmt, cfg) -> QuantizedWeight
    needs: frozenset = field(default_factory=frozenset)
    doc: str = ""
    #: optional block-level step before the linears are quantized (e.g. AWQ scaling):
    #: (BlockData, ArchSpec, {InputGroup: GroupStats}, fmt, cfg) -> None, modifies float weights in place
    #: or leaves per-group results for ``quantize_linear`` in ``GroupStats.extra``
    prepare_block: Callable | None = None
    #: optional block-level step after the linears are swapped (e.g. VPTQ's layer-wise fine-tuning):
    #: (BlockData, ArchSpec, float_outputs, cfg) -> None; ``float_outputs`` (per batch, the float block's
    #: outputs) is collected only when ``needs`` has ``block_outputs``, else None
    finish_block: Callable | None = None
    #: False for methods that bring their own number format (VQ)
    uses_format: bool = True
    #: optional whole-model step before any block is quantized (SmoothQuant+'s smoothing-strength search):
    #: (model, ArchSpec, calib_ids, fmt, cfg, device) -> dict; transforms the float model in place and returns
    #: what it found (JSON-ready), which the pipeline records in the summary as ``method_result``
    prepare_model: Callable | None = None
    #: optional cfg -> the statistics the layer-wise pass needs under that config (default: ``needs``); an
    #: empty set quantizes the blocks data-free after ``prepare_model`` (SmoothQuant+ with RTN)
    layer_needs: Callable | None = None
    #: optional whole-model step after every block is quantized, before the embedding and head formats apply
    #: (the W8A8 family's int8 LM head): (model, ArchSpec, fmt, cfg) -> None, swaps modules in place
    finish_model: Callable | None = None

    def stats_needed(self, cfg) -> frozenset:
        """What the engine collects per block for ``cfg``."""
        return self.needs if self.layer_needs is None else frozenset(self.layer_needs(cfg))


_METHODS: dict[str, Method] = {}


def register_method(name: str, config: type, needs: set[str] | frozenset = frozenset(),
                    prepare_block: Callable | None = None, finish_block: Callable | None = None,
                    uses_format: bool = True, prepare_model: Callable | None = None,
                    layer_needs: Callable | None = None, finish_model: Callable | None = None):
    """Decorator registering ``fn(weight, stats, fmt, cfg) -> QuantizedWeight``.

    ``needs``: statistics the engine collects for the method: ``hessian``,
    ``act_absmean``, ``act_absmax``, ``act_sqmean`` (per-channel mean of x²),
    ``inputs`` (the group inputs themselves), ``block_outputs`` (the float block's outputs, passed to ``finish_block``).
    Empty = data-free (no calibration pass at all). ``prepare_model``, ``layer_needs``, ``finish_model``: see :class:`Method`
    (a method with ``prepare_model`` declares in ``needs`` everything it may use, so it is given calibration data).
    ``uses_format``: False for methods with their own number format (VQ), whose
    recipe tags then leave the scalar format out.
    """

    def deco(fn):
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        _METHODS[name] = Method(name, config, fn, frozenset(needs), doc, prepare_block, finish_block, uses_format,
                                prepare_model, layer_needs, finish_model)
        return fn

    return deco


def get_method(name: str) -> Method:
    from . import _load_all  # noqa: F401  (registers the built-in methods)

    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    return _METHODS[name]


def method_names() -> list[str]:
    from . import _load_all  # noqa: F401

    return sorted(_METHODS)
