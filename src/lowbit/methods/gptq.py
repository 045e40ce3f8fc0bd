"""GPTQ: second-order error feedback, column by column (Frantar et al., 2022).

The solver is a pure function of (weight, Hessian, format): testable on a
synthetic 8x6 layer with no model. The format object does all rounding, so
every format (INT, FP, NF, two-scale) works unchanged.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from ..formats import Format, QuantizedWeight, group_layout
from ..formats.quantize import DEFAULT_CLIP_GRID, fit_groups
from ..utils import cpu_threads
from .registry import register_method

log = logging.getLogger(__name__)

__all__ = ["GPTQConfig", "gptq_quantize", "inverse_hessian_factor"]


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01        # fraction of mean diag(H) added to H
    block_size: int = 128     # columns per lazy batch update
    act_order: bool = False   # quantize columns by decreasing diag(H)
    clip: bool = False        # per-group range-shrink search when a group's parameters are fitted


def inverse_hessian_factor(h: torch.Tensor, damp: float, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of the damped inverse Hessian, and the damping used.

    Damping starts at ``damp * mean(diag(H))`` and grows tenfold while ``H``
    is not positive definite (rank-deficient calibration data).
    """
    n = h.shape[0]
    mean_diag = torch.diag(h).mean().clamp_min(1e-8)
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    d = damp
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(h + d * mean_diag * eye)
        if info == 0:
            hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0:
                return U, d
        nxt = d * 10 if d > 0 else 1e-3
        log.warning("Hessian not positive definite at damp=%g; retrying with %g", d, nxt)
        d = nxt
    raise RuntimeError(f"Hessian stays singular even at damp={d}; the calibration data may be degenerate")


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: Format, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, clip_grid=None) -> QuantizedWeight:
    """Quantize ``weight`` ``(out, in)`` given the input Hessian ``(in, in)``.

    Groups are contiguous runs of ``fmt.group_size`` original columns (the
    canonical layout, no index map stored). A group's parameters are fitted
    when its first column is reached, on the group's current (error-updated)
    weights; with ``act_order`` columns are visited by decreasing diag(H) and
    each column still uses its own original group's parameters, so act-order
    needs no extra storage.
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    rows, cols = W.shape
    lay = group_layout(cols, fmt.group_size)
    colgroup = lay.column_group(W.device)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W = W[:, perm]
    H = H[perm][:, perm]
    U, _ = inverse_hessian_factor(H, damp)
    pos_of = torch.empty_like(perm)
    pos_of[perm] = torch.arange(cols, device=W.device)  # original column -> position in visiting order

    params: dict[str, torch.Tensor] = {}
    fitted = torch.zeros(lay.n_groups, dtype=torch.bool)
    group_params: list[dict | None] = [None] * lay.n_groups
    codes = torch.zeros(rows, cols, dtype=torch.long, device=W.device)
    # column and group indices as Python ints: reading them from device tensors would sync a GPU per column
    perm_l, colgroup_l = perm.tolist(), colgroup.tolist()

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        Err = torch.zeros(rows, i2 - i1, dtype=W.dtype, device=W.device)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            p = i1 + i
            c = perm_l[p]
            g = colgroup_l[c]
            if not fitted[g]:
                gcols = torch.arange(g * lay.group_size, min((g + 1) * lay.group_size, cols), device=W.device)
                pos = pos_of[gcols]
                cur = W[:, pos].clone()
                later = pos >= i2  # their share of this block's updates is still pending
                if later.any() and i > 0:
                    cur[:, later] -= Err[:, :i] @ U[i1 : i1 + i][:, pos[later]]
                wg = cur.unsqueeze(1)  # (rows, 1, group columns)
                gp = fit_groups(fmt, wg, torch.ones(1, wg.shape[-1], dtype=torch.bool, device=W.device), clip_grid)
                group_params[g] = {k: v[:, 0] for k, v in gp.items()}  # (rows, 1)
                fitted[g] = True
            gp = group_params[g]
            w = W[:, p : p + 1]
            q = fmt.quantize(w, gp)
            codes[:, c] = q[:, 0]
            err = (w - fmt.dequantize(q, gp)) / U1[i, i]
            W[:, p + 1 : i2] -= err @ U1[i : i + 1, i + 1 :]
            Err[:, i : i + 1] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]
    for k in group_params[0]:
        params[k] = torch.cat([group_params[g][k] for g in range(lay.n_groups)], dim=1)  # (rows, G)
    return QuantizedWeight(fmt, codes, params)


@register_method("gptq", config=GPTQConfig, needs={"hessian"})
def gptq(weight, stats, fmt, cfg: GPTQConfig):
    """GPTQ with lazy batch updates, group-wise parameters and optional act-order."""
    with cpu_threads(1) if weight.device.type == "cpu" else contextlib.nullcontext():
        return gptq_quantize(weight, stats.hessian, fmt, cfg.damp, cfg.block_size, cfg.act_order,
                             DEFAULT_CLIP_GRID if cfg.clip else None)
