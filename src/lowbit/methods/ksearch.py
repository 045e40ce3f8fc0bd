"""K-quant search: parameters chosen inside the K-quant structure, not only rounded onto it.

``ksearch`` (data-free) and ``ksearch-imatrix`` (weighted by the calibration activations' per-channel mean
square, llama.cpp's importance matrix) run :func:`lowbit.formats.kquant.search_kquant` on every linear whose
rows are whole super-blocks: per sub-block a grid of candidate ranges with a least-squares refit, the sub-scales
and mins rounded onto the super-block grid, then alternating refinement of the fp16 super-block scales and the
integer sub-scales given the codes. Every super-block keeps the best parameters it saw, plain RTN's included, so
its (weighted) error never exceeds RTN's. Layers of other widths take the format's int fallback by plain RTN.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..formats import KQuantFormat, quantize_rtn
from ..formats.kquant import search_kquant
from .registry import register_method

__all__ = ["KSearchConfig"]


@dataclass(frozen=True)
class KSearchConfig:
    ks_grid: int = 20     # candidate ranges per sub-block, minus one (steps of the search grid)
    ks_iters: int = 4     # rounds of alternating refinement (super-block scales, then integer sub-scales)


def _search(weight, fmt, cfg: KSearchConfig, importance=None):
    if not isinstance(fmt, KQuantFormat):
        raise ConfigError(f"the K-quant search needs a K-quant format (--format q2_k ... q6_k), got {fmt.spec()}")
    if cfg.ks_grid < 1 or cfg.ks_iters < 0:
        raise ConfigError(f"--ks-grid must be at least 1 and --ks-iters at least 0, got {cfg.ks_grid}, {cfg.ks_iters}")
    layer_fmt = fmt.for_width(weight.shape[1])
    if layer_fmt is not fmt:
        return quantize_rtn(weight, layer_fmt)
    return search_kquant(weight, fmt, importance, cfg.ks_grid, cfg.ks_iters)


@register_method("ksearch", config=KSearchConfig)
def ksearch(weight, stats, fmt, cfg: KSearchConfig):
    """K-quant search inside the super-block structure, minimising the weight error."""
    return _search(weight, fmt, cfg)


@register_method("ksearch-imatrix", config=KSearchConfig, needs={"act_sqmean"})
def ksearch_imatrix(weight, stats, fmt, cfg: KSearchConfig):
    """K-quant search weighted by the calibration activations' mean square per input channel (importance matrix)."""
    return _search(weight, fmt, cfg, stats.sqmean)
