"""AWQ: activation-aware per-input-channel scaling, then a clipping search (Lin et al., 2023).

AWQ is a *transform* around a base rounding method (RTN with the chosen
format): it rescales input channels so salient ones lose less to rounding,
folds the inverse scale into the module that produces the input (a norm,
or the previous linear when shapes allow), and searches per-group clipping
on the layer output. Rounding itself is the format's, as for every method.

Per input group (linears sharing an input), following the reference
algorithm: ``s = mean|x| ** a`` normalised by ``sqrt(max(s) * min(s))``, with
``a`` on a grid in [0, 1); the ``a`` that minimises the inspected module's
output MSE on calibration tokens wins. ``a = 0`` gives ``s = 1``, the base
method itself, so the search can only match or improve on it (on the
tokens searched).

``--awq-scale-search`` then rounds each linear with the importance-weighted scale search
(:func:`lowbit.formats.scale_search.search_int_scales`, int format only) instead of plain RTN, the importance
being the mean square of the group's sampled (rescaled) input tokens per channel.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..calib.fold import can_fold, fold_scale
from ..formats import quantize_rtn
from ..formats.scale_search import search_int_scales
from ..models.arch import ArchSpec, InputGroup, get_module
from .clipinit import clip_block
from .registry import register_method

log = logging.getLogger(__name__)

__all__ = ["AWQConfig", "awq_scale_search"]


@dataclass(frozen=True)
class AWQConfig:
    n_grid: int = 20             # scale exponents tried in [0, 1)
    search_windows: int = 16     # calibration windows used by the scale search (CPU budget)
    awq_clip: bool = True        # AWQ's output-aware clipping search
    clip_tokens: int = 512       # tokens for the clipping search
    clip_grid: int = 20          # shrink ratios tried, from 1.0 down to 0.5
    awq_scale_search: bool = False  # round with the int scale search weighted by the inputs' mean square


def _inspect_fn(block: nn.Module, arch: ArchSpec, group: InputGroup, kwargs: dict, window: int, batch: int):
    """The module whose output AWQ watches for ``group`` (``group.feeds``), as a function of ``(tokens, in)`` inputs.

    Attention runs per batch of whole windows, with the block's mask and
    position arguments; any other module (the MLP, a lone linear) on the
    tokens directly.
    """
    from ..calib.engine import batch_kwargs

    if group.feeds == arch.attention:
        attn = get_module(block, group.feeds)
        kw = {k: v for k, v in kwargs.items() if k != "use_cache"}

        def f(x):
            xs = x.view(-1, window, x.shape[-1])  # (windows, T, hidden)
            outs = []
            for i in range(0, xs.shape[0], batch):
                chunk = xs[i : i + batch]
                out = attn(hidden_states=chunk, **batch_kwargs(kw, chunk.shape[0]))
                out = out[0] if isinstance(out, tuple) else out  # (b, T, hidden)
                outs.append(out.reshape(-1, out.shape[-1]))
            return torch.cat(outs)

        return f
    return get_module(block, group.feeds or group.linears[0])


@torch.no_grad()
def awq_scale_search(linears: list[nn.Linear], x: torch.Tensor, absmean: torch.Tensor, inspect, fmt,
                     n_grid: int) -> tuple[torch.Tensor, float, float]:
    """Best per-input-channel scale for ``linears`` reading ``x``: ``(s, best_loss, base_loss)``."""
    org = [lin.weight.data.clone() for lin in linears]
    ref = inspect(x)
    best, best_s, base = float("inf"), torch.ones_like(absmean), None
    try:
        for k in range(n_grid):
            a = k / n_grid
            s = absmean.pow(a).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for lin, w in zip(linears, org):
                lin.weight.data = quantize_rtn(w * s, fmt).dequantize() / s
            loss = (inspect(x) - ref).float().pow(2).mean().item()
            if k == 0:
                base = loss
            if loss < best:
                best, best_s = loss, s.clone()
    finally:
        for lin, w in zip(linears, org):
            lin.weight.data = w
    return best_s, best, base


def awq_prepare_block(data, arch: ArchSpec, stats, fmt, cfg: AWQConfig) -> None:
    """Scale search + folding for every input group, then the clipping search, on float weights."""
    block = data.block
    n_win = max(1, cfg.search_windows)
    for group in arch.groups:
        st = stats[group]
        if not can_fold(block, group):
            st.inputs = [st.token_sample(cfg.clip_tokens)]       # all the clipping search reads: the rest is freed
            continue
        linears = [get_module(block, n) for n in group.linears]
        window = data.inputs[0].shape[1]
        x = st.first_tokens(n_win * window).to(data.device)      # (n_win*T, in) fp32: the first windows, whole
        inspect = _inspect_fn(block, arch, group, data.kwargs, window, data.inputs[0].shape[0])
        s, best, base = awq_scale_search(linears, x, st.absmean.to(data.device), inspect, fmt, cfg.n_grid)
        log.debug("block %d %s: awq loss %.3g (base %.3g)", data.index, group.linears, best, base)
        fold_scale(block, arch, group, s)
        # the group's recorded inputs are in the old scale: divide for the clipping search (and the scale search
        # rounding), which read only this sample (token_sample of it, with the same count, is itself)
        sample = st.token_sample(cfg.clip_tokens)
        st.inputs = [sample / s.to(sample.device)]
    if cfg.awq_clip:   # the reference skips q/k: their error is hard to see on outputs
        clip_block(data, arch, stats, fmt, cfg.clip_grid, cfg.clip_tokens, sym=True)


@register_method("awq", config=AWQConfig, needs={"act_absmean", "inputs"}, prepare_block=awq_prepare_block)
def awq(weight, stats, fmt, cfg: AWQConfig):
    """AWQ: activation-aware scaling and clipping around RTN."""
    if cfg.awq_scale_search:
        # the group's inputs are in the folded scale (awq_prepare_block divides them by s)
        importance = stats.token_sample(cfg.clip_tokens).to(weight.device).pow(2).mean(0)    # (in,)
        return search_int_scales(weight, fmt, importance)
    return quantize_rtn(weight, fmt)
