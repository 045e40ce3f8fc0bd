"""lowbit: extreme low-bit quantization of LLMs, on a laptop CPU and on GPUs by the same code."""
from ._version import __version__

from .api import load, load_model, quantize, save  # noqa: E402

__all__ = ["__version__", "quantize", "save", "load", "load_model"]
