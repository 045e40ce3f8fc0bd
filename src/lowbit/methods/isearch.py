"""``rtn-imatrix``: round-to-nearest with each group's int parameters searched under an importance matrix.

The importance of an input column is the calibration activations' mean square on it (``act_sqmean``, what
llama.cpp's ``llama-imatrix`` collects): a weight error on column ``c`` costs about ``E[x_c^2] * dw^2`` on the
layer output when the inputs are uncorrelated. :func:`lowbit.formats.scale_search.search_int_scales` tries
candidate steps around RTN's per group, refits each by weighted least squares and keeps the best, RTN included,
so every group's weighted error is at most RTN's. The codes and parameters are the ``int`` format's, exported and
packed like RTN's.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..formats.scale_search import search_int_scales
from .registry import register_method

__all__ = ["ISearchConfig"]


@dataclass(frozen=True)
class ISearchConfig:
    isearch_grid: int = 18     # candidate steps per group, minus one (18: llama.cpp's 19 steps of 0.1)
    isearch_iters: int = 2     # least-squares refits from the best candidate


@register_method("rtn-imatrix", config=ISearchConfig, needs={"act_sqmean"})
def rtn_imatrix(weight, stats, fmt, cfg: ISearchConfig):
    """RTN with each group's int scale (and zero) searched, weighted by the inputs' mean square per channel."""
    return search_int_scales(weight, fmt, stats.sqmean, cfg.isearch_grid, cfg.isearch_iters)
