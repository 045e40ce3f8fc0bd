"""Importing this module registers every built-in method."""
from . import awq, clipinit, flattenquant, gptq, isearch, ksearch, rtn, smoothquant, smoothquant_plus, spqr, vptq  # noqa: F401
