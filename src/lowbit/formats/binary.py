"""1-bit weights: BiLLM's residual and split binarization (Huang et al., 2024) and OneBit's sign-value layout
(Xu et al., 2024).

Pure functions on tensors, shared by the solvers (:mod:`lowbit.methods.billm`, :mod:`lowbit.methods.onebit`),
the storage codecs (:mod:`lowbit.nn.binary_codec`) and tests, so what a solver chose and what a checkpoint
decodes are the same expressions, bit for bit.

A sign bit is 1 for ``w >= 0`` (decoded as +1) and 0 for ``w < 0`` (decoded as -1): zero binarizes to +1.

**BiLLM** (an ``(out, in)`` weight in blocks of ``block`` input columns, a short last block allowed):

- every weight has a sign bit ``s``;
- *salient* columns (a per-layer column bitmap, chosen per block) are binarized twice, residually:
  ``w = a1 * s + a2 * s2`` with ``s2`` the sign of ``w - a1 * s``; ``res_signs`` holds ``s2`` for the salient
  columns only, ``(out, n_salient)`` in ascending column order;
- the other weights are split by a break point on ``|w|`` into a *dense* group (``|w| <= p``, the bell's
  centre) and a *sparse* group (its tails), each with its own scale: ``w = a_dense * s`` or ``a_sparse * s``;
  ``split`` holds that choice (1 = sparse) for the non-salient columns only, ``(out, in - n_salient)``;
- ``scale_sal1``, ``scale_sal2``, ``scale_dense``, ``scale_sparse``: fp16 values, one per (row, block).

**OneBit**: ``W = diag(g) . S . diag(h)`` with ``S = ±1`` the signs, ``g`` ``(out,)`` (``out_scale``) and ``h``
``(in,)`` (``in_scale``) fp16 value vectors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["sign_bits", "pm_one", "weighted_scale", "residual_binarize", "split_binarize", "salient_qdq",
           "BiLLMWeight", "OneBitWeight"]


def sign_bits(w: torch.Tensor) -> torch.Tensor:
    """Sign bits of ``w`` as int64: 1 for ``w >= 0``, 0 for ``w < 0``."""
    return (w >= 0).long()


def pm_one(bits: torch.Tensor) -> torch.Tensor:
    """Sign bits (0/1) as float32 -1/+1."""
    return bits.float() * 2 - 1


def weighted_scale(v: torch.Tensor, mask: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per row, the scale ``a`` minimising ``sum_j c_j (v_ij - a * sign(v_ij))^2`` over the ``mask``-ed entries:
    the ``c``-weighted mean of ``|v|`` ``(rows, 1)``, rounded to fp16 (the stored value); 0 for an empty row.

    ``v`` ``(rows, k)``, ``mask`` bool broadcastable to it, ``c`` ``(k,)`` positive column weights."""
    wm = (c * mask).expand_as(v)
    return ((v.abs() * wm).sum(1, keepdim=True) / wm.sum(1, keepdim=True).clamp_min(1e-30)).half().float()


def salient_qdq(w: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual binarization of ``w`` with the given scales: ``(s, s2, a1 * s + a2 * s2)``, ``s``/``s2`` sign bits."""
    s = sign_bits(w)
    s2 = sign_bits(w - a1 * pm_one(s))
    return s, s2, a1 * pm_one(s) + a2 * pm_one(s2)


def residual_binarize(w: torch.Tensor, mask: torch.Tensor, c: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second-order binarization of the ``mask``-ed entries of ``w`` ``(rows, k)``: ``(a1, a2, w_hat)``.

    ``a1`` is fitted to ``w``, ``a2`` to the residual ``w - a1 * sign(w)`` (each the weighted-optimal scale for
    its signs, so the residual step never increases the ``c``-weighted error); ``w_hat`` is valid where ``mask``."""
    a1 = weighted_scale(w, mask, c)
    a2 = weighted_scale(w - a1 * pm_one(sign_bits(w)), mask, c)
    return a1, a2, salient_qdq(w, a1, a2)[2]


def split_binarize(w: torch.Tensor, mask: torch.Tensor, p: torch.Tensor, c: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``mask``-ed entries of ``w`` ``(rows, k)`` split at ``|w| > p`` (sparse) and binarized with one scale
    per group: ``(a_dense, a_sparse, w_hat)``, ``w_hat`` valid where ``mask``."""
    sparse = w.abs() > p
    a_d = weighted_scale(w, mask & ~sparse, c)
    a_s = weighted_scale(w, mask & sparse, c)
    return a_d, a_s, torch.where(sparse, a_s, a_d) * pm_one(sign_bits(w))


def _per_column(v: torch.Tensor, block: int, in_features: int) -> torch.Tensor:
    """Per-block values ``(out, n_blocks)`` repeated over each block's columns: ``(out, in)``."""
    return v.float().repeat_interleave(block, 1)[:, :in_features]


@dataclass
class BiLLMWeight:
    """A BiLLM-binarized ``(out, in)`` weight (see the module doc). Bits are int64 0/1; scales are float tensors
    holding fp16 values."""

    out_features: int
    in_features: int
    block: int
    signs: torch.Tensor          # (out, in)
    res_signs: torch.Tensor      # (out, n_salient): second signs of the salient columns, ascending columns
    salient_cols: torch.Tensor   # (in,): 1 = salient column
    split: torch.Tensor          # (out, in - n_salient): 1 = sparse group, non-salient columns ascending
    scale_sal1: torch.Tensor     # (out, n_blocks)
    scale_sal2: torch.Tensor
    scale_dense: torch.Tensor
    scale_sparse: torch.Tensor

    @property
    def n_salient(self) -> int:
        return int(self.salient_cols.sum())

    def dequantize(self) -> torch.Tensor:
        """Float32 ``(out, in)``, the same expressions the solver used for each column."""
        sal = self.salient_cols.bool()
        cols = lambda v: _per_column(v, self.block, self.in_features)  # noqa: E731
        s = pm_one(self.signs)
        w = torch.empty(self.out_features, self.in_features, device=s.device)
        w[:, sal] = cols(self.scale_sal1)[:, sal] * s[:, sal] + cols(self.scale_sal2)[:, sal] * pm_one(self.res_signs)
        split = self.split.bool()
        w[:, ~sal] = torch.where(split, cols(self.scale_sparse)[:, ~sal], cols(self.scale_dense)[:, ~sal]) * s[:, ~sal]
        return w

    def layer_spec(self) -> dict:
        """JSON-ready layer spec for the ``billm`` codec (:mod:`lowbit.nn.binary_codec`)."""
        return {"codec": "billm", "out_features": self.out_features, "in_features": self.in_features,
                "block": self.block, "n_salient": self.n_salient}


@dataclass
class OneBitWeight:
    """``W = diag(out_scale) . S . diag(in_scale)`` (OneBit's sign-value-independent decomposition)."""

    out_features: int
    in_features: int
    signs: torch.Tensor       # (out, in) sign bits
    out_scale: torch.Tensor   # (out,) g, fp16 values
    in_scale: torch.Tensor    # (in,) h, fp16 values

    def dequantize(self) -> torch.Tensor:
        """Float32 ``(out, in)``."""
        return self.out_scale.float()[:, None] * pm_one(self.signs) * self.in_scale.float()[None, :]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x W^T + b`` in the factored form: ``((x * h) S^T) * g`` (the 1-bit layer's own order of operations;
        equal to ``F.linear(x, dequantize())`` up to float rounding)."""
        y = (x * self.in_scale.to(x.dtype)) @ pm_one(self.signs).to(x.dtype).T * self.out_scale.to(x.dtype)
        return y if bias is None else y + bias.to(x.dtype)

    def layer_spec(self) -> dict:
        """JSON-ready layer spec for the ``onebit`` codec (:mod:`lowbit.nn.binary_codec`)."""
        return {"codec": "onebit", "out_features": self.out_features, "in_features": self.in_features}
