"""A lean greedy/sampling decode loop for decoder-only models (Llama and Gemma-3 families).

transformers' ``generate`` spends most of a CPU decode step outside the matmuls: about 170
operator calls per layer and token (cache bookkeeping, masks, rotary views, casts) plus
Python. :class:`LeanDecoder` runs the same model with about ten calls per layer:

- a preallocated KV cache per layer, written in place (``(kv_heads, max_len, head_dim)``);
- q/k/v and gate/up computed by one fused linear each (packed codes concatenated by rows,
  so one kernel call streams all of them);
- rotary tables computed once by the model's own rotary module (every rope type it
  supports), applied to q and k together;
- on CPU, fused ops for RMSNorm, q/k-norm + rope + cache write and single-query attention
  (``kernels/csrc/decode_ops.cpp``); elsewhere (or with ``LOWBIT_KERNELS=0``) their plain-torch
  equivalents: ``F.rms_norm``, ``scaled_dot_product_attention`` with grouped-query heads;
- quantized layers called through their kernel layouts (no per-call module dispatch).

It reads the model's own modules and config, so what it computes is the model's forward
pass; :func:`lean_supported` says whether a model fits (tests compare logits with the
model's own forward on every supported architecture). Weights are shared with the model,
except fused float q/k/v and gate/up weights, which are concatenated copies. Quantized layers
are called through their kernel layouts, taken when the decoder is built: build a new decoder
after changing the model's weights.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..kernels import kernels_active
from ..kernels.build import kernel_module
from ..models.arch import arch_for, get_module

__all__ = ["LeanDecoder", "lean_supported"]


def _text_config(model):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def lean_supported(model) -> str | None:
    """``None`` when :class:`LeanDecoder` can run ``model``, else the reason it cannot."""
    try:
        spec = arch_for(model)
    except UnsupportedModelError as e:
        return str(e)
    if not spec.lean_decode:
        return (f"the {spec.name!r} architecture row is not marked lean_decode (the lean decoder runs "
                "RMSNorm + rotary attention + gated-MLP blocks: the llama, gemma and gemma3 rows)")
    cfg = _text_config(model)
    if getattr(cfg, "attn_logit_softcapping", None):
        return "attention logit soft-capping is not implemented in the lean decoder"
    if next(model.parameters()).dtype != torch.float32:
        return "the lean decoder runs float32 models (quantized layers compute in float32)"
    return None


class _Fused(nn.Module):
    """Several linears reading the same input, computed by one call; outputs concatenated."""

    def __init__(self, linears: list[nn.Module]):
        super().__init__()
        #: how the call is made: "single", "float" (concatenated weights), "kernel" (concatenated
        #: packed rows, one fused kernel call) or "separate" (one call each, outputs concatenated)
        self.kind, self.fn = _fuse(linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _direct(m: nn.Module):
    """``m``'s kernel layout call when it has one (skips the module's per-call dispatch), else ``m``."""
    from ..nn.kernel_layouts import layout_for
    from ..nn.qlinear import QuantizedLinear

    if type(m) is QuantizedLinear and m.use_kernels and kernels_active():
        lay = layout_for(m)
        if lay is not None:
            bias = None if m.bias is None else m.bias.detach()
            return lambda x: lay.linear(x, bias)
    return m


def _fuse(linears: list[nn.Module]):
    """``(kind, fn)``: one callable computing ``cat([m(x) for m in linears], -1)``."""
    if len(linears) == 1:
        return "single", _direct(linears[0])
    if all(type(m) is nn.Linear for m in linears):
        w = torch.cat([m.weight.detach() for m in linears])
        has_b = [m.bias is not None for m in linears]
        b = (torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                        for m in linears]) if any(has_b) else None)
        return "float", lambda x: F.linear(x, w, b)
    fused = _fuse_kernel_layouts(linears)
    if fused is not None:
        return "kernel", fused
    fns = [_direct(m) for m in linears]
    return "separate", lambda x: torch.cat([f(x) for f in fns], dim=-1)


def _fuse_kernel_layouts(linears):
    """Concatenate the rows of same-kind scalar kernel layouts (the kernels treat rows independently)."""
    from ..kernels.ops import ScalarKernelLayout
    from ..nn.kernel_layouts import layout_for
    from ..nn.qlinear import QuantizedLinear

    if not kernels_active() or not all(type(m) is QuantizedLinear and m.use_kernels
                                                             for m in linears):
        return None
    lays = [layout_for(m) for m in linears]
    if not all(isinstance(lay, ScalarKernelLayout) for lay in lays):
        return None
    first = lays[0]
    key = lambda lay: (lay.kind, lay.bits, lay.group_size, lay.in_features, lay.scale_b is None,
                       None if lay.table is None else tuple(lay.table.tolist()))
    if any(key(lay) != key(first) for lay in lays):
        return None

    def cat(name):
        ts = [getattr(lay, name) for lay in lays]
        return None if ts[0] is None else torch.cat(ts).contiguous()

    lay = ScalarKernelLayout(first.kind, first.bits, first.group_size, first.in_features,
                             sum(lay.out_features for lay in lays), codes=cat("codes"), scale_a=cat("scale_a"),
                             scale_b=cat("scale_b"), zero=cat("zero"), table=first.table, q8=first.q8)
    biases = [m.bias for m in linears]
    bias = (torch.cat([b.detach() if b is not None else torch.zeros(m.out_features) for b, m in zip(biases, linears)])
            if any(b is not None for b in biases) else None)
    return lambda x: lay.linear(x, bias)


def _rms_torch(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def _rope_cache_torch(qkv, cos, ssin, kc, vc, pos: int, nq: int, nk: int, qk_w, qk_eps: float) -> torch.Tensor:
    """Plain-torch ``lowbit::rope_cache`` (kernels/csrc/decode_ops.cpp): returns the rotated q ``(n, nq, d)``."""
    n, d = qkv.shape[0], kc.shape[-1]
    qk = qkv[:, :(nq + nk) * d].reshape(n, nq + nk, d)
    if qk_w is not None:
        qk = F.rms_norm(qk, (d,), None, qk_eps) * qk_w
    cos, ssin = cos[pos:pos + n].unsqueeze(1), ssin[pos:pos + n].unsqueeze(1)  # (n, 1, d)
    qk = torch.addcmul(qk * cos, qk.roll(d // 2, dims=-1), ssin)
    kc[:, pos:pos + n] = qk[:, nq:].transpose(0, 1)
    vc[:, pos:pos + n] = qkv[:, (nq + nk) * d:].view(n, nk, d).transpose(0, 1)
    return qk[:, :nq]


def _find(root: nn.Module, path: str | None) -> nn.Module | None:
    """The submodule of ``root`` at ``path``, None where there is none."""
    try:
        return None if path is None else root.get_submodule(path)
    except AttributeError:
        return None


def _norm_weight(norm: nn.Module, offset: float) -> tuple[torch.Tensor, float]:
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None)
    if eps is None:
        raise UnsupportedModelError(f"cannot read the epsilon of {type(norm).__name__}")
    return (norm.weight.detach().float() + offset).contiguous(), float(eps)


@dataclass
class _Layer:
    qkv: _Fused
    o: Callable[[torch.Tensor], torch.Tensor]
    gate_up: _Fused
    down: Callable[[torch.Tensor], torch.Tensor]
    act: nn.Module
    norms: dict[str, tuple[torch.Tensor, float]]   # input, post_attn, pre_ff, post_ff, q, k (those present)
    rope: str          # key of the rotary table
    window: int | None  # sliding window (keys visible to a query), None = full attention


class LeanDecoder:
    """Greedy or sampled decoding of ``model`` with a static cache and a lean layer loop.

    ``max_len``: the longest sequence (prompt + new tokens) the cache holds.

        dec = LeanDecoder(model, max_len=512)
        out = dec.generate(input_ids, max_new_tokens=64)   # (1, prompt + 64) token ids
    """

    def __init__(self, model, max_len: int = 2048):
        why = lean_supported(model)
        if why is not None:
            raise UnsupportedModelError(why)
        self.model = model
        spec = arch_for(model)
        cfg = _text_config(model)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        qps = getattr(cfg, "query_pre_attn_scalar", None)
        self.scale = (qps if qps else self.head_dim) ** -0.5
        self.max_len = max_len
        self.embed = get_module(model, spec.embed)
        self.final_norm = _norm_weight(get_module(model, spec.final_norm), spec.norm_offset)
        self.head = _direct(get_module(model, spec.head))
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        from transformers.activations import ACT2FN

        act = ACT2FN[getattr(cfg, "hidden_activation", None) or cfg.hidden_act]
        layer_types = getattr(cfg, "layer_types", None)
        window = getattr(cfg, "sliding_window", None)
        dev = next(model.parameters()).device
        self.device = dev
        self.layers: list[_Layer] = []
        attn_in, _, mlp_in, _ = spec.groups  # a lean_decode row lists q/k/v, o, gate/up, down
        norm_names = {"input": attn_in.prev, "pre_ff": mlp_in.prev,
                      **dict(zip(("post_attn", "post_ff"), spec.post_norms or ()))}
        for i, blk in enumerate(get_module(model, spec.blocks)):
            qkv, o, gate_up, down = ([get_module(blk, n) for n in g.linears] for g in spec.groups)
            norms = {key: _norm_weight(get_module(blk, n), spec.norm_offset) for key, n in norm_names.items()}
            for key, name in zip(("q", "k"), spec.qk_norms):
                m = _find(blk, name)  # Qwen3 and Gemma-3 have q/k norms, Llama does not
                if m is not None:
                    norms[key] = _norm_weight(m, spec.norm_offset)
            lt = layer_types[i] if layer_types else "full_attention"
            self.layers.append(_Layer(
                qkv=_Fused(qkv), o=_direct(*o), gate_up=_Fused(gate_up), down=_direct(*down), act=act, norms=norms,
                rope=lt, window=window if (lt == "sliding_attention" and window) else None))
        self._rope = self._rope_tables(model, spec.rotary, sorted({lay.rope for lay in self.layers}), dev)
        shape = (self.n_kv, max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, device=dev) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=dev) for _ in self.layers]
        self.pos = 0
        #: use the fused CPU ops of kernels/csrc/decode_ops.cpp (else the plain-torch equivalents)
        self.fused_ops = dev.type == "cpu" and kernels_active("rope_cache")
        # q and k heads get one rms-norm weight row each (Gemma-3 q_norm / k_norm)
        lay0 = self.layers[0]
        self._qk_norm = "q" in lay0.norms
        self._qk_w = [torch.cat([lay.norms["q"][0].expand(self.n_heads, -1), lay.norms["k"][0].expand(self.n_kv, -1)])
                      if self._qk_norm else None for lay in self.layers]

    # -- setup -------------------------------------------------------------------------------------
    def _rope_tables(self, model, path: str | None, layer_types: list[str],
                     dev) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer_type: (cos, signed_sin)}``, each ``(max_len, head_dim)``, from the rotary module at ``path``.

        ``signed_sin`` carries rotate_half's sign: ``rope(x) = x*cos + roll(x, d/2)*signed_sin``.
        """
        rot = _find(model, path)
        if rot is None:
            raise UnsupportedModelError(f"the model has no rotary embedding module ({path})")
        pos = torch.arange(self.max_len, device=dev).unsqueeze(0)
        x = torch.zeros(1, device=dev)
        takes_type = "layer_type" in inspect.signature(rot.forward).parameters
        half = self.head_dim // 2
        sign = torch.cat([-torch.ones(half, device=dev), torch.ones(half, device=dev)])
        out = {}
        for lt in layer_types:
            cos, sin = rot(x, pos, layer_type=lt) if takes_type else rot(x, pos)
            out[lt] = (cos[0].float().contiguous(), (sin[0].float() * sign).contiguous())
        return out

    # -- the forward step -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the cached sequence (the cache memory is kept)."""
        self.pos = 0

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Append ``ids`` ``(n,)`` at the current position; logits of the last one, ``(vocab,)``."""
        n = ids.shape[-1]
        p0 = self.pos
        if p0 + n > self.max_len:
            raise ValueError(f"sequence of {p0 + n} tokens exceeds the decoder's cache of {self.max_len}; "
                             f"build LeanDecoder(model, max_len=...) with a larger max_len")
        h = self.embed(ids.view(1, n).to(self.device))[0]  # (n, hidden)
        nq, nk, d = self.n_heads, self.n_kv, self.head_dim
        t = p0 + n
        masks: dict[int | None, torch.Tensor | None] = {}
        fused = self.fused_ops
        ops = kernel_module() if fused else None   # torch.ops.lowbit's functions, bound directly
        norm = ops.rms_norm if fused else _rms_torch
        for li, lay in enumerate(self.layers):
            x = norm(h, *lay.norms["input"])
            qkv = lay.qkv(x)  # (n, (nq + 2 nk) d)
            kc, vc = self.k_cache[li], self.v_cache[li]
            cos, ssin = self._rope[lay.rope]
            qk_eps = lay.norms["q"][1] if self._qk_norm else 0.0
            if fused:  # q/k norm + rope + cache write in one op
                q = ops.rope_cache(qkv, cos, ssin, kc, vc, p0, nq, nk, self._qk_w[li], qk_eps)
            else:
                q = _rope_cache_torch(qkv, cos, ssin, kc, vc, p0, nq, nk, self._qk_w[li], qk_eps)
            lo = 0 if lay.window is None else max(0, t - lay.window)
            if fused and n == 1:
                a = ops.attn_decode(q, kc, vc, lo, t, self.scale)
            else:
                if lay.window not in masks:
                    masks[lay.window] = self._mask(p0, n, lo, t, lay.window)
                a = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), kc[:, lo:t].unsqueeze(0),
                                                   vc[:, lo:t].unsqueeze(0), attn_mask=masks[lay.window],
                                                   scale=self.scale, enable_gqa=nq != nk)  # (1, nq, n, d)
                a = a[0].transpose(0, 1).reshape(n, nq * d)
            a = lay.o(a)
            if "post_attn" in lay.norms:
                a = norm(a, *lay.norms["post_attn"])
            h = h + a
            x = norm(h, *lay.norms["pre_ff"])
            gu = lay.gate_up(x)
            i = gu.shape[-1] // 2
            m = lay.down(lay.act(gu[:, :i]) * gu[:, i:])
            if "post_ff" in lay.norms:
                m = norm(m, *lay.norms["post_ff"])
            h = h + m
        self.pos = t
        x = norm(h[-1:], *self.final_norm)
        logits = self.head(x)[0]
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _mask(self, p0: int, n: int, lo: int, t: int, window: int | None) -> torch.Tensor | None:
        """Boolean ``(n, t - lo)`` mask (True = attend) for queries ``p0..p0+n-1`` over keys ``lo..t-1``."""
        if n == 1:
            return None  # one query sees every cached key in range
        qpos = torch.arange(p0, p0 + n, device=self.device).unsqueeze(1)
        kpos = torch.arange(lo, t, device=self.device).unsqueeze(0)
        ok = kpos <= qpos
        if window is not None:
            ok &= qpos - kpos < window
        return ok

    # -- generation --------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None,
                 temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None,
                 prefill_chunk: int = 16) -> torch.Tensor:
        """Prompt ``(1, n)`` or ``(n,)`` -> ``(1, n + new)`` ids; greedy when ``temperature`` is 0.

        Stops early at ``eos_token_id`` (the EOS is kept). The prompt is fed ``prefill_chunk``
        tokens at a time, so quantized layers stay on their fused decode kernels.
        """
        ids = input_ids.reshape(-1).to(self.device)
        if ids.numel() == 0:
            raise ConfigError("generate needs a prompt of at least one token (e.g. BOS)")
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        self.reset()
        for s in range(0, ids.numel(), prefill_chunk):
            logits = self.forward(ids[s:s + prefill_chunk])
        out = [ids]
        for _ in range(max_new_tokens):
            if temperature > 0:
                z = logits / temperature
                if top_k:
                    kth = torch.topk(z, top_k).values[-1]
                    z = z.masked_fill(z < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(z, -1), 1, generator=generator)
            else:
                nxt = logits.argmax().view(1)
            out.append(nxt)
            if int(nxt) in eos or len(out) - 1 == max_new_tokens:
                break
            logits = self.forward(nxt)
        return torch.cat(out).unsqueeze(0)
