"""Importing this module registers every built-in method."""
from . import (awq, billm, clipinit, dgq, flattenquant, gptq, isearch, ksearch, onebit, rtn, smoothquant,  # noqa: F401
               smoothquant_plus, spqr, vptq)
