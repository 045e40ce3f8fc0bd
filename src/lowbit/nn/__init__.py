"""Quantized modules: packed weights in plain buffers, ``state_dict`` safetensors-ready."""
from .codecs import get_codec, register_codec
from .qlinear import QuantizedEmbedding, QuantizedLinear, scalar_spec, to_module
from . import binary_codec, spqr_codec, vq_codec  # noqa: F401,E402  (register the "billm", "onebit", "spqr" and "vq" codecs)

__all__ = ["QuantizedLinear", "QuantizedEmbedding", "scalar_spec", "to_module", "get_codec", "register_codec"]
