"""K-quants: llama.cpp's super-block formats (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) as lowbit number formats.

A row is cut into super-blocks of 256 columns and each super-block into sub-blocks of 16 or 32 columns (the
format's groups). A super-block has an fp16 scale ``d`` (and, for the asymmetric types, an fp16 ``dmin``); a
sub-block has an integer sub-scale ``sc`` (and sub-min ``m``) of 4, 6 or 8 bits; a weight has an integer code
``q``. The grid is ggml's:

====  =====  =========  =================  ======================================  ========
tag   ggml   sub-block  sub-scale (+ min)  weight                                  bits/w
====  =====  =========  =================  ======================================  ========
q2_k  Q2_K   16         4 + 4 bits         ``(d*sc)*q - dmin*m``, q in 0..3         2.625
q3_k  Q3_K   16         6 bits             ``(d*(sc-32))*(q-4)``, q in 0..7         3.4375
q4_k  Q4_K   32         6 + 6 bits         ``(d*sc)*q - dmin*m``, q in 0..15        4.5
q5_k  Q5_K   32         6 + 6 bits         ``(d*sc)*q - dmin*m``, q in 0..31        5.5
q6_k  Q6_K   16         8 bits             ``(d*(sc-128))*(q-32)``, q in 0..63      6.5625
====  =====  =========  =================  ======================================  ========

Codes and sub-scales are kept unsigned, with the offsets of the table (ggml stores Q3_K's sub-scales with the
same offset, Q6_K's as int8 ``sc - 128``, and the codes of both as signed ``q - 4`` / ``q - 32``).
:meth:`KQuantFormat.dequantize` computes in float32 in the order above, which is the order of ggml's and
gguf-py's dequantizers, so a GGUF file holding these codes and scales decodes to lowbit's weights bit for bit.

Fitting (:meth:`KQuantFormat.fit`, data-free round-to-nearest): per sub-block a scale and min from its range
(asymmetric: ``[min(w, 0), max(w, 0)]``; symmetric: the largest-magnitude weight lands on the lowest level),
then the sub-scales and mins are rounded onto their super-block's grid (``d`` = largest sub-scale / top level,
rounded to fp16), then the codes are rounded given the stored scales. :func:`search_kquant` is the solver that
searches inside this structure (its docstring says how).

A K-quant needs rows that are whole super-blocks. A layer whose width is not a multiple of 256 is quantized
with the type's stated fallback, an int format with groups of 32 that maps to a legacy ggml block type exactly
(:meth:`KQuantFormat.for_width`, recorded in the layer's spec): q2_k and q3_k fall back to int4 sym (Q4_0),
q4_k to int4 asym (Q4_1), q5_k to int5 asym (Q5_1), q6_k to int8 sym (Q8_0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from .base import Format, ParamSpec
from .integer import IntFormat
from .quantize import QuantizedWeight
from .registry import register_format, register_preset
from .scale_search import importance_weights, ls_scale_min, range_candidates

__all__ = ["KQuantFormat", "KType", "KTYPES", "SUPER_BLOCK", "FALLBACK_GROUP", "ktag", "search_kquant"]

#: columns per super-block (ggml's QK_K)
SUPER_BLOCK = 256
#: group size of every fallback int format (a legacy ggml block)
FALLBACK_GROUP = 32


@dataclass(frozen=True)
class KType:
    """One K-quant type: ggml name, code bits, sub-block columns, symmetry, sub-scale bits, fallback int format."""

    ggml: str
    bits: int
    sub: int
    sym: bool
    scale_bits: int
    fallback: tuple[int, bool]   # (bits, sym) of the int g32 format used where a row is not whole super-blocks


#: K-quant types by code bits
KTYPES: dict[int, KType] = {k.bits: k for k in (
    KType("Q2_K", 2, 16, False, 4, (4, True)),
    KType("Q3_K", 3, 16, True, 6, (4, True)),
    KType("Q4_K", 4, 32, False, 6, (4, False)),
    KType("Q5_K", 5, 32, False, 6, (5, False)),
    KType("Q6_K", 6, 16, True, 8, (8, True)),
)}


def ktag(bits: int) -> str:
    """The tag of the K-quant type with ``bits``-bit codes (``q4_k``)."""
    return f"q{bits}_k"


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def _div_round(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``round(x / d)``, 0 where ``d`` is 0."""
    return torch.where(d == 0, torch.zeros_like(x), torch.round(x / torch.where(d == 0, torch.ones_like(d), d)))


@dataclass(frozen=True)
class KQuantFormat(Format):
    """A ggml K-quant type, chosen by ``bits`` (module doc); ``group_size`` and ``sym`` must be the type's.

    Parameters per sub-block (the format's group): ``sub_scale`` (and ``sub_min``), unsigned codes of the type's
    sub-scale bits; ``super_scale`` (and ``super_min``), fp16, stored once per super-block (``ParamSpec.span``)
    and repeated over its sub-blocks in the per-group views.
    """

    bits: int = 4
    group_size: int = 32
    sym: bool = False
    name: ClassVar[str] = "kquant"

    def __post_init__(self):
        kt = KTYPES.get(self.bits) if isinstance(self.bits, int) and not isinstance(self.bits, bool) else None
        if kt is None:
            raise ConfigError(f"K-quant types are {', '.join(ktag(b) for b in KTYPES)} (bits 2-6), got bits={self.bits!r}")
        if self.group_size != kt.sub or self.sym != kt.sym:
            raise ConfigError(
                f"{ktag(self.bits)} has sub-blocks of {kt.sub} columns and is "
                f"{'symmetric' if kt.sym else 'asymmetric (sub-scales and mins)'}, so its settings are "
                f"group_size={kt.sub}, sym={kt.sym}, not group_size={self.group_size}, sym={self.sym} (the tag "
                f"{ktag(self.bits)} sets them)")

    # --------------------------------------------------------------------------------------------- structure

    @property
    def ktype(self) -> KType:
        return KTYPES[self.bits]

    @property
    def tag(self) -> str:
        return ktag(self.bits)

    @property
    def fit_span(self) -> int:
        return SUPER_BLOCK // self.group_size

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def q_offset(self) -> int:
        """Code offset: the stored code of weight level 0 (symmetric types)."""
        return 1 << (self.bits - 1) if self.sym else 0

    @property
    def sc_offset(self) -> int:
        """Sub-scale offset (symmetric types store a signed sub-scale ``sc - sc_offset``)."""
        return 1 << (self.ktype.scale_bits - 1) if self.sym else 0

    @property
    def sc_max(self) -> int:
        return (1 << self.ktype.scale_bits) - 1

    @property
    def fallback(self) -> IntFormat:
        bits, sym = self.ktype.fallback
        return IntFormat(bits=bits, group_size=FALLBACK_GROUP, sym=sym)

    def for_width(self, in_features: int) -> Format:
        return self if in_features % SUPER_BLOCK == 0 else self.fallback

    def layer_formats(self) -> tuple[Format, ...]:
        return (self, self.fallback)

    def param_specs(self) -> dict[str, ParamSpec]:
        sc = ParamSpec("code", self.ktype.scale_bits)
        d = ParamSpec("fp16", span=self.fit_span)
        if self.sym:
            return {"super_scale": d, "sub_scale": sc}
        return {"super_scale": d, "super_min": d, "sub_scale": sc, "sub_min": sc}

    # ------------------------------------------------------------------------------------------ grid values

    def _scale_min(self, params) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Effective per-sub-block scale ``d*sc`` and min ``dmin*m``, in ggml's float32 order."""
        s = params["super_scale"].float() * (params["sub_scale"].float() - self.sc_offset)
        m = None if self.sym else params["super_min"].float() * params["sub_min"].float()
        return s, m

    def quantize(self, w, params):
        s, m = self._scale_min(params)
        safe = torch.where(s == 0, torch.ones_like(s), s)
        if self.sym:
            q = torch.round(w / safe).clamp(-self.q_offset, self.q_offset - 1) + self.q_offset
        else:
            q = torch.round((w + m) / safe).clamp(0, self.maxq)
        return torch.where(s == 0, torch.full_like(q, float(self.q_offset)), q).long()

    def dequantize(self, codes, params):
        s, m = self._scale_min(params)
        if self.sym:
            return s * (codes.float() - self.q_offset)
        return s * codes.float() - m

    # ------------------------------------------------------------------------------------------------- fit

    def blocks(self, w: torch.Tensor) -> torch.Tensor:
        """Grouped weights ``(rows, G, gs)`` as super-blocks ``(rows, S, n, gs)``; ConfigError unless ``G``
        covers whole super-blocks."""
        rows, n_groups, gs = w.shape
        n = self.fit_span
        if gs != self.group_size or n_groups % n:
            raise ConfigError(
                f"{self.tag} is fitted a super-block ({SUPER_BLOCK} columns, {n} sub-blocks of {self.group_size}) at "
                f"a time; got {n_groups} groups of {gs} columns. Rows that are not whole super-blocks take the "
                f"fallback format (for_width), and a solver fitting group by group must fit fit_span groups at once")
        return w.reshape(rows, n_groups // n, n, gs)

    def fit(self, w, mask=None):
        """Round-to-nearest K-quant parameters for grouped ``w`` ``(rows, G, gs)``, ``G`` whole super-blocks."""
        x = self.blocks(w.float())                                    # (rows, S, n, gs)
        if self.sym:
            top = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)    # signed extreme per sub-block
            return self.grid_params(-top / self.q_offset)             # the extreme lands on the lowest level
        lo = x.amin(-1).clamp_max(0)
        hi = x.amax(-1).clamp_min(0)
        return self.grid_params((hi - lo) / self.maxq, -lo)

    def super_params(self, scale: torch.Tensor, mn: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Sub-block scales (and mins >= 0) ``(rows, S, n)`` rounded onto their super-block's grid: block
        parameters ``super_scale (rows, S, 1)``, ``sub_scale (rows, S, n)`` (and ``super_min``, ``sub_min``)."""
        if self.sym:
            top = scale.gather(-1, scale.abs().argmax(-1, keepdim=True))          # (rows, S, 1), signed
            d = _fp16(-top / self.sc_offset)                                      # largest one -> sub-scale -2^(b-1)
            sc = _div_round(scale, d).clamp(-self.sc_offset, self.sc_offset - 1) + self.sc_offset
            return {"super_scale": d, "sub_scale": sc}
        d = _fp16(scale.amax(-1, keepdim=True) / self.sc_max)
        dmin = _fp16(mn.amax(-1, keepdim=True) / self.sc_max)
        return {"super_scale": d, "super_min": dmin, "sub_scale": _div_round(scale, d).clamp(0, self.sc_max),
                "sub_min": _div_round(mn, dmin).clamp(0, self.sc_max)}

    def grid_params(self, scale: torch.Tensor, mn: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """:meth:`super_params` as per-group parameters ``(rows, G, 1)``."""
        return self.group_params(self.super_params(scale, mn))

    def group_params(self, bp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Block parameters (``(rows, S, 1)`` super, ``(rows, S, n)`` sub) -> per-group ``(rows, G, 1)``."""
        rows, n_super = bp["sub_scale"].shape[:2]
        n = self.fit_span
        return {k: v.expand(rows, n_super, n).reshape(rows, n_super * n, 1) for k, v in bp.items()}


register_format("kquant", KQuantFormat)
for _kt in KTYPES.values():
    register_preset(ktag(_kt.bits), KQuantFormat(_kt.bits, _kt.sub, _kt.sym).spec())


# ------------------------------------------------------------------------------------------------ the search


def _block_view(bp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Block parameters broadcast over a sub-block's columns: ``(rows, S, n, 1)`` / ``(rows, S, 1, 1)``."""
    return {k: v.unsqueeze(-1) for k, v in bp.items()}


@torch.no_grad()
def search_kquant(weight: torch.Tensor, fmt: KQuantFormat, importance: torch.Tensor | None = None,
                  n_grid: int = 20, iters: int = 4) -> QuantizedWeight:
    """K-quant parameters searched inside the K structure, minimising ``sum importance[c] * (w - w_hat)^2``.

    ``weight``: ``(out, in)``, ``in`` a multiple of 256. ``importance``: ``(in,)`` non-negative per input column
    (e.g. the calibration activations' mean square, llama.cpp's importance matrix); None weighs every column
    alike (plain weight error). Per super-block:

    1. Sub-blocks: ``n_grid + 1`` candidate ranges per sub-block (the RTN step ``range / top level`` scaled by
       ``top / (top + t)``, ``t`` from -1 to 1; symmetric: ``t`` from -0.9 to 0.9 around the lowest level),
       each rounded, then scale (and min >= 0) refitted to those codes by weighted least squares; the candidate
       with the lowest weighted error wins.
    2. The winners' scales and mins are rounded onto the super-block grid as in :meth:`KQuantFormat.fit`.
    3. ``iters`` rounds of alternating refinement: codes given the stored scales; ``d`` (and ``dmin``) given the
       codes and integer sub-scales, by weighted least squares, rounded to fp16; integer sub-scales (and mins)
       given ``d`` and the codes, by least squares per sub-block and rounding; codes again.

    Every super-block keeps the best parameters seen, plain RTN's (:meth:`KQuantFormat.fit`) included, so the
    weighted error is never above RTN's.
    """
    if not isinstance(fmt, KQuantFormat):
        raise ConfigError(f"the K-quant search needs a K-quant format (q2_k ... q6_k), got {fmt.spec()}")
    w = weight.detach().float()
    rows, cols = w.shape
    if cols % SUPER_BLOCK:
        raise ConfigError(f"{fmt.tag} needs rows that are whole super-blocks of {SUPER_BLOCK}; this weight has "
                          f"{cols} columns (quantize it with fmt.for_width({cols}) = {fmt.fallback.spec()})")
    n, gs = fmt.fit_span, fmt.group_size
    x = w.reshape(rows, cols // SUPER_BLOCK, n, gs)                  # (rows, S, n, gs)
    om = importance_weights(importance, w).reshape(1, cols // SUPER_BLOCK, n, gs).expand_as(x)

    def error(bp):
        p = _block_view(bp)
        q = fmt.quantize(x, p)
        return (om * (fmt.dequantize(q, p) - x) ** 2).sum((-1, -2)), q   # (rows, S), codes

    def keep(best, best_err, cand):
        err, _ = error(cand)
        better = err < best_err
        merged = {k: torch.where(better.view(rows, -1, 1), cand[k], best[k]) for k in best}
        return merged, torch.where(better, err, best_err)

    g = fmt.fit(x.reshape(rows, -1, gs))                              # RTN, per group (rows, G, 1)
    best = {k: v.reshape(rows, -1, n)[..., :1] if k.startswith("super") else v.reshape(rows, -1, n)
            for k, v in g.items()}
    best_err, _ = error(best)

    # 1. sub-block candidates
    sub_err = torch.full(x.shape[:-1], float("inf"), device=x.device)
    sub_s = torch.zeros(x.shape[:-1], device=x.device)
    sub_mn = torch.zeros(x.shape[:-1], device=x.device)
    for s, mn, q in range_candidates(x, om, fmt.sym, fmt.q_offset, fmt.maxq, n_grid):
        err = (om * (s.unsqueeze(-1) * q - mn.unsqueeze(-1) - x) ** 2).sum(-1)
        better = err < sub_err
        sub_err = torch.where(better, err, sub_err)
        sub_s = torch.where(better, s, sub_s)
        sub_mn = torch.where(better, mn, sub_mn)

    # 2. onto the super-block grid
    cand = fmt.super_params(sub_s, None if fmt.sym else sub_mn)
    best, best_err = keep(best, best_err, cand)

    # 3. alternating refinement from the best so far
    cur = best
    for _ in range(iters):
        _, codes = error(cur)
        qv = codes.float() - fmt.q_offset                             # (rows, S, n, gs) levels
        scv = cur["sub_scale"].float().unsqueeze(-1) - fmt.sc_offset  # (rows, S, n, 1)
        a = (scv * qv)                                                # w ~ d*a (- dmin*b)
        if fmt.sym:
            den = (om * a * a).sum((-1, -2))
            d = torch.where(den > 0, (om * a * x).sum((-1, -2)) / den.clamp_min(1e-30), cur["super_scale"][..., 0])
            cur = dict(cur, super_scale=_fp16(d).unsqueeze(-1))
        else:
            b = cur["sub_min"].float().unsqueeze(-1).expand_as(a)
            saa, sab, sbb = (om * a * a).sum((-1, -2)), (om * a * b).sum((-1, -2)), (om * b * b).sum((-1, -2))
            sax, sbx = (om * a * x).sum((-1, -2)), (om * b * x).sum((-1, -2))
            det = saa * sbb - sab * sab
            ok = det > 1e-12 * (saa * sbb).clamp_min(1e-30)
            safe = torch.where(ok, det, torch.ones_like(det))
            d = torch.where(ok, (sax * sbb - sbx * sab) / safe, cur["super_scale"][..., 0])
            dmin = torch.where(ok, (sax * sab - sbx * saa) / safe, cur["super_min"][..., 0])   # w ~ d*a - dmin*b
            cur = dict(cur, super_scale=_fp16(d).unsqueeze(-1), super_min=_fp16(dmin).unsqueeze(-1))
        best, best_err = keep(best, best_err, cur)
        # integer sub-scales (and mins) given d and the codes
        s, mn = ls_scale_min(x, qv, om, nonneg_min=not fmt.sym)
        d = cur["super_scale"]
        sc = (_div_round(s, d) + fmt.sc_offset).clamp(0, fmt.sc_max)
        cur = dict(cur, sub_scale=sc)
        if not fmt.sym:
            cur["sub_min"] = _div_round(mn, cur["super_min"]).clamp(0, fmt.sc_max)
        best, best_err = keep(best, best_err, cur)
        cur = best

    params = fmt.group_params(best)
    wg = x.reshape(rows, -1, gs)
    codes = fmt.quantize(wg, params).reshape(rows, cols)
    return QuantizedWeight(fmt, codes, {k: v.squeeze(-1) for k, v in params.items()})
