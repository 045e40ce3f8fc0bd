"""Inference runtime: a lean decode loop over (quantized) models."""
from .decode import LeanDecoder, lean_supported

__all__ = ["LeanDecoder", "lean_supported"]
