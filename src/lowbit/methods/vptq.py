"""VPTQ: vector post-training quantization with second-order assignment (Liu et al., EMNLP 2024).

Per linear ``(out, in)`` with input Hessian ``H`` (see ``docs/vptq.md``):

1. optional per-input-column norm: ``w = (lookup) * scale_j + bias_j``
   (``scale``/``bias`` = std/mean of column j, the reference's ``enable_norm``);
2. outlier columns: the top ``outlier_pct`` % of columns by ``diag(H)`` get
   their own codebook ``(k0, v0)``;
3. codebooks by k-means on the column vectors (``v`` consecutive output rows
   of one column), each vector weighted by ``H_jj * scale_j**2`` (its
   column's Hessian diagonal, in original units); a residual codebook (``k_res``)
   by k-means on the first codebook's residuals;
4. channel-independent second-order assignment: columns visited by
   decreasing ``diag(H)`` (``col_perm``), each column's vectors set to the
   nearest centroid (+ nearest residual centroid), and the column's error
   propagated to the later columns through the Cholesky factor of ``H^-1``
   with lazy batch updates, exactly as GPTQ does for scalars;
5. after a block is quantized, optional layer-wise fine-tuning
   (``ft_steps``): Adam on the codebooks and norms against the float block's
   outputs, codes fixed.

Every codebook and norm is rounded to fp16 before assignment, so error
feedback sees exactly the stored values.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch

from ..errors import ConfigError
from ..formats.codebook import VQWeight, nearest, weighted_kmeans
from .feedback import error_feedback, live_copies
from .registry import register_method

log = logging.getLogger(__name__)

__all__ = ["VPTQConfig", "vptq_quantize", "preset_for", "layer_config", "vq_layer_bits", "vq_spec",
           "vptq_finetune_block"]


@dataclass(frozen=True)
class VPTQConfig:
    vector_len: int = 6              # v: weights per vector, along the output dimension
    codebook_size: int = 4096        # k: main codebook entries (index bits = ceil(log2 k))
    residual_size: int = 0           # k_res: residual codebook entries, 0 = off
    outlier_pct: float = 1.0         # % of input columns (largest diag(H)) with their own codebook, 0 = off
    outlier_vector_len: int = 2      # v0: vector length of the outlier columns
    outlier_codebook_size: int = 256  # k0: codebook entries of the outlier columns
    col_norm: bool = True            # per-input-column scale/bias (fp16 each)
    col_perm: bool = True            # visit columns by decreasing diag(H) (not stored: codes keep column order)
    damp: float = 0.01               # fraction of mean diag(H) added to H (same flag as GPTQ)
    block_size: int = 128            # columns per lazy batch update (same flag as GPTQ)
    kmeans_iters: int = 20           # Lloyd iterations (reference: 100)
    kmeans_tol: float = 1e-5         # relative inertia improvement that stops k-means (reference: 1e-5)
    kmeans_seed: int = 0             # k-means init seed
    ft_steps: int = 0                # layer-wise fine-tuning Adam steps per block, 0 = off
    ft_lr: float = 1e-3              # Adam step size, relative to each tuned tensor's mean |value|
    ft_windows: int = 4              # calibration windows per fine-tuning step
    vptq_preset: float = 0.0         # >0: per layer, pick (v, k, k_res) for this bpw (codebooks included)

    def __post_init__(self):
        if self.vector_len < 1 or self.outlier_vector_len < 1:
            raise ConfigError("--vector-len and --outlier-vector-len must be at least 1")
        if self.codebook_size < 2 or self.outlier_codebook_size < 2:
            raise ConfigError("--codebook-size and --outlier-codebook-size must be at least 2")
        if self.codebook_size > 65536 or self.residual_size > 65536 or self.outlier_codebook_size > 65536:
            raise ConfigError("codebooks hold at most 65,536 entries (16-bit indices)")
        if self.residual_size < 0 or self.residual_size == 1:
            raise ConfigError("--residual-size must be 0 (off) or at least 2")
        if not 0 <= self.outlier_pct < 100:
            raise ConfigError(f"--outlier-pct must be in [0, 100), got {self.outlier_pct}")


# ---------------------------------------------------------------- presets


def _n_outlier(cfg: VPTQConfig, in_f: int) -> int:
    return math.ceil(cfg.outlier_pct / 100 * in_f) if cfg.outlier_pct > 0 else 0


def vq_spec(cfg: VPTQConfig, out_f: int, in_f: int) -> dict:
    """The ``vq`` codec spec of one ``(out, in)`` layer under ``cfg`` (a preset resolved already)."""
    return {"out_features": out_f, "in_features": in_f, "v": cfg.vector_len, "k": cfg.codebook_size,
            "k_res": cfg.residual_size, "n_outlier": _n_outlier(cfg, in_f), "v0": cfg.outlier_vector_len,
            "k0": cfg.outlier_codebook_size, "norm": cfg.col_norm}


def vq_layer_bits(cfg: VPTQConfig, out_f: int, in_f: int) -> int:
    """Exact stored bits of one ``(out, in)`` layer under ``cfg`` (the codec's own buffer sizes)."""
    from ..nn.bpw import codec_bits

    return sum(codec_bits("vq", vq_spec(cfg, out_f, in_f)).values())


def preset_for(target_bpw: float, shapes, base: VPTQConfig | None = None, k_max: int = 4096,
               min_vectors_per_centroid: int = 4, vector_lens=(2, 4, 6, 8, 12, 16)) -> VPTQConfig:
    """``base`` with ``(vector_len, codebook_size, residual_size)`` chosen for ``target_bpw``.

    ``shapes``: the ``(out, in)`` of every layer the config will quantize
    (repeats count). The stored bits of all of them (codes, codebooks,
    outliers, norms: exactly the codec's buffers) over their weights must not
    exceed ``target_bpw``. Among the fitting candidates the one with the
    most index bits per weight wins (ties: longer vectors, then a larger main
    codebook). ``k`` is capped by ``k_max`` (CPU k-means time) and by
    ``min_vectors_per_centroid`` on the smallest layer; ``v`` must divide
    every ``out``. Raises ConfigError when nothing fits.
    """
    base = base or VPTQConfig()
    shapes = [tuple(s) for s in shapes]
    n_weights = sum(o * i for o, i in shapes)
    best, best_key = None, None
    for v in vector_lens:
        if any(o % v for o, _ in shapes) or any(o % base.outlier_vector_len for o, _ in shapes):
            continue
        n_vec_min = min((o // v) * (i - _n_outlier(base, i)) for o, i in shapes)
        for b in range(1, 17):
            k = 1 << b
            if k > k_max or k * min_vectors_per_centroid > n_vec_min:
                break
            for br in [0] + list(range(1, b + 1)):
                kr = 0 if br == 0 else 1 << br
                cfg = replace(base, vector_len=v, codebook_size=k, residual_size=kr, vptq_preset=0.0)
                bits = sum(vq_layer_bits(cfg, o, i) for o, i in shapes)
                if bits > target_bpw * n_weights:
                    continue
                key = ((b + br) / v, v, b)
                if best_key is None or key > best_key:
                    best, best_key = cfg, key
    if best is None:
        raise ConfigError(
            f"no VPTQ setting fits {target_bpw} bpw on layers {sorted(set(shapes))}: raise the target, "
            "or lower --outlier-pct / turn off --col-norm to save their overhead"
        )
    return best


def layer_config(cfg: VPTQConfig, out_f: int, in_f: int) -> VPTQConfig:
    """The settings one layer uses: ``cfg`` itself, or its preset resolved for this layer's shape."""
    if cfg.vptq_preset > 0:
        return preset_for(cfg.vptq_preset, [(out_f, in_f)], cfg)
    return cfg


# ---------------------------------------------------------------- solver


def _vectors(w: torch.Tensor, v: int) -> torch.Tensor:
    """Column vectors of ``w`` ``(out, n)``: ``(n * out // v, v)``, column-major over vectors."""
    return w.T.reshape(-1, v)


@torch.no_grad()
def vptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, cfg: VPTQConfig,
                  second_order: bool = True) -> VQWeight:
    """Vector-quantize ``weight`` ``(out, in)`` given the input Hessian ``(in, in)``.

    ``second_order=False`` assigns every vector to its nearest centroid with
    no error feedback (plain VQ with the same codebooks), for comparison.
    """
    W, H = live_copies(weight, hessian)
    out_f, in_f = W.shape
    cfg = layer_config(cfg, out_f, in_f)
    v, k, kr = cfg.vector_len, cfg.codebook_size, cfg.residual_size
    if out_f % v:
        divs = [d for d in range(2, 17) if out_f % d == 0]
        raise ConfigError(f"VPTQ: out_features {out_f} is not divisible by --vector-len {v}; "
                          f"use a vector length that divides it (e.g. {divs})")
    n_out = _n_outlier(cfg, in_f)
    v0, k0 = cfg.outlier_vector_len, cfg.outlier_codebook_size
    if n_out and out_f % v0:
        raise ConfigError(f"VPTQ: out_features {out_f} is not divisible by --outlier-vector-len {v0}; "
                          "use one that divides it, or --outlier-pct 0")
    dev = W.device
    hdiag = torch.diag(H).clone()

    is_out = torch.zeros(in_f, dtype=torch.bool, device=dev)
    outlier_cols = None
    if n_out:
        outlier_cols = hdiag.topk(n_out).indices.sort().values
        is_out[outlier_cols] = True
    main_cols = (~is_out).nonzero().flatten()

    # per-column norm, rounded to what is stored; x = (w - bias) / scale is what the codebooks see
    if cfg.col_norm:
        bias = W.mean(0).half().float()
        scale = W.std(0).half().float()
    else:
        bias = torch.zeros(in_f, device=dev)
        scale = torch.ones(in_f, device=dev)
    sdiv = torch.where(scale > 0, scale, torch.ones_like(scale))
    Xn = (W - bias) / sdiv
    colw = hdiag * scale.pow(2)  # error of a normalised vector, in output units, per unit distance

    def fit(cols, vl, kk, pin_zero=False, resid_of=None):
        x = _vectors(Xn[:, cols], vl)
        wts = colw[cols].repeat_interleave(out_f // vl)
        if resid_of is not None:
            x = x - resid_of[nearest(x, resid_of)[0]]
        c, _ = weighted_kmeans(x, wts, kk, cfg.kmeans_iters, cfg.kmeans_tol, cfg.kmeans_seed, pin_zero)
        return c.half().float()

    C = fit(main_cols, v, k)
    R = fit(main_cols, v, kr, pin_zero=True, resid_of=C) if kr else None
    C0 = fit(outlier_cols, v0, k0) if n_out else None
    csq = C.pow(2).sum(1)
    rsq = R.pow(2).sum(1) if R is not None else None
    c0sq = C0.pow(2).sum(1) if C0 is not None else None

    def assign(cb, sq, x):
        return nearest(x, cb, sq)[0]

    idx = torch.zeros(out_f // v, in_f, dtype=torch.long, device=dev)
    ridx = torch.zeros_like(idx) if R is not None else None
    oidx = torch.zeros(out_f // v0, in_f, dtype=torch.long, device=dev) if n_out else None

    def quantize_column(c, w, current=None):
        x = (w[:, 0] - bias[c]) / sdiv[c]
        if is_out[c]:
            a = assign(C0, c0sq, x.view(-1, v0))
            oidx[:, c] = a
            q = C0[a]
        else:
            xs = x.view(-1, v)
            a = assign(C, csq, xs)
            idx[:, c] = a
            q = C[a]
            if R is not None:
                ar = assign(R, rsq, xs - q)
                ridx[:, c] = ar
                q = q + R[ar]
        return (q.reshape(-1) * scale[c] + bias[c])[:, None]

    if second_order:
        error_feedback(W, H, cfg.damp, cfg.block_size, cfg.col_perm, quantize_column)
    else:
        for c in range(in_f):
            quantize_column(c, W[:, c : c + 1])

    qw = VQWeight(out_f, in_f, C, idx[:, main_cols].contiguous())
    if R is not None:
        qw.res_codebook, qw.res_idx = R, ridx[:, main_cols].contiguous()
    if n_out:
        qw.outlier_cols, qw.out_codebook, qw.out_idx = outlier_cols, C0, oidx[:, outlier_cols].contiguous()
    if cfg.col_norm:
        qw.col_scale, qw.col_bias = scale, bias
    return qw


# ---------------------------------------------------------------- layer-wise fine-tuning

_TUNED = ("codebook", "res_codebook", "out_codebook", "col_scale", "col_bias")


def _block_loss(block, xs, ys, kwargs, device):
    from ..calib.engine import batch_kwargs

    out = block(xs.to(device), **batch_kwargs(kwargs, xs.shape[0]))
    out = out[0] if isinstance(out, tuple) else out
    return torch.nn.functional.mse_loss(out.float(), ys.to(device).float())


def vptq_finetune_block(data, arch, float_outputs, cfg: VPTQConfig) -> None:
    """Tune the block's codebooks and column norms (codes fixed) to match the float block's outputs.

    Adam, ``ft_steps`` steps of ``ft_windows`` calibration windows each (a
    seeded shuffle). Step sizes are ``ft_lr`` times each tensor's mean
    ``|value|`` (scales are ~100x smaller than normalised centroids). The
    block's output MSE on the first ``ft_windows * 2`` windows is measured
    before and after; a tuning that made it worse is undone.
    """
    if cfg.ft_steps <= 0 or not float_outputs:
        return
    from ..nn import QuantizedLinear

    block, device = data.block, data.device
    mods = [m for m in block.modules() if isinstance(m, QuantizedLinear) and m.spec["codec"] == "vq"]
    if not mods:
        return
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    saved, groups = [], []
    for m in mods:
        m.set_weight_cache(False)
        for n in _TUNED:
            if n in m.codec.buffer_shapes(m.spec):
                t = getattr(m, n)
                saved.append((m, n, t))
                leaf = t.detach().float().clone().requires_grad_(True)
                setattr(m, n, leaf)
                groups.append({"params": [leaf], "lr": cfg.ft_lr * float(t.float().abs().mean().clamp_min(1e-8))})
    xs = torch.cat(data.inputs)   # (windows, T, hidden)
    ys = torch.cat(float_outputs)
    # at most one engine batch per step: the call kwargs were captured for that batch size
    n, bw = xs.shape[0], max(1, min(cfg.ft_windows, data.inputs[0].shape[0]))
    n_eval = min(n, 2 * bw)

    def eval_loss():
        with torch.no_grad():
            return sum(float(_block_loss(block, xs[s : s + bw], ys[s : s + bw], data.kwargs, device))
                       for s in range(0, n_eval, bw))

    before = eval_loss()
    opt = torch.optim.Adam(groups)
    g = torch.Generator().manual_seed(data.index)
    order = torch.randperm(n, generator=g)
    with torch.enable_grad():
        for step in range(cfg.ft_steps):
            s = (step * bw) % n
            sel = order[s : s + bw]
            if sel.numel() < bw:
                sel = torch.cat([sel, order[: bw - sel.numel()]])
            loss = _block_loss(block, xs[sel], ys[sel], data.kwargs, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    # store what the checkpoint stores (fp16) before judging the result
    tuned = [(m, nm, getattr(m, nm).detach().to(torch.float16)) for m, nm, _ in saved]
    for m, nm, t in tuned:
        setattr(m, nm, t)
    after = eval_loss()
    if after > before:
        log.info("block %d: fine-tuning raised the output MSE (%.4g -> %.4g); kept the untuned codebooks",
                 data.index, before, after)
        for m, nm, t in saved:
            setattr(m, nm, t)
    else:
        log.debug("block %d: fine-tuning output MSE %.4g -> %.4g", data.index, before, after)
    for m in mods:
        m.set_weight_cache(True)
    for p in frozen:
        p.requires_grad_(True)


@register_method("vptq", config=VPTQConfig, needs={"hessian", "block_outputs"}, finish_block=vptq_finetune_block,
                 uses_format=False)
def vptq(weight, stats, fmt, cfg: VPTQConfig):
    """VPTQ: Hessian-weighted k-means codebooks, second-order vector assignment, residual VQ, outliers."""
    # a vector method: the scalar ``fmt`` the engine passes is not used
    return vptq_quantize(weight, stats.hessian, cfg)
