"""Second-order error feedback: the column loop GPTQ (scalars) and VPTQ (vectors) share (Frantar et al., 2022).

Each quantized column's error, scaled by the upper Cholesky factor ``U`` of the damped inverse Hessian, is
subtracted from the columns not quantized yet: at once inside a block of ``block_size`` columns, once per
block for the columns after it (lazy batch updates). How a column is quantized is the caller's.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch

from ..utils import cpu_threads

log = logging.getLogger(__name__)

__all__ = ["inverse_hessian_factor", "live_copies", "error_feedback", "loop_threads"]


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


def loop_threads(device: torch.device):
    """The thread setting a column loop runs under: one intra-op thread on a CPU (its thousands of tiny ops lose
    more to thread synchronisation than they gain, :func:`lowbit.utils.cpu_threads`), unchanged elsewhere."""
    return cpu_threads(1) if device.type == "cpu" else contextlib.nullcontext()


def live_copies(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 copies of ``weight`` ``(out, in)`` and ``hessian``; an input that never fired (``H_jj = 0``)
    gets zero weights and ``H_jj = 1``, so ``H`` stays invertible."""
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H


@torch.no_grad()
def error_feedback(W: torch.Tensor, H: torch.Tensor, damp: float, block_size: int, act_order: bool,
                   quantize_column: Callable[[int, torch.Tensor, Callable], torch.Tensor],
                   U: torch.Tensor | None = None) -> None:
    """Quantize every column of ``W`` ``(rows, cols)`` (not changed) with error feedback through ``H``.

    Columns go left to right, or by decreasing ``diag(H)`` with ``act_order``. ``quantize_column(c, w, current)``
    records column ``c``'s codes, given its error-updated values ``w`` ``(rows, 1)``, and returns it dequantized
    ``(rows, 1)``. ``current(cols)`` (a long tensor) gives those columns with every update so far, including
    the ones the lazy batch still holds back (GPTQ fits a group's parameters on them). ``U``: the factor of
    :func:`inverse_hessian_factor` in visiting order, when the caller needs it too (SpQR's outlier criterion).
    """
    rows, cols = W.shape
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W = W[:, order]
    if U is None:
        U, _ = inverse_hessian_factor(H[order][:, order], damp)
    pos_of = torch.empty_like(order)
    pos_of[order] = torch.arange(cols, device=W.device)  # column -> position in visiting order
    order_l = order.tolist()   # Python ints: reading a device tensor per column would sync a GPU each time

    def current(c: torch.Tensor) -> torch.Tensor:
        pos = pos_of[c]
        cur = W[:, pos]
        later = pos >= i2   # their share of this block's updates is still pending
        if later.any() and i > 0:
            cur[:, later] -= Err[:, :i] @ U[i1:p][:, pos[later]]
        return cur

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        Err = torch.zeros(rows, i2 - i1, dtype=W.dtype, device=W.device)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            p = i1 + i
            w = W[:, p : p + 1]
            err = (w - quantize_column(order_l[p], w, current)) / U1[i, i]
            W[:, p + 1 : i2] -= err @ U1[i : i + 1, i + 1 :]
            Err[:, i : i + 1] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]
