"""Codebooks for vector quantization (VQ): weighted k-means, nearest lookup, the VQ weight.

Pure functions on tensors, shared by the VPTQ solver, the ``vq`` storage
codec and tests, so the numerics of quantization and of the stored model
cannot drift apart.

Vector layout (the canonical one, as VPTQ): a vector is ``v`` consecutive
*output* rows of one input column, so a column of ``out`` weights holds
``out // v`` vectors and column-by-column error feedback (GPTQ-style) sees
whole vectors. Codes of one codebook are stored as an ``(out // v, n_cols)``
matrix: ``idx[r, j]`` is the vector of rows ``r*v .. r*v+v-1`` of the j-th
column that codebook serves.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

__all__ = ["weighted_kmeans", "nearest", "code_bits", "expand_codes", "VQWeight"]

#: distance chunk: rows * centroids kept below this many floats (16 MiB of fp32: cache-friendly on CPU)
_CHUNK_ELEMS = 1 << 22


def code_bits(k: int) -> int:
    """Bits of one index into a codebook of ``k`` entries (at least 1)."""
    return max(1, math.ceil(math.log2(k)))


def _vq_kernel(x: torch.Tensor, codebook: torch.Tensor) -> bool:
    """Whether the fused CPU search applies (float32 CPU tensors, kernels built and enabled)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or codebook.dtype != torch.float32 or not len(codebook):
        return False
    from ..kernels import kernels_active

    return kernels_active("vq_nearest")


@torch.no_grad()
def nearest(x: torch.Tensor, codebook: torch.Tensor, c_sq: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest (L2) codebook row for each row of ``x``, and the squared distance.

    ``x``: ``(n, v)``; ``codebook``: ``(k, v)``. Distances are computed as
    ``|c|^2 - 2 x.c`` by matmul, in chunks of rows so ``k`` up to 65,536
    never materialises an ``n x k`` matrix. Ties go to the lower index.
    """
    n, k = x.shape[0], codebook.shape[0]
    if c_sq is None:
        c_sq = codebook.pow(2).sum(1)
    if _vq_kernel(x, codebook):  # same quantities, without materialising distances (kernels/csrc/vq_ops.cpp)
        return torch.ops.lowbit.vq_nearest(x, codebook.T.contiguous(), c_sq.float())
    step = max(1, min(n, _CHUNK_ELEMS // max(k, 1)))
    idx = torch.empty(n, dtype=torch.long, device=x.device)
    dist = torch.empty(n, dtype=x.dtype, device=x.device)
    ct = codebook.T.contiguous()
    for s in range(0, n, step):
        xs = x[s : s + step]
        d = torch.addmm(c_sq.unsqueeze(0), xs, ct, alpha=-2.0)  # (chunk, k)
        m, a = d.min(dim=1)
        idx[s : s + step] = a
        dist[s : s + step] = (m + xs.pow(2).sum(1)).clamp_min(0)
    return idx, dist


def _kmeans_pp(x: torch.Tensor, w: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """Weighted k-means++ seeding (D^2 sampling, probability ~ w * D^2) on a subsample of <= 16k rows.

    The subsample keeps seeding cheap (k rounds over 16k rows) for any ``n``.
    """
    n = x.shape[0]
    sub = torch.randperm(n, generator=g)[: 16 * k].to(x.device)
    xs, ws = x[sub].contiguous(), w[sub]
    c = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    c[0] = xs[_sample(ws.cpu() + 1e-30, g)]
    d2 = (xs - c[0]).pow(2).sum(1)
    fused = _vq_kernel(xs, c)
    for j in range(1, k):
        p = (ws * d2).cpu()
        if float(p.sum()) <= 0:  # every row already has a centroid: the rest are filled by re-seeding
            c[j:] = xs[torch.randint(0, xs.shape[0], (k - j,), generator=g).to(x.device)]
            break
        c[j] = xs[_sample(p, g)]
        if fused:
            torch.ops.lowbit.vq_min_dist_(d2, xs, c[j])
        else:
            d2 = torch.minimum(d2, (xs - c[j]).pow(2).sum(1))
    return c


def _sample(p: torch.Tensor, g: torch.Generator) -> int:
    """One index drawn with probability ``p / p.sum()`` (CPU ``p``; zero entries are never drawn).

    Inverse-CDF sampling: one uniform draw and a binary search, ~20x faster than
    ``torch.multinomial`` on 65k entries (k-means++ draws k times in sequence).
    """
    cs = torch.cumsum(p.double(), 0)
    u = torch.rand(1, generator=g, dtype=torch.float64) * cs[-1]
    i = int(torch.searchsorted(cs, u, right=True))
    i = min(i, p.numel() - 1)
    while p[i] <= 0:  # u rounded onto the total: step back to the last drawable entry
        i -= 1
    return i


@torch.no_grad()
def weighted_kmeans(x: torch.Tensor, weights: torch.Tensor, k: int, iters: int = 20, tol: float = 1e-5,
                    seed: int = 0, pin_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means minimising ``sum_i w_i |x_i - c_{a_i}|^2``; returns ``(centroids (k, v), assign (n,))``.

    Initialisation: weighted k-means++ on a subsample (seeded). Empty clusters are
    re-seeded at the rows with the largest weighted error, so with ``k`` at
    least the number of distinct rows k-means ends exact. Stops after
    ``iters`` updates or when the weighted inertia improves by less than
    ``tol`` (relative). ``pin_zero`` keeps centroid 0 at the origin (a
    residual codebook then never makes a vector worse). Rows with zero
    total weight fall back to uniform weights.
    """
    x = x.float()
    n, v = x.shape
    w = weights.float().clamp_min(0)
    if float(w.sum()) <= 0:
        w = torch.ones_like(w)
    g = torch.Generator(device="cpu").manual_seed(seed)
    if n <= k:
        # every row gets its own centroid; spare centroids repeat the first row (never chosen: ties go low)
        c = torch.cat([x, x[:1].expand(k - n, v)]) if n else x.new_zeros(k, v)
        if pin_zero:
            c = torch.cat([x.new_zeros(1, v), c[: k - 1]])
        return c.clone(), nearest(x, c)[0]
    c = _kmeans_pp(x, w, k, g)
    if pin_zero:
        c[0] = 0
    prev = None
    for _ in range(iters):
        a, d = nearest(x, c)
        err = w * d
        inertia = float(err.sum())
        if prev is not None and prev - inertia <= tol * max(prev, 1e-30):
            break
        prev = inertia
        sums = torch.zeros_like(c).index_add_(0, a, x * w.unsqueeze(1))
        wsum = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, a, w)
        full = wsum > 0
        c[full] = sums[full] / wsum[full].unsqueeze(1)
        empty = (~full).nonzero().flatten()
        if pin_zero:
            empty = empty[empty != 0]
        if empty.numel():
            far = err.topk(min(empty.numel(), n)).indices
            c[empty[: far.numel()]] = x[far]
        if pin_zero:
            c[0] = 0
    return c, nearest(x, c)[0]


def expand_codes(codebook: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Weights ``(out, n_cols)`` from codes ``(out // v, n_cols)`` into a ``(k, v)`` codebook."""
    r, n = idx.shape
    vec = codebook[idx]                       # (out // v, n_cols, v)
    return vec.permute(0, 2, 1).reshape(r * codebook.shape[1], n)


@dataclass
class VQWeight:
    """A vector-quantized ``(out, in)`` weight (see the module doc for the layout).

    Input columns are split into *main* columns (all but the outliers, in
    ascending order) and *outlier* columns (``outlier_cols``, ascending).

    - ``codebook (k, v)``, ``idx (out//v, n_main)``: main columns;
    - ``res_codebook (k_res, v)``, ``res_idx``: residual VQ, added to the main lookup (optional);
    - ``out_codebook (k0, v0)``, ``out_idx (out//v0, n_outlier)``: outlier columns (optional);
    - ``col_scale``, ``col_bias`` ``(in,)``: per-input-column norm, ``w = lookup * scale + bias`` (optional).
    """

    out_features: int
    in_features: int
    codebook: torch.Tensor
    idx: torch.Tensor
    res_codebook: torch.Tensor | None = None
    res_idx: torch.Tensor | None = None
    outlier_cols: torch.Tensor | None = None
    out_codebook: torch.Tensor | None = None
    out_idx: torch.Tensor | None = None
    col_scale: torch.Tensor | None = None
    col_bias: torch.Tensor | None = None

    @property
    def v(self) -> int:
        return self.codebook.shape[1]

    @property
    def n_outlier(self) -> int:
        return 0 if self.outlier_cols is None else int(self.outlier_cols.numel())

    def main_cols(self) -> torch.Tensor:
        keep = torch.ones(self.in_features, dtype=torch.bool, device=self.idx.device)
        if self.n_outlier:
            keep[self.outlier_cols] = False
        return keep.nonzero().flatten()

    def dequantize(self) -> torch.Tensor:
        """The float32 ``(out, in)`` weight (differentiable in the codebooks and norms)."""
        wm = expand_codes(self.codebook.float(), self.idx)
        if self.res_codebook is not None:
            wm = wm + expand_codes(self.res_codebook.float(), self.res_idx)
        if self.n_outlier:
            w = wm.new_zeros(self.out_features, self.in_features)
            w[:, self.main_cols()] = wm
            w[:, self.outlier_cols] = expand_codes(self.out_codebook.float(), self.out_idx)
        else:
            w = wm
        if self.col_scale is not None:
            w = w * self.col_scale.float() + self.col_bias.float()
        return w

    def layer_spec(self) -> dict:
        """JSON-ready layer spec for the ``vq`` codec (:mod:`lowbit.nn.vq_codec`)."""
        return {
            "codec": "vq",
            "out_features": self.out_features,
            "in_features": self.in_features,
            "v": self.v,
            "k": self.codebook.shape[0],
            "k_res": 0 if self.res_codebook is None else self.res_codebook.shape[0],
            "n_outlier": self.n_outlier,
            "v0": 0 if not self.n_outlier else self.out_codebook.shape[1],
            "k0": 0 if not self.n_outlier else self.out_codebook.shape[0],
            "norm": self.col_scale is not None,
        }
