"""Command line: thin wrappers that parse, call the library and print (``main.py``); flags generated from the
config dataclasses (``args.py``)."""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
