"""E8P: a fixed 8-dimensional lattice codebook at 2 bits per weight (QuIP#'s E8P idea, Tseng et al., 2024).

The codebook (65,536 points of ``E8 + 1/4``, no k-means) is built from a 256-entry table of *absolute*
patterns ``a`` with entries in ``{1/2, 3/2, 5/2}``:

- the 227 vectors of ``(Z + 1/2)^8`` with positive entries and ``|a|^2 <= 10`` (all 1/2; up to four 3/2; one 5/2
  with at most one 3/2);
- 29 of the 56 vectors with five 3/2 and three 1/2 (``|a|^2 = 12``), picked greedily so that each coordinate holds
  a 1/2 about equally often (:func:`abs_table`).

A codeword is ``s * a + d``: signs ``s`` with an even coordinate sum (``s * a`` in ``D8 + 1/2``: 7 free sign bits,
the 8th follows from the parity) and a shift ``d = +-1/4`` on every coordinate. A 16-bit code holds
``abs index (bits 0-7) | signs of coordinates 0-6 (bits 8-14, 1 = negative) | shift (bit 15, 1 = -1/4)``.

Nearest search uses the structure instead of 65,536 distances: for each shift and each pattern the best signs are
the signs of the input, and when their parity is wrong the coordinate whose flip costs least is flipped. The
search minimises a *weighted* distance ``sum_i w_i (x_i - c_i)^2`` exactly (the weights are the squared scales of
the rows a vector spans), in ``2 * 256`` candidates per vector.

As a lowbit format (``--format e8p --sym``): a vector is 8 consecutive *output rows* of one input column (VPTQ's
layout), so GPTQ's column-by-column error feedback sees whole vectors and quantizes them with no other change;
every row needs ``out_features % 8 == 0``. Each (row, group) has one fp16 ``scale``; ``w = scale * codeword``.
The 16-bit code of a vector is spread over its 8 rows, 2 bits each (row ``8r + t`` holds bits ``2t, 2t+1``), so
the scalar codec stores ``bits`` bits per weight and bpw is the scalar formats' own count. Residual stages:

- ``bits=4``: a second E8P code on the residual at ``RES_SCALE`` times the scale (2 more bits per weight, bits 2-3);
- ``bits=3``: a sign per weight on the residual, ``+-SIGN_SCALE`` times the scale (bit 2, 1 = negative).

The scale of a group is ``KAPPA * rms(group)`` (QuIP# RMS-normalises the weights too): the codebook relies on
incoherent weights, so combine it with ``--rotate hadamard``. The constants are the mean-squared-error optimal
ones for Gaussian weights (:func:`fit_constants` recomputes them).
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from .base import Format, ParamSpec
from .registry import register_format

__all__ = ["E8PFormat", "abs_table", "codebook", "e8p_decode", "e8p_nearest", "fit_constants",
           "KAPPA", "RES_SCALE", "SIGN_SCALE"]

#: scale = KAPPA * rms(group); residual stage scales relative to it (bits=4, bits=3). From :func:`fit_constants`
#: on 2^16 standard normal vectors (seed 0), MSE per weight 0.0913 at 2 bits (scalar Lloyd-Max: 0.1175)
KAPPA = 0.97
RES_SCALE = 0.30
SIGN_SCALE = 0.25

#: vectors per chunk of the search (a chunk materialises ``(chunk, 256, 8)`` floats)
_CHUNK = 2048


@functools.lru_cache(maxsize=1)
def abs_table() -> torch.Tensor:
    """The 256 absolute patterns ``(256, 8)`` float32 (module doc), ordered by ``|a|^2`` then lexicographically."""
    half = [0.5, 1.5, 2.5]
    pats = []
    for p in itertools.product(half, repeat=8):
        n2 = sum(v * v for v in p)
        if n2 <= 10:
            pats.append(p)
    norm12 = sorted(p for p in itertools.product([0.5, 1.5], repeat=8) if p.count(1.5) == 5)
    counts = [0] * 8   # how often each coordinate holds a 1/2 among the chosen norm-12 patterns
    chosen = []
    for _ in range(256 - len(pats)):
        def load(p):
            c = [n + (v == 0.5) for n, v in zip(counts, p)]
            return max(c), sorted(c, reverse=True)
        best = min((p for p in norm12 if p not in chosen), key=load)
        chosen.append(best)
        counts = [n + (v == 0.5) for n, v in zip(counts, best)]
    allp = sorted(pats, key=lambda p: (sum(v * v for v in p), p)) + sorted(chosen)
    return torch.tensor(allp, dtype=torch.float32)


@functools.lru_cache(maxsize=8)
def _tables(device: torch.device):
    """``(A, A^2, parity of sum(A))`` on ``device``, made once per device."""
    a = abs_table().to(device)
    return a, a * a, (a.sum(1).round().long() & 1)


@functools.lru_cache(maxsize=8)
def _codebook(device: torch.device) -> torch.Tensor:
    return e8p_decode(torch.arange(1 << 16, device=device))


def codebook(device=None) -> torch.Tensor:
    """Every codeword, ``(65536, 8)`` float32, row ``c`` decoding code ``c``. Cached; callers must not modify it."""
    return _codebook(torch.device(device or "cpu"))


def e8p_decode(codes: torch.Tensor) -> torch.Tensor:
    """Codewords ``(..., 8)`` float32 of 16-bit ``codes`` ``(...)`` (the bit layout of the module doc)."""
    codes = codes.long()
    a, _, par = _tables(codes.device)
    k = codes & 255
    bit = torch.arange(7, device=codes.device)
    neg7 = ((codes.unsqueeze(-1) >> (8 + bit)) & 1)                    # (..., 7)
    neg8 = (neg7.sum(-1) + par[k]) & 1                                  # parity: n_neg = sum(a) (mod 2)
    neg = torch.cat([neg7, neg8.unsqueeze(-1)], -1).float()
    shift = 0.25 - 0.5 * ((codes >> 15) & 1).float()
    return a[k] * (1 - 2 * neg) + shift.unsqueeze(-1)


@torch.no_grad()
def e8p_nearest(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """The 16-bit code of the codeword nearest to each row of ``x`` ``(n, 8)`` in ``sum_i w_i (x_i - c_i)^2``.

    ``w`` ``(n, 8)``, non-negative (None: plain Euclidean). Exact (tested against a search over every codeword);
    ties go to the first candidate in (shift +1/4, shift -1/4) x table order.
    """
    x = x.float()
    n = x.shape[0]
    w = torch.ones_like(x) if w is None else w.float().expand_as(x)
    a, a2, par = _tables(x.device)
    out = torch.empty(n, dtype=torch.long, device=x.device)
    bit8 = torch.arange(8, device=x.device)
    shift = torch.tensor([0.25, -0.25], device=x.device).view(2, 1, 1)
    for s in range(0, n, _CHUNK):
        xs, ws = x[s : s + _CHUNK], w[s : s + _CHUNK]
        m = xs.shape[0]
        y = (xs.unsqueeze(0) - shift).reshape(2 * m, 8)                # both shifts at once: (2m, 8)
        ws2 = ws.repeat(2, 1)
        u = y.abs()
        neg = y < 0
        wu = ws2 * u
        # sum_i w (u - a)^2 = sum w u^2 - 2 (w u).a + w.a^2, every pattern at once: (2m, 256)
        cost = (wu * u).sum(1, keepdim=True) - 2 * wu @ a.T + ws2 @ a2.T
        fmin, fidx = (wu.unsqueeze(1) * a.unsqueeze(0)).min(-1)           # cheapest coordinate to flip, / 4
        wrong = (neg.sum(1, keepdim=True) & 1) != par.unsqueeze(0)        # sign parity needs a flip
        cost = torch.where(wrong, cost + 4 * fmin, cost)
        c, k = cost.min(1)                                               # (2m,)
        fi = fidx.gather(1, k[:, None])[:, 0]
        flip = wrong.gather(1, k[:, None])[:, 0]
        neg = neg ^ (flip.unsqueeze(1) & (bit8 == fi.unsqueeze(1)))
        code = k | (neg[:, :7].long() << (8 + bit8[:7])).sum(1)
        second = c[m:] < c[:m]                                           # ties keep the +1/4 shift
        out[s : s + m] = torch.where(second, code[m:] | (1 << 15), code[:m])
    return out


def _vectors(t: torch.Tensor) -> torch.Tensor:
    """``(rows, ...)`` -> ``(n, 8)``: each vector is 8 consecutive rows at one position of the other dims."""
    r = t.shape[0]
    return t.reshape(r // 8, 8, -1).transpose(1, 2).reshape(-1, 8)


def _unvectors(v: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`_vectors`: ``(n, 8)`` -> ``shape``."""
    r = shape[0]
    return v.reshape(r // 8, -1, 8).transpose(1, 2).reshape(shape)


def _spread(code: torch.Tensor, shape, bits: int = 2) -> torch.Tensor:
    """A per-vector value ``(n,)`` of ``8 * bits`` bits -> ``bits`` bits per row: ``(rows, ...)`` (row 8r+t holds
    bits ``t*bits .. t*bits + bits - 1``)."""
    t = torch.arange(8, device=code.device) * bits
    return _unvectors((code.unsqueeze(1) >> t) & ((1 << bits) - 1), shape)


def _gather(chunks: torch.Tensor, bits: int = 2) -> torch.Tensor:
    """Inverse of :func:`_spread`: ``(rows, ...)`` chunks -> ``(n,)`` per-vector values."""
    t = torch.arange(8, device=chunks.device) * bits
    return (_vectors(chunks) << t).sum(1)


@dataclass(frozen=True)
class E8PFormat(Format):
    """E8P lattice vectors of 8 output rows with an fp16 scale per (row, group); see the module doc.

    ``bits``: 2 (E8P), 3 (E8P + a sign residual), 4 (E8P + an E8P residual). ``sym`` must be True: the codebook
    is symmetric about zero with one scale, there is no asymmetric form.
    """

    bits: int = 2
    group_size: int = -1
    sym: bool = True

    name: ClassVar[str] = "e8p"

    def __post_init__(self):
        if self.bits not in (2, 3, 4):
            raise ConfigError(f"e8p supports --bits 2 (E8P), 3 (E8P + a sign residual) or 4 (E8P + an E8P "
                              f"residual), got {self.bits!r}")
        if not self.sym:
            raise ConfigError("e8p is symmetric with one scale per group: add --sym")

    def param_specs(self):
        return {"scale": ParamSpec("fp16")}

    def fit(self, w, mask=None):
        """``scale = KAPPA * rms`` of each group's real entries, rounded to fp16 (never 0)."""
        w = w.float()
        if mask is None:
            ms = w.pow(2).mean(-1, keepdim=True)
        else:
            m = mask.to(w.dtype)
            ms = (w.pow(2) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1)
        s = (KAPPA * ms.sqrt()).to(torch.float16).float()
        return {"scale": s.clamp_min(2.0 ** -24)}

    def _check_rows(self, t: torch.Tensor) -> None:
        if t.shape[0] % 8:
            raise ConfigError(f"e8p quantizes vectors of 8 output rows: out_features must be a multiple of 8, "
                              f"got {t.shape[0]} rows")

    def quantize(self, w, params):
        """Codes ``(rows, ...)`` in ``[0, 2**bits)``: each vector of 8 rows nearest to ``w / scale`` in the
        scale-weighted distance (the error in ``w``'s own units), its 16-bit code spread over the rows."""
        self._check_rows(w)
        w = w.float()
        s = params["scale"].float().expand_as(w)
        x, wt = _vectors(w / s), _vectors(s * s)
        c1 = e8p_nearest(x, wt)
        codes = _spread(c1, w.shape)
        r = x - codebook(x.device)[c1]
        if self.bits == 4:
            c2 = e8p_nearest(r / RES_SCALE, wt)
            codes = codes | (_spread(c2, w.shape) << 2)
        elif self.bits == 3:
            codes = codes | (_unvectors((r < 0).long(), w.shape) << 2)
        return codes

    def dequantize(self, codes, params):
        self._check_rows(codes)
        codes = codes.long()
        q = codebook(codes.device)[_gather(codes & 3)]                  # (n, 8)
        if self.bits == 4:
            q = q + RES_SCALE * codebook(codes.device)[_gather((codes >> 2) & 3)]
        elif self.bits == 3:
            q = q + SIGN_SCALE * (1 - 2 * _vectors((codes >> 2) & 1).float())
        return _unvectors(q, codes.shape) * params["scale"].float()


@torch.no_grad()
def fit_constants(n: int = 1 << 16, seed: int = 0) -> dict[str, float]:
    """The MSE-optimal ``KAPPA``, ``RES_SCALE`` and ``SIGN_SCALE`` for standard normal weights (a grid search,
    then ``SIGN_SCALE = mean |residual|``), each rounded to 2 decimals as the module stores them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)

    def err(k):
        return float((x - k * codebook()[e8p_nearest(x / k)]).pow(2).mean())

    kappa = min((round(0.70 + 0.01 * i, 2) for i in range(41)), key=err)
    r = x / kappa - codebook()[e8p_nearest(x / kappa)]

    def rerr(k):
        return float((r - k * codebook()[e8p_nearest(r / k)]).pow(2).mean())

    res = min((round(0.15 + 0.01 * i, 2) for i in range(31)), key=rerr)
    return {"KAPPA": kappa, "RES_SCALE": res, "SIGN_SCALE": round(float(r.abs().mean()), 2),
            "mse": err(kappa), "mse_res": rerr(res) * kappa ** 2}


register_format("e8p", E8PFormat)
