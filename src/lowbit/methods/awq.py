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
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..formats import group_layout, quantize_rtn
from ..models.arch import ArchSpec, InputGroup, get_module
from .registry import register_method

log = logging.getLogger(__name__)

__all__ = ["AWQConfig", "awq_scale_search", "awq_clip_search"]


@dataclass(frozen=True)
class AWQConfig:
    n_grid: int = 20             # scale exponents tried in [0, 1)
    search_windows: int = 16     # calibration windows used by the scale search (CPU budget)
    awq_clip: bool = True        # AWQ's output-aware clipping search
    clip_tokens: int = 512       # tokens for the clipping search
    clip_grid: int = 20          # shrink ratios tried, from 1.0 down to 0.5


def _qdq(w: torch.Tensor, fmt) -> torch.Tensor:
    return quantize_rtn(w, fmt).dequantize()


def _inspect_fn(block: nn.Module, group: InputGroup, kwargs: dict, window: int, batch: int):
    """The module whose output AWQ watches for ``group``, as a function of ``(tokens, in)`` inputs.

    Attention for q/k/v (run per batch of whole windows, with the block's
    mask and position arguments), the MLP for gate/up, else the linear itself.
    """
    from ..calib.engine import batch_kwargs

    names = group.linears
    if any(n.endswith("q_proj") for n in names):
        attn = get_module(block, names[0].rsplit(".", 1)[0])
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
    if len(names) > 1:  # gate/up feed the MLP
        return get_module(block, names[0].rsplit(".", 1)[0])
    return get_module(block, names[0])


def _fold(block: nn.Module, arch: ArchSpec, group: InputGroup, s: torch.Tensor) -> bool:
    """Divide the producer of ``group``'s input by ``s``; False when nothing can absorb it."""
    if group.prev is None:
        return False
    prev = get_module(block, group.prev)
    if group.prev_kind == "norm":
        w = prev.weight.data
        prev.weight.data = ((w.float() + arch.norm_offset) / s - arch.norm_offset).to(w.dtype)
        if getattr(prev, "bias", None) is not None:
            prev.bias.data = (prev.bias.data.float() / s).to(prev.bias.dtype)
        return True
    if group.prev_kind == "linear":
        if prev.weight.shape[0] != s.numel():  # e.g. v_proj -> o_proj under grouped-query attention
            return False
        prev.weight.data = (prev.weight.data.float() / s[:, None]).to(prev.weight.dtype)
        if prev.bias is not None:
            prev.bias.data = (prev.bias.data.float() / s).to(prev.bias.dtype)
        return True
    return False


def _can_fold(block, group: InputGroup) -> bool:
    if group.prev is None:
        return False
    if group.prev_kind == "linear":
        prev = get_module(block, group.prev)
        return prev.weight.shape[0] == get_module(block, group.linears[0]).weight.shape[1]
    return True


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
                lin.weight.data = _qdq(w * s, fmt) / s
            loss = (inspect(x) - ref).float().pow(2).mean().item()
            if k == 0:
                base = loss
            if loss < best:
                best, best_s = loss, s.clone()
    finally:
        for lin, w in zip(linears, org):
            lin.weight.data = w
    return best_s, best, base


@torch.no_grad()
def awq_clip_search(w: torch.Tensor, x: torch.Tensor, fmt, n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Per (row, group) clip value for ``w`` minimising the group's output error on tokens ``x``.

    Returns ``w`` clamped to ``[-m, m]`` per group (the reference clips symmetrically around 0).
    """
    rows, cols = w.shape
    lay = group_layout(cols, fmt.group_size)
    wg = lay.to_groups(w)                                      # (rows, G, gs)
    mask = lay.mask(w.device).to(w.dtype)                      # (G, gs)
    xg = lay.to_groups(x) * mask                               # (T, G, gs), padding zeroed
    amax = wg.abs().amax(-1, keepdim=True)                     # (rows, G, 1)
    best_err = torch.full((rows, lay.n_groups, 1), float("inf"), device=w.device)
    best_m = amax.clone()
    for i in range(n_grid):
        m = amax * (1 - max_shrink * i / n_grid)
        wc = torch.maximum(torch.minimum(wg, m), -m)
        q = lay.to_groups(_qdq(lay.from_groups(wc), fmt))
        d = (q - wg) * mask                                     # (rows, G, gs)
        err = torch.einsum("tgk,rgk->trg", xg, d).pow(2).mean(0).unsqueeze(-1)  # (rows, G, 1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_m = torch.where(better, m, best_m)
    return lay.from_groups(torch.maximum(torch.minimum(wg, best_m), -best_m))


def awq_prepare_block(data, arch: ArchSpec, stats, fmt, cfg: AWQConfig) -> None:
    """Scale search + folding for every input group, then the clipping search, on float weights."""
    block = data.block
    n_win = max(1, cfg.search_windows)
    for group in arch.groups:
        st = stats[group]
        if not _can_fold(block, group):
            continue
        linears = [get_module(block, n) for n in group.linears]
        x = torch.cat(st.inputs, 0)                              # (N*T, in) fp32, on CPU
        window = data.inputs[0].shape[1]
        x = x[: n_win * window].to(data.device)                  # the first windows, whole
        inspect = _inspect_fn(block, group, data.kwargs, window, data.inputs[0].shape[0])
        s, best, base = awq_scale_search(linears, x, st.absmean.to(data.device), inspect, fmt, cfg.n_grid)
        log.debug("block %d %s: awq loss %.3g (base %.3g)", data.index, group.linears, best, base)
        if _fold(block, arch, group, s):
            for lin in linears:
                lin.weight.data = lin.weight.data * s
        # the group's recorded inputs are in the old scale: divide for the clipping search
        st.inputs = [t / s.to(t.device) for t in st.inputs]
    if cfg.awq_clip:
        for group in arch.groups:
            st = stats[group]
            x = torch.cat(st.inputs, 0)
            step = max(1, x.shape[0] // cfg.clip_tokens)
            x = x[::step][: cfg.clip_tokens].to(data.device)
            for name in group.linears:
                if name.endswith(("q_proj", "k_proj")):  # the reference skips q/k: their error is hard to see on outputs
                    continue
                lin = get_module(block, name)
                lin.weight.data = awq_clip_search(lin.weight.data.float(), x, fmt, cfg.clip_grid).to(lin.weight.dtype)


@register_method("awq", config=AWQConfig, needs={"act_absmean", "inputs"}, prepare_block=awq_prepare_block)
def awq(weight, stats, fmt, cfg: AWQConfig):
    """AWQ: activation-aware scaling and clipping around RTN."""
    return quantize_rtn(weight, fmt)
