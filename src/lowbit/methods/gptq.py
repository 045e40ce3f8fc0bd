"""GPTQ: second-order error feedback, column by column (Frantar et al., 2022).

The solver is a pure function of (weight, Hessian, format): testable on a
synthetic 8x6 layer with no model. The column loop is :mod:`.feedback`'s
(VPTQ shares it); here a column is rounded by the format object, so every
format (INT, FP, NF, two-scale) works unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import ConfigError
from ..formats import Format, QuantizedWeight, group_layout
from ..formats.integer import IntFormat
from ..formats.quantize import DEFAULT_CLIP_GRID, fit_groups
from ..formats.scale_search import search_int_scales
from .feedback import error_feedback, live_copies, loop_threads
from .registry import register_method

__all__ = ["GPTQConfig", "gptq_quantize"]


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01        # fraction of mean diag(H) added to H
    block_size: int = 128     # columns per lazy batch update
    act_order: bool = False   # quantize columns by decreasing diag(H)
    clip: bool = False        # per-group range-shrink search when a group's parameters are fitted
    gptq_scale_search: bool = False  # int: fit group parameters by the scale search weighted by diag(H)
    first_position_weight: float = 1.0  # weight of each calibration window's first position in H (1 = plain)

    def __post_init__(self):
        if self.clip and self.gptq_scale_search:
            raise ConfigError("--clip and --gptq-scale-search both choose the group parameters: pick one")
        if not self.first_position_weight >= 0:
            raise ConfigError(f"--first-position-weight must be >= 0, got {self.first_position_weight}")


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: Format, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, clip_grid=None,
                  scale_search: bool = False) -> QuantizedWeight:
    """Quantize ``weight`` ``(out, in)`` given the input Hessian ``(in, in)``.

    Groups are contiguous runs of ``fmt.group_size`` original columns (the
    canonical layout, no index map stored). A group's parameters are fitted
    when its first column is reached, on the group's current (error-updated)
    weights (a K-quant's whole super-block at once, ``fmt.fit_span`` groups); with ``act_order`` columns are visited by decreasing diag(H) and
    each column still uses its own original group's parameters, so act-order
    needs no extra storage. ``scale_search`` (int format): a group's parameters come from the
    importance-weighted scale search on those weights, the importance being diag(H) of its columns (the
    calibration inputs' mean square per channel, up to a factor).
    """
    W, H = live_copies(weight, hessian)
    rows, cols = W.shape
    fmt = fmt.for_weight(W)
    lay = group_layout(cols, fmt.group_size)
    span = fmt.fit_span   # groups fitted together (a K-quant's super-block)
    if scale_search and (not isinstance(fmt, IntFormat) or span != 1):
        raise ConfigError(f"--gptq-scale-search needs the int format (--format int), got {fmt.spec()}")
    imp = torch.diagonal(H).clone() if scale_search else None
    colgroup = lay.column_group(W.device).tolist()   # Python ints: no GPU sync per column
    group_params: list[dict | None] = [None] * lay.n_groups
    codes = torch.zeros(rows, cols, dtype=torch.long, device=W.device)

    def quantize_column(c, w, current):
        g = colgroup[c]
        if group_params[g] is None:
            g0 = g - g % span
            wg = current(torch.arange(g0 * lay.group_size, min((g0 + span) * lay.group_size, cols), device=W.device))
            k = -(-wg.shape[1] // lay.group_size) if span > 1 else 1
            if imp is not None:   # span 1: the one group, searched with its columns' diag(H) as importance
                cols_g = slice(g * lay.group_size, g * lay.group_size + wg.shape[1])
                p = search_int_scales(wg, replace(fmt, group_size=wg.shape[1]), imp[cols_g]).params
                group_params[g] = {name: v[:, :1] for name, v in p.items()}   # (rows, 1)
            else:
                wg = wg.view(rows, k, -1)  # (rows, groups fitted together, group columns)
                gp = fit_groups(fmt, wg, torch.ones(k, wg.shape[-1], dtype=torch.bool, device=W.device), clip_grid)
                for j in range(k):
                    group_params[g0 + j] = {name: v[:, j] for name, v in gp.items()}  # (rows, 1)
        q = fmt.quantize(w, group_params[g])
        codes[:, c] = q[:, 0]
        return fmt.dequantize(q, group_params[g])

    error_feedback(W, H, damp, block_size, act_order, quantize_column)
    params = {k: torch.cat([gp[k] for gp in group_params], dim=1) for k in group_params[0]}  # (rows, G)
    return QuantizedWeight(fmt, codes, params)


@register_method("gptq", config=GPTQConfig, needs={"hessian"})
def gptq(weight, stats, fmt, cfg: GPTQConfig):
    """GPTQ with lazy batch updates, group-wise parameters and optional act-order."""
    with loop_threads(weight.device):
        return gptq_quantize(weight, stats.hessian, fmt, cfg.damp, cfg.block_size, cfg.act_order,
                             DEFAULT_CLIP_GRID if cfg.clip else None, cfg.gptq_scale_search)
