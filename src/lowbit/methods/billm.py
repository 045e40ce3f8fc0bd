"""BiLLM: post-training binarization with salient columns and a split of the bell-shaped rest (Huang et al., 2024).

Per linear ``(out, in)`` with input Hessian ``H`` (layout: :mod:`lowbit.formats.binary`, storage:
:mod:`lowbit.nn.binary_codec`). ``U`` is the upper Cholesky factor of the damped ``H^-1`` (GPTQ's), ``d_j = U_jj``,
and every error below is GPTQ's per-weight proxy ``sum_ij ((w_ij - q_ij) / d_j)^2``.

Columns go left to right with GPTQ's error feedback (:mod:`.feedback`, the loop GPTQ, SpQR and VPTQ share), in
blocks of ``block_size`` columns (128, as in the paper). At the first column of each block, on the block's current
(error-updated) weights:

1. *salient columns*: each column's salience ``sum_i w_ij^2 / d_j^2`` (the reference code's Hessian metric: the
   paper writes ``w^2 / [H^-1]_jj^2``, the code divides by the squared diagonal of the factor ``U``); the
   ``n`` most salient columns for each ``n`` in ``0..max_salient`` are residually binarized
   (``a1 * sign(w) + a2 * sign(w - a1 * sign(w))``) and the rest, as a stand-in, too; the ``n`` with the least error
   is kept (the reference code's two-stage search: salient count first, break point second);
2. *break point*: the non-salient weights split at ``|w| > p`` into a dense centre and sparse tails, one scale each;
   ``p`` runs over ``split_grid`` quantiles of their ``|w|`` from 10% to 90% (the reference code's grid, 81 points)
   and the ``p`` with the least error is kept;
3. the four scales per row (``a1``, ``a2``, dense, sparse) are fitted and rounded to fp16, each the ``1/d^2``-weighted
   mean of ``|w|`` over its weights (optimal for their signs, so the residual step never raises the error).

Then each column is binarized with its block's scales, salient columns and break point, from its error-updated
values (the split bit and both signs are taken per weight there), and its error flows to the later columns.

Differences from the reference code: the scales are Hessian-weighted and carry no per-row mean (the brief's
``a1 * sign(w) + a2 * sign(w - a1 * sign(w))``, 4 fp16 values per row and block instead of 8); the searches
measure the error of the weights (``1/d^2``-weighted), not of the salience metric itself; ``n = 0`` salient columns
may be chosen; within a block the columns get GPTQ's column-by-column feedback (the reference binarizes a whole block
at once and feeds its error only to later blocks). Stored honestly, the split bitmap alone costs 1 bit per
non-salient weight, so a layer takes about ``2 + 64 / block_size`` bits per weight, not the paper's ~1.1
(which counts the sign bits and the salient columns' second signs only; docs/methods.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..formats.binary import BiLLMWeight, pm_one, residual_binarize, salient_qdq, sign_bits, split_binarize
from .feedback import error_feedback, inverse_hessian_factor, live_copies, loop_threads
from .registry import register_method

__all__ = ["BiLLMConfig", "billm_solve", "search_block"]


@dataclass(frozen=True)
class BiLLMConfig:
    block_size: int = 128     # columns per lazy batch update (BiLLM: and per search and scales; paper: 128)
    max_salient: int = 50     # most salient columns tried per block (reference code: 50 candidates)
    split_grid: int = 81      # break points tried: quantiles 10%..90% of the non-salient |w| (reference code: 81)
    damp: float = 0.01        # fraction of mean diag(H) added to H

    def __post_init__(self):
        if self.block_size < 1 or self.max_salient < 0 or self.split_grid < 1:
            raise ConfigError("--block-size and --split-grid must be at least 1 and --max-salient at least 0")


@dataclass
class BlockFit:
    """What a block's search chose: its salient columns ``(k,)`` bool, the break point (a 0-dim tensor) and the
    four fp16 scales ``(rows, 1)``."""

    salient: torch.Tensor
    p: torch.Tensor
    a1: torch.Tensor
    a2: torch.Tensor
    a_dense: torch.Tensor
    a_sparse: torch.Tensor


def _err(w: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> float:
    return float(((w - q).square() * c).sum())


def search_block(wb: torch.Tensor, c: torch.Tensor, max_salient: int, split_grid: int) -> BlockFit:
    """BiLLM's structure search on one block ``wb`` ``(rows, k)`` with column weights ``c = 1 / d^2`` ``(k,)``."""
    k = wb.shape[1]
    order = torch.argsort((wb.square() * c).sum(0), descending=True)
    best = None
    for n in range(min(max_salient, k) + 1):
        sal = torch.zeros(k, dtype=torch.bool, device=wb.device)
        sal[order[:n]] = True
        q_sal = residual_binarize(wb, sal, c)[2]
        q_rest = residual_binarize(wb, ~sal, c)[2]
        e = _err(wb, torch.where(sal, q_sal, q_rest), c)
        if best is None or e < best[0]:
            best = (e, sal)
    sal = best[1]
    a1, a2, _ = residual_binarize(wb, sal, c)
    rest = wb[:, ~sal].abs().flatten()
    p = torch.zeros((), device=wb.device)
    a_d = a_s = torch.zeros(wb.shape[0], 1, device=wb.device)   # every column salient: no dense or sparse group
    if rest.numel():
        qs = torch.linspace(0.1, 0.9, split_grid) if split_grid > 1 else torch.tensor([0.5])
        best = None
        for cand in torch.quantile(rest, qs.to(rest.device)):
            a_d, a_s, q = split_binarize(wb[:, ~sal], torch.ones(1, dtype=torch.bool, device=wb.device), cand, c[~sal])
            e = _err(wb[:, ~sal], q, c[~sal])
            if best is None or e < best[0]:
                best = (e, cand, a_d, a_s)
        _, p, a_d, a_s = best
    return BlockFit(sal, p, a1, a2, a_d, a_s)


@torch.no_grad()
def billm_solve(weight: torch.Tensor, hessian: torch.Tensor, cfg: BiLLMConfig) -> tuple[BiLLMWeight, torch.Tensor]:
    """BiLLM of ``weight`` ``(out, in)`` given the input Hessian ``(in, in)``: the binarized weight and the
    ``(out, in)`` values the error feedback used for each column (equal to ``qw.dequantize()``; returned for tests)."""
    W, H = live_copies(weight, hessian)
    rows, cols = W.shape
    bs = cfg.block_size
    U, _ = inverse_hessian_factor(H, cfg.damp)
    c_all = torch.diag(U).square().reciprocal()   # (in,) 1 / d_j^2
    n_blocks = -(-cols // bs)
    signs = torch.zeros(rows, cols, dtype=torch.long, device=W.device)
    second = torch.zeros_like(signs)   # residual sign (salient columns) or split bit (the others)
    salient = torch.zeros(cols, dtype=torch.bool, device=W.device)
    scales = {k: torch.zeros(rows, n_blocks, device=W.device) for k in ("sal1", "sal2", "dense", "sparse")}
    used = torch.zeros_like(W)
    fit: list[BlockFit] = []
    sal_of = [False] * cols

    def quantize_column(c, w, current):
        b, j = divmod(c, bs)
        if j == 0:
            cs = torch.arange(c, min(c + bs, cols), device=W.device)
            fit[:] = [search_block(current(cs), c_all[cs], cfg.max_salient, cfg.split_grid)]
            f = fit[0]
            salient[cs] = f.salient
            sal_of[c : c + len(cs)] = f.salient.tolist()   # Python bools: no device sync per column
            for k, v in zip(scales, (f.a1, f.a2, f.a_dense, f.a_sparse)):
                scales[k][:, b] = v[:, 0]
        f = fit[0]
        if sal_of[c]:
            s, s2, deq = salient_qdq(w, f.a1, f.a2)
        else:
            s, s2 = sign_bits(w), (w.abs() > f.p).long()
            deq = torch.where(s2.bool(), f.a_sparse, f.a_dense) * pm_one(s)
        signs[:, c], second[:, c], used[:, c] = s[:, 0], s2[:, 0], deq[:, 0]
        return deq

    error_feedback(W, H, cfg.damp, bs, False, quantize_column, U=U)
    qw = BiLLMWeight(rows, cols, bs, signs, second[:, salient], salient.long(), second[:, ~salient],
                     scales["sal1"], scales["sal2"], scales["dense"], scales["sparse"])
    return qw, used


@register_method("billm", config=BiLLMConfig, needs={"hessian"}, uses_format=False)
def billm(weight, stats, fmt, cfg: BiLLMConfig):
    """BiLLM: Hessian-salient columns binarized twice, the rest split at a searched break point, GPTQ feedback."""
    # a method with its own storage: the scalar ``fmt`` the engine passes is not used
    with loop_threads(weight.device):
        return billm_solve(weight, stats.hessian, cfg)[0]
