"""Hadamard matrices of size ``m * 2^k`` and the seeded random orthogonal rotation built from them.

A Hadamard matrix ``H`` (n x n) has entries +-1 and ``H H^T = n I``. Sizes here are ``m * 2^k`` for ``m`` in
:data:`BASE_SIZES`: a base matrix of order ``m`` (Paley's constructions, below) Kronecker a Sylvester matrix
of order ``2^k``. That covers the widths of the zoo models: SmolLM2's hidden 576 = 36 * 16 and
intermediate 1536 = 12 * 128, Gemma-3-270M's hidden 640 = 40 * 16, and every power of two.

Paley I (prime ``q = 3 mod 4``, order ``q + 1``): with the Jacobsthal matrix ``J[i, j] = chi(j - i)``
(``chi`` the quadratic character mod q, ``chi(0) = 0``), which is skew for such q,
``H = I + [[0, 1^T], [-1, J]]``. Paley II (prime ``q = 1 mod 4``, order ``2 (q + 1)``): the symmetric
conference matrix ``C = [[0, 1^T], [1, J]]`` with each 0 replaced by ``[[1, -1], [-1, -1]]`` and each
``+-1`` by ``+-[[1, 1], [1, -1]]``.
"""
from __future__ import annotations

import functools

import torch

from ..errors import ConfigError

__all__ = ["BASE_SIZES", "hadamard_matrix", "hadamard_size", "random_hadamard"]

#: base orders and how each is built: ("sylvester",), ("paley1", q), ("paley2", q), ("double", m)
_BASES: dict[int, tuple] = {
    1: ("sylvester",),
    12: ("paley1", 11),
    20: ("paley1", 19),
    28: ("paley2", 13),
    36: ("paley2", 17),
    40: ("double", 20),
}
BASE_SIZES: tuple[int, ...] = tuple(_BASES)


def _jacobsthal(q: int) -> torch.Tensor:
    """``(q, q)`` int: ``J[i, j] = chi(j - i)``, the quadratic character of ``j - i`` mod prime ``q``."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)])
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _bordered(j: torch.Tensor, first_col_sign: int) -> torch.Tensor:
    """``[[0, 1^T], [s 1, J]]``: ``j`` bordered by a row of ones and a column of ``s`` = ``first_col_sign``."""
    q = j.shape[0]
    c = torch.zeros(q + 1, q + 1, dtype=torch.long)
    c[0, 1:] = 1
    c[1:, 0] = first_col_sign
    c[1:, 1:] = j
    return c


def _sylvester(k: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.long)
    for _ in range(k):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _base(m: int) -> torch.Tensor:
    kind = _BASES[m]
    if kind[0] == "sylvester":
        return _sylvester(0)
    if kind[0] == "double":
        h = _base(kind[1])
        return torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    q = kind[1]
    if kind[0] == "paley1":
        return torch.eye(q + 1, dtype=torch.long) + _bordered(_jacobsthal(q), -1)
    c = _bordered(_jacobsthal(q), 1)                                # (q+1, q+1), symmetric, zero diagonal
    zero = torch.tensor([[1, -1], [-1, -1]])
    one = torch.tensor([[1, 1], [1, -1]])
    # each entry e of C becomes a 2x2 block: e * one where e = +-1, zero's block where e = 0
    return torch.kron(c, one) + torch.kron((c == 0).long(), zero)   # (2(q+1), 2(q+1))


def hadamard_size(n: int) -> tuple[int, int] | None:
    """``(m, 2^k)`` with ``m * 2^k = n`` and ``m`` in :data:`BASE_SIZES` (the largest such ``m``), or None."""
    for m in sorted(BASE_SIZES, reverse=True):
        if n > 0 and n % m == 0 and (p := n // m) & (p - 1) == 0:
            return m, p
    return None


@functools.lru_cache(maxsize=8)
def _hadamard(n: int) -> torch.Tensor:
    size = hadamard_size(n)
    if size is None:
        raise ConfigError(f"no Hadamard matrix of order {n}: lowbit builds orders m * 2^k with m in "
                          f"{', '.join(map(str, BASE_SIZES))}")
    m, p = size
    return torch.kron(_base(m), _sylvester(p.bit_length() - 1))


def hadamard_matrix(n: int) -> torch.Tensor:
    """``(n, n)`` int64 Hadamard matrix (+-1 entries, ``H H^T = n I``); ConfigError for an order not built here."""
    return _hadamard(n).clone()


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """``(n, n)`` float64 orthogonal ``Q = diag(s) H / sqrt(n)``: random signs ``s`` (seeded) times a Hadamard
    matrix. ``x Q`` flips the signs of ``x``'s coordinates, then mixes them all with equal weight."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return s[:, None] * _hadamard(n).double() / n ** 0.5
