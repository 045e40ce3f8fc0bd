"""Linears with quantized weights *and* activations, computed by an integer GEMM.

``QuantizedActLinear`` computes ``y = x W^T + b`` as

    x' = x[..., idx] * inv_k                       optional flattening (FlattenQuant)
    s  = act_scale (static, per tensor)  or  max|x'_t| / Qa per token (dynamic)
    qa = clamp(round(x' / s), -Qa, Qa)             int8 codes, Qa = 2**(a_bits-1) - 1
    acc = qa @ qw^T                                 INT8 x INT8 -> INT32, exact
    y  = acc * (s * w_scale) + b

The integer path: :func:`lowbit.kernels.intmm.act_quant` (per row: the flattening gather of flattened layers,
max, divide, round half to even, clamp, int8 and the zero padding to ``Kp``, in one pass on an AVX-512 CPU), the GEMM :func:`lowbit.kernels.intmm.int_mm` (its backend
chosen per shape, reading the stored ``(out, Kp)`` int8 codes in place: the module keeps no float copy of its
weight) and :func:`lowbit.kernels.intmm.rescale` (``acc * (s outer w_scale) + b`` in one pass, written into the
int32 result's own storage), both in :func:`lowbit.kernels.intmm.int_linear` (column blocks for a wide head).
Each of the two float steps equals its plain-torch reference bit for bit. The simulated path's codes come from
:func:`quantize_activations` (the same codes, as float).

:func:`act_head` makes the LM head such a layer too (W8A8, per-token dynamic), the W8A8 methods' ``int8_head``.

Weights are symmetric per output channel (lowbit's ``IntFormat(bits, -1,
sym=True)``), stored as signed codes ``qw`` in ``[-2**(b-1), 2**(b-1))``:
int8 ``(out, Kp)`` for 8 bits, packed nibbles uint8 ``(out, Kp/2)`` for 4
bits (low nibble = even column). ``Kp`` is the (flattened) input width
rounded up to 32 with zero columns, so the GEMM needs no per-call padding.

Flattening (FlattenQuant): input channel ``c`` with calibration max above
the threshold is split into ``k_c`` channels of ``x_c / k_c`` and its weight
column repeated ``k_c`` times, so ``x' W'^T = x W^T`` exactly in real
arithmetic. Stored: ``flat_idx`` int32 ``(K',)`` (source channel of each
flattened channel) and ``flat_k`` int16 ``(K',)``; at run time it is one
gather and a multiply.

``mode``: ``"int"`` (the integer GEMM, default) or ``"fake"`` (simulated:
the same codes, dequantized, through a float matmul). Both paths compute the
*same* integer codes; the int32 accumulation is exact, so the two differ only
by float32 rounding in the fake path's matmul and the final rescale.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..formats import IntFormat, QuantizedWeight, quantize_rtn
from .codecs import register_codec
from .qlinear import _PackedWeight

__all__ = ["QuantizedActLinear", "act_codes", "act_head", "act_head_step", "act_linear_summary", "act_spec", "check_act_format", "from_quantized_weight", "pack_int4", "padded_k", "quantize_activations", "quantize_weight_pc", "unpack_int4"]


def padded_k(k: int) -> int:
    return -(-k // 32) * 32


def act_spec(in_features: int, out_features: int, w_bits: int = 8, a_bits: int = 8, dynamic: bool = False,
             flat_features: int | None = None) -> dict:
    """JSON-ready layer spec; ``flat_features`` = input width after flattening (None: no flattening)."""
    if w_bits not in (4, 8) or a_bits not in (4, 8):
        raise ValueError(f"weights and activations must be 4 or 8 bits, got W{w_bits}A{a_bits}")
    return {"codec": "act_linear", "in_features": in_features, "out_features": out_features, "w_bits": w_bits,
            "a_bits": a_bits, "dynamic": bool(dynamic),
            "flat_features": in_features if flat_features is None else int(flat_features),
            "flatten": flat_features is not None}


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit values ``(..., 2n)`` in [-8, 7] -> uint8 ``(..., n)``, low nibble = even column."""
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(..., n)`` -> int8 ``(..., 2n)``."""
    lo = (p & 0xF).to(torch.int8)
    hi = (p >> 4).to(torch.int8)
    q = torch.stack([lo, hi], dim=-1).flatten(-2)
    return (q ^ 8) - 8  # sign-extend the nibble


def act_codes(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric activation codes ``clamp(round(x / scale), -Q, Q)`` as float, ``Q = 2**(bits-1) - 1``.

    The range is symmetric ([-127, 127] at 8 bits): the AVX2 GEMM relies on it.
    """
    q = (1 << (bits - 1)) - 1
    return torch.round(x / scale).clamp_(-q, q)


def quantize_activations(x: torch.Tensor, bits: int, scale: torch.Tensor | None = None,
                         idx: torch.Tensor | None = None, inv_k: torch.Tensor | None = None,
                         dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation codes of float32 ``x`` ``(M, K)`` and their scale, bit for bit
    ``act_codes(x[:, idx] * inv_k, s, bits)``.

    ``idx`` ``(K',)`` long / ``inv_k`` ``(K',)`` float32: the flattening gather (source channel, 1 / split
    factor; padding columns read channel 0 times 0), or None for none. ``scale``: the static ``(1,)`` scale,
    or None for one per token, ``max|x'_t| / Q`` (at least 1e-8), returned ``(M, 1)``. Codes are ``dtype``
    ``(M, K')``; only ``x / s`` (no gather) or the gathered buffer is allocated, the rest is in place.
    """
    q = (1 << (bits - 1)) - 1
    t = None
    if idx is not None:
        t = torch.index_select(x, 1, idx)                          # (M, K') flattened, zero-padded
        t.mul_(inv_k)
    src = x if t is None else t
    if scale is None:
        # max|x'| per token without an |x'| copy (amax and amin: faster here than aminmax or abs().amax)
        scale = torch.maximum(src.amax(-1, keepdim=True), src.amin(-1, keepdim=True).neg_()).div_(q).clamp_min_(1e-8)
    t = x / scale if t is None else t.div_(scale)
    t.round_().clamp_(-q, q)
    return (t if dtype == t.dtype else t.to(dtype)), scale


class _ActLinearCodec:
    """Buffers of a QuantizedActLinear (so checkpoints validate them like any codec's)."""

    def buffer_shapes(self, spec):
        out_f, kp = spec["out_features"], padded_k(spec["flat_features"])
        shapes = {"qweight": ((out_f, kp), torch.int8) if spec["w_bits"] == 8 else ((out_f, kp // 2), torch.uint8),
                  "w_scale": ((out_f,), torch.float16)}
        if not spec["dynamic"]:
            shapes["act_scale"] = ((1,), torch.float16)
        if spec["flatten"]:
            shapes["flat_idx"] = ((spec["flat_features"],), torch.int32)
            shapes["flat_k"] = ((spec["flat_features"],), torch.int16)
        return shapes

    def decode(self, buffers, spec):
        """The float ``(out, in)`` weight in the original input space (flattened columns summed back)."""
        kf = spec["flat_features"]
        q = buffers["qweight"] if spec["w_bits"] == 8 else unpack_int4(buffers["qweight"])
        w = q[:, :kf].float() * buffers["w_scale"].float()[:, None]
        if not spec["flatten"]:
            return w
        out = torch.zeros(spec["out_features"], spec["in_features"], dtype=w.dtype, device=w.device)
        return out.index_add_(1, buffers["flat_idx"].long(), w / buffers["flat_k"].float())


register_codec("act_linear", _ActLinearCodec())


class QuantizedActLinear(_PackedWeight):
    """Weight+activation quantized linear with an integer GEMM (see module doc)."""

    def __init__(self, spec: dict, bias: bool = False):
        super().__init__(spec)
        self.cache_weight = False   # the forward reads the codes; a float weight is only ever exported
        self.in_features = spec["in_features"]
        self.out_features = spec["out_features"]
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None
        #: "int" (integer GEMM) or "fake" (same codes, float matmul)
        self.mode = "int"
        self._gather: tuple[torch.Tensor, torch.Tensor] | None = None
        self._w8: torch.Tensor | None = None   # 4-bit weights: the unpacked int8 operand, made once
        self._packed = None                     # the int8 operand in oneDNN's layout, where that path is chosen

    # ------------------------------------------------------------ views

    def int_weight(self) -> torch.Tensor:
        """Signed int8 weight codes ``(out, Kp)``, row-major: the GEMM's operand, never re-packed per call.

        8 bits: ``qweight`` itself (no copy). 4 bits: the nibbles unpacked once and kept (not saved; dropped
        when the buffers change), so a W4 layer holds 1.5 bytes per weight at run time on CPU.
        """
        if self.spec["w_bits"] == 8:
            return self.qweight
        w = self._w8
        if w is None or w.device != self.qweight.device:
            w = self._w8 = unpack_int4(self.qweight)
        return w

    def _gather_map(self, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(idx, inv_k)`` of length ``Kp`` (padding columns read channel 0 times 0), or None if no gather is needed."""
        kf, kp = self.spec["flat_features"], padded_k(self.spec["flat_features"])
        if not self.spec["flatten"] and kf == kp:
            return None
        g = self._gather
        if g is None or g[0].device != device:
            idx = self.flat_idx.long() if self.spec["flatten"] else torch.arange(kf)
            inv_k = 1.0 / self.flat_k.float() if self.spec["flatten"] else torch.ones(kf)
            pad = kp - kf
            idx = torch.cat([idx.to(device), torch.zeros(pad, dtype=torch.long, device=device)])
            inv_k = torch.cat([inv_k.to(device), torch.zeros(pad, device=device)])
            g = self._gather = (idx, inv_k)
        return g

    def _onednn_weight(self, m: int):
        """The int8 weight in oneDNN's blocked layout (made on first use, kept, not saved: a second int8 copy)."""
        p = self._packed
        if p is None:
            from ..kernels.intmm import onednn_prepack

            p = self._packed = onednn_prepack(self.int_weight(), m)
        return p

    def _drop_caches(self) -> None:
        super()._drop_caches()
        self._gather = None
        self._w8 = None
        self._packed = None

    # ------------------------------------------------------------ compute

    def _quantize(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.reshape(-1, x.shape[-1]).float()
        scale = None if self.spec["dynamic"] else self.act_scale.float()
        if dtype == torch.int8:
            # the GEMM operand: the flattening gather (if any), then codes and zero padding in one pass per row
            from ..kernels.intmm import act_quant

            g = self._gather_map(x.device) if self.spec["flatten"] else None   # padding alone needs no gather
            return act_quant(x, padded_k(self.spec["flat_features"]), self.spec["a_bits"], scale, *(g or (None, None)))
        g = self._gather_map(x.device)
        return quantize_activations(x, self.spec["a_bits"], scale, *(g or (None, None)), dtype=dtype)

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Activation codes ``(M, Kp)`` (float, integer-valued) and their scale (``(1,)`` or ``(M, 1)``)."""
        return self._quantize(x, torch.float32)

    def int_accumulate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact int32 accumulation ``qa @ qw^T`` ``(M, out)`` and the activation scale."""
        from ..kernels.intmm import int_mm

        qa, s = self._quantize(x, torch.int8)
        return int_mm(qa, self.int_weight()), s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        bias = None if self.bias is None else self.bias.float()
        if self.mode == "int":
            from ..kernels.intmm import int_linear

            qa, s = self._quantize(x, torch.int8)
            y = int_linear(qa, self.int_weight(), s, self.w_scale.float(), bias,   # exact GEMM, one-pass rescale
                           packed=lambda: self._onednn_weight(qa.shape[0]))
        else:
            qa, s = self.quantize_input(x)
            w = self.int_weight().float() * self.w_scale.float()[:, None]    # (out, Kp)
            y = (qa * s) @ w.T
            if bias is not None:
                y = y.add_(bias)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        sp = self.spec
        act = "dynamic" if sp["dynamic"] else "static"
        fl = f", flattened {sp['in_features']}->{sp['flat_features']}" if sp["flatten"] else ""
        return (f"in_features={sp['in_features']}, out_features={sp['out_features']}, "
                f"W{sp['w_bits']}A{sp['a_bits']} ({act}){fl}, mode={self.mode}")


def from_quantized_weight(qw, spec: dict, act_scale: float | None = None, flat_idx: torch.Tensor | None = None,
                          flat_k: torch.Tensor | None = None) -> QuantizedActLinear:
    """A QuantizedActLinear from a per-channel symmetric int ``QuantizedWeight`` (RTN or GPTQ output).

    ``qw.fmt`` must be ``IntFormat(bits, group_size=-1, sym=True)`` with ``bits == spec["w_bits"]``;
    its codes ``[0, 2**b)`` with zero point ``2**(b-1)`` become signed codes, zero-padded to ``padded_k`` columns.
    """
    fmt = qw.fmt
    if getattr(fmt, "name", "") != "int" or not fmt.sym or qw.params["scale"].shape[1] != 1 or fmt.bits != spec["w_bits"]:
        raise ValueError(f"integer GEMM needs symmetric per-output-channel int{spec['w_bits']} weights, got {fmt.spec()}")
    m = QuantizedActLinear(spec)
    kf = spec["flat_features"]
    q = torch.zeros(spec["out_features"], padded_k(kf), dtype=torch.int8)
    q[:, :kf] = (qw.codes - (1 << (fmt.bits - 1))).to(torch.int8)
    m.qweight = q if spec["w_bits"] == 8 else pack_int4(q)
    m.w_scale = qw.params["scale"][:, 0].to(torch.float16).clone()
    if not spec["dynamic"]:
        m.act_scale = torch.tensor([act_scale], dtype=torch.float16)
    if spec["flatten"]:
        m.flat_idx = flat_idx.to(torch.int32).clone()
        m.flat_k = flat_k.to(torch.int16).clone()
    return m


def act_head(model: nn.Module, arch) -> QuantizedActLinear:
    """Swap ``model``'s LM head (``arch.head``) for a W8A8 :class:`QuantizedActLinear`: symmetric int8 per output
    channel (RTN), per-token dynamic int8 activations; returns it.

    A head tied to the embedding is untied first: the embedding keeps its float weight (the lookup reads it)
    and the head holds its own int8 copy, so the checkpoint stores both (bpw and memory count both) and its
    config says ``tie_word_embeddings: false``.
    """
    from ..models.arch import get_module, set_module, untie_word_embeddings

    head = get_module(model, arch.head)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"int8 head: {arch.head} is a {type(head).__name__}, not a float linear")
    w = head.weight.detach()
    m = from_quantized_weight(quantize_rtn(w, IntFormat(8, -1, sym=True)), act_spec(w.shape[1], w.shape[0], 8, 8,
                                                                                     dynamic=True))
    if head.bias is not None:
        m.bias = nn.Parameter(head.bias.detach().float().clone(), requires_grad=False)
    set_module(model, arch.head, m.to(w.device))
    untie_word_embeddings(model)   # after the swap, so nothing copies the embedding: only the config says untied
    return m


def act_head_step(model: nn.Module, arch, fmt, cfg) -> None:
    """The W8A8 methods' ``finish_model`` step: :func:`act_head` when their config's ``int8_head`` is set."""
    if cfg.int8_head:
        act_head(model, arch)


def check_act_format(fmt, method: str) -> None:
    """Integer GEMMs need symmetric per-output-channel int4/int8 weights: say so instead of guessing."""
    if getattr(fmt, "name", "") != "int" or not fmt.sym or fmt.group_size != -1 or fmt.bits not in (4, 8):
        raise ConfigError(f"{method} computes with integer GEMMs: weights must be symmetric int8 or int4 per output "
                          f"channel; pass --format int --sym --group-size -1 --bits 8 (got {fmt.spec()})")


def quantize_weight_pc(weight: torch.Tensor, fmt, per_tensor: bool = False) -> QuantizedWeight:
    """RTN with ``fmt`` (per output channel), or one scale for the whole tensor."""
    if not per_tensor:
        return quantize_rtn(weight, fmt)
    w = weight.detach().float()[:, None, :]                           # (out, 1, in)
    hi = w.abs().amax().expand(w.shape[0], 1, 1)
    params = fmt.fit(w, hi=hi)
    return QuantizedWeight(fmt, fmt.quantize(w, params)[:, 0], {"scale": params["scale"][:, :, 0]})


def act_linear_summary(model: nn.Module) -> dict:
    """Counts of QuantizedActLinear precisions and the INT4 share of linear compute (MACs per token)."""
    macs = {}
    for m in model.modules():
        if isinstance(m, QuantizedActLinear):
            key = f"W{m.spec['w_bits']}A{m.spec['a_bits']}"
            macs[key] = macs.get(key, 0) + m.out_features * m.spec["flat_features"]
    total = sum(macs.values()) or 1
    n_in = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedActLinear))
    return {"macs_per_token": macs, "int4_share": macs.get("W4A4", 0) / total,
            "flatten_overhead": total / n_in - 1 if n_in else 0.0}
