"""Evaluation: perplexity and zero-shot tasks, under recorded protocols."""
from .ppl import PROTOCOL_VERSION, PPLProtocol, make_windows, perplexity

__all__ = ["PROTOCOL_VERSION", "PPLProtocol", "make_windows", "perplexity"]
