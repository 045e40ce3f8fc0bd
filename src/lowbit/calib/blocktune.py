"""Block-wise reconstruction: tune one quantized decoder block against the float block's outputs.

A stage after any solver (RTN, GPTQ, AWQ, ...) on the scalar ``int``, ``fp`` and ``nf`` formats, run by the
calibration engine between quantizing a block and passing its outputs on (``--block-tune``, docs/methods.md).
Each quantized linear of the block becomes a :class:`TunableLinear` that computes its weight as

    w_hat = dequantize(round_ste(W / s) + z, s, z),   (s, z) = params(theta)

with the format's own rounding rule in the forward pass and the identity in the backward pass (straight-through).
What ``theta`` holds depends on the mode:

- ``lwc`` (OmniQuant's learnable weight clipping): per-group clipping strengths ``f = sigmoid(g) / sigmoid(4)``
  (``g`` starts at 4, OmniQuant's initial value, so ``f`` starts at exactly 1): they scale the range the solver
  chose (the int format's upper and lower bounds ``s (2^b-1-z)`` and ``-s z``; a table format's scales), and the
  scale and zero point follow from the clipped range as the format's ``fit`` computes them;
- ``lwc+scale``: also the solver's scales and zero points themselves (zero points rounded straight-through);
- ``ap`` (EfficientQAT's Block-AP): the weights ``W``, scales and zero points; no clipping strengths.

Everything starts at the solver's result exactly: the latent weight ``W`` is the float weight where rounding it
with the solver's parameters gives the solver's code, and the solver's dequantized value elsewhere (GPTQ's codes
differ from rounding the float weight), so the block before any step computes what the solver stored, bit for
bit. Tuning ends with plain codes and parameters of the same format (a :class:`~lowbit.nn.QuantizedLinear`), so
saving, loading, export and kernels are unchanged. The block's output MSE on every calibration window is measured
before and after; a tuning that did not lower it is undone.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import BlockTuneConfig
from ..errors import ConfigError
from ..formats import Format, IntFormat, QuantizedWeight, TableFormat, group_layout
from ..nn import QuantizedLinear, scalar_spec

log = logging.getLogger(__name__)

__all__ = ["TunableLinear", "check_tunable_format", "tune_block", "block_mse"]

#: OmniQuant's initial clipping logit: sigmoid(4) = 0.982 of the range; here the strength is divided by it, so
#: the tuning starts at the solver's range exactly and the logit moves at OmniQuant's pace
LWC_INIT = 4.0
#: smallest positive fp16 value (subnormal): a table scale never reaches 0
_MIN_SCALE = 2.0 ** -24


def check_tunable_format(fmt: Format) -> None:
    """ConfigError unless ``fmt`` is a scalar format block tuning handles: ``int`` (sym or asym), or a table
    format (``fp``, ``nf``, one scale or two) whose parameters are plain per-group fp16 scales."""
    if isinstance(fmt, IntFormat):
        return
    if isinstance(fmt, TableFormat) and all(ps.kind == "fp16" and ps.span == 1 for ps in fmt.param_specs().values()):
        return
    raise ConfigError(f"--block-tune tunes the int, fp and nf formats; {fmt.spec()['format']} "
                      f"({type(fmt).__name__}) is not one of them: drop --block-tune or choose --format int/fp/nf")


class _RoundSTE(torch.autograd.Function):
    """Forward: ``round(x)``; backward: the gradient unchanged. A Function, so the forward is exactly round(x)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _LevelSTE(torch.autograd.Function):
    """Forward: the table format's nearest level of each element; backward: the gradient unchanged."""

    @staticmethod
    def forward(ctx, x, fmt):
        return fmt.grid.lut(x.device)[fmt.grid.nearest(x)]

    @staticmethod
    def backward(ctx, g):
        return g, None


class _Fp16STE(torch.autograd.Function):
    """Forward: the value rounded to fp16 (as the checkpoint stores it); backward: unchanged."""

    @staticmethod
    def forward(ctx, x):
        return x.to(torch.float16).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


class TunableLinear(nn.Module):
    """A scalar-format linear whose quantizer (and in ``ap`` mode its weight) trains, straight-through.

    ``weight``: the float ``(out, in)`` weight the solver started from (any domain: elements whose rounding
    disagrees with the solver's codes take the solver's value). ``qw``: the solver's result. Grouped tensors are
    ``(out, G, gs)`` and per-group parameters ``(out, G, 1)``, as :mod:`lowbit.formats` lays them out.
    """

    def __init__(self, weight: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None, mode: str):
        super().__init__()
        fmt = qw.fmt
        check_tunable_format(fmt)
        self.fmt, self.mode = fmt, mode
        self.out_features, self.in_features = qw.codes.shape
        self.lay = group_layout(self.in_features, fmt.group_size)
        dev = qw.codes.device
        p0 = {k: v.detach().float().unsqueeze(-1).to(dev) for k, v in qw.params.items()}   # (out, G, 1)
        codes = self.lay.to_groups(qw.codes.to(dev))                                        # (out, G, gs)
        w = self.lay.to_groups(weight.detach().float().to(dev))
        dq = fmt.dequantize(codes, p0)
        latent = torch.where(fmt.quantize(w, p0) == codes, w, dq)
        #: whether the layer starts at the solver's codes exactly (tune_block leaves a layer that does not alone)
        self.exact = bool(torch.equal(fmt.quantize(latent, p0), codes))
        self.latent = nn.Parameter(latent, requires_grad=mode == "ap")
        self.base = nn.ParameterDict({k: nn.Parameter(v.clone(), requires_grad=mode in ("lwc+scale", "ap"))
                                      for k, v in p0.items()})
        n_strengths = 0 if mode == "ap" else len(p0)   # int: upper and lower bound (one if sym); table: per scale
        g = torch.full_like(next(iter(p0.values())), LWC_INIT)
        self.strength = nn.ParameterList([nn.Parameter(g.clone()) for _ in range(n_strengths)])
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def _factors(self) -> list[torch.Tensor]:
        """Clipping strengths, exactly 1 at the start (``sigmoid(g) / sigmoid(g0)`` with ``g == g0``)."""
        ref = torch.sigmoid(torch.tensor(LWC_INIT))
        return [torch.sigmoid(g) / ref.to(g.device) for g in self.strength]

    def params(self) -> dict[str, torch.Tensor]:
        """Per-group parameters ``(out, G, 1)`` as they will be stored (fp16 scales, integer zero points)."""
        fmt, b, f = self.fmt, self.base, self._factors()
        if isinstance(fmt, IntFormat) and fmt.sym:
            s = _Fp16STE.apply(b["scale"] * f[0] if f else b["scale"])
            return {"scale": torch.where(s == 0, torch.full_like(s, 2.0 ** -14), s)}
        if isinstance(fmt, IntFormat):
            maxq = float(fmt.maxq)
            z0 = _RoundSTE.apply(b["zero"]).clamp(0, maxq)
            hi, lo = b["scale"] * (maxq - z0), -b["scale"] * z0      # the solver's range, exactly
            if f:
                hi, lo = hi * f[0], lo * f[1]
            s = _Fp16STE.apply(((hi - lo) / maxq).clamp_min(1e-8)).clamp_min(1e-8)
            return {"scale": s, "zero": _RoundSTE.apply(-lo / s).clamp(0, maxq)}
        out = {}
        for i, (k, v) in enumerate(b.items()):   # a table format's scales: one, or positive then negative
            out[k] = _Fp16STE.apply(v * f[i] if f else v).clamp_min(_MIN_SCALE)
        return out

    def grouped_weight(self) -> torch.Tensor:
        """The dequantized weight ``(out, G, gs)`` under the current parameters, straight-through."""
        p, w, fmt = self.params(), self.latent, self.fmt
        if isinstance(fmt, IntFormat):
            z = p["zero"] if "zero" in p else torch.full_like(p["scale"], float(1 << (fmt.bits - 1)))
            q = (_RoundSTE.apply(w / p["scale"]) + z).clamp(0, fmt.maxq)
            return (q - z) * p["scale"]
        def scales(x):   # the table format's per-element scale: by the sign of the weight, then of the level
            return p["scale"] if fmt.sym else torch.where(x > 0, p["scale_pos"], p["scale_neg"])
        lvl = _LevelSTE.apply(w / scales(w), fmt)
        return lvl * scales(lvl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.lay.from_groups(self.grouped_weight())
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), b)

    @torch.no_grad()
    def to_quantized(self) -> QuantizedLinear:
        """The packed linear this layer computes with: codes and parameters of the same format."""
        p = {k: v.detach() for k, v in self.params().items()}
        codes = self.lay.from_groups(self.fmt.quantize(self.latent.detach(), p))
        qw = QuantizedWeight(self.fmt, codes, {k: v.squeeze(-1) for k, v in p.items()})
        spec = scalar_spec(self.fmt, self.out_features, self.in_features)
        return QuantizedLinear.from_quantized(qw, spec, self.bias).to(self.latent.device)

    def param_groups(self, cfg: BlockTuneConfig) -> list[dict]:
        """Adam parameter groups of what trains in this mode, with their step sizes."""
        groups = [{"params": [g for g in self.strength if g.requires_grad], "lr": cfg.block_tune_lr},
                  {"params": [v for v in self.base.values() if v.requires_grad], "lr": cfg.block_tune_scale_lr},
                  {"params": [self.latent] if self.latent.requires_grad else [], "lr": cfg.block_tune_weight_lr}]
        return [g for g in groups if g["params"]]


def _block_out(block, x, kwargs, device):
    from .engine import batch_kwargs

    y = block(x.to(device), **batch_kwargs(kwargs, x.shape[0]))
    return (y[0] if isinstance(y, tuple) else y).float()


@torch.no_grad()
def block_mse(block: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: dict,
              device) -> float:
    """Mean squared difference between ``block``'s outputs and ``targets`` over every calibration window."""
    total, n = 0.0, 0
    for x, y in zip(inputs, targets):
        d = _block_out(block, x, kwargs, device) - y.to(device).float()
        total += float((d * d).sum())
        n += d.numel()
    return total / max(n, 1)


def _scalar_linears(block: nn.Module, names, method_name: str) -> dict[str, QuantizedLinear]:
    from ..models.arch import get_module

    out = {}
    for name in names:
        m = get_module(block, name)
        if not isinstance(m, QuantizedLinear) or m.spec["codec"] != "scalar":
            what = m.spec["codec"] if isinstance(m, QuantizedLinear) else type(m).__name__
            raise ConfigError(f"--block-tune tunes scalar-format layers; --method {method_name} stores {name} as "
                              f"{what}: drop --block-tune or choose rtn, gptq or awq")
        out[name] = m
    return out


def tune_block(block: nn.Module, index: int, floats: dict[str, torch.Tensor], inputs: list[torch.Tensor],
               targets: list[torch.Tensor], kwargs: dict, device, cfg: BlockTuneConfig, method_name: str = "",
               progress: bool = True) -> dict:
    """Tune the quantized linears named in ``floats`` (``{name: the float weight the solver quantized}``) of
    ``block`` so its outputs on ``inputs`` approach ``targets`` (per batch, the float block's outputs); keep the
    result only if it lowers the block's output MSE on every window. Returns ``{block, mse_before, mse_after,
    kept}`` (``kept``: ``tuned`` or ``solver``).

    Adam, ``block_tune_epochs`` passes over the windows in a seeded order (the block index), ``block_tune_batch``
    windows per step (at most one engine batch: the call kwargs were captured for that size), step sizes
    annealed along a cosine to 1/20 of their value (EfficientQAT's schedule).
    """
    from ..models.arch import set_module

    solver = _scalar_linears(block, floats, method_name)
    before = block_mse(block, inputs, targets, kwargs, device)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    tunable = {}
    for name, q in solver.items():
        qw = q.codec.to_quantized_weight(q.packed_buffers(), q.spec)
        t = TunableLinear(floats[name], qw, q.bias, cfg.block_tune).to(device)
        if not t.exact:   # not expected (tests cover every format); the layer then keeps the solver's result
            log.warning("block %d: %s cannot start from the solver's codes exactly; left as the solver made it",
                        index, name)
            continue
        tunable[name] = t
        set_module(block, name, t)
    groups = [g for t in tunable.values() for g in t.param_groups(cfg)]
    xs, ys = torch.cat(inputs), torch.cat(targets)   # (windows, T, hidden), on the offload device
    n, bw = xs.shape[0], cfg.block_tune_batch
    steps_per_epoch = -(-n // bw)
    total = cfg.block_tune_epochs * steps_per_epoch
    try:
        if groups:
            opt = torch.optim.Adam(groups)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda t: 1 / 20 + (1 - 1 / 20) * 0.5 * (1 + math.cos(math.pi * t / total)))
            gen = torch.Generator().manual_seed(index)
            bar = tqdm(total=total, desc=f"block {index} {cfg.block_tune}", disable=not progress, leave=False)
            with torch.enable_grad():
                for _ in range(cfg.block_tune_epochs):
                    order = torch.randperm(n, generator=gen)
                    for s in range(0, n, bw):
                        sel = order[s : s + bw]
                        loss = F.mse_loss(_block_out(block, xs[sel], kwargs, device), ys[sel].to(device).float())
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        sched.step()
                        bar.set_postfix(loss=f"{loss.item():.3g}", refresh=False)
                        bar.update()
            bar.close()
        for name, t in tunable.items():
            set_module(block, name, t.to_quantized())
        after = block_mse(block, inputs, targets, kwargs, device)
        kept = "tuned" if after < before else "solver"
        if kept == "solver":
            for name, q in solver.items():
                set_module(block, name, q)
    except BaseException:
        for name, q in solver.items():
            set_module(block, name, q)
        raise
    finally:
        for p in frozen:
            p.requires_grad_(True)
    log.info("block %d: %s output MSE %.6g -> %.6g (kept the %s result)", index, cfg.block_tune, before, after,
             "tuned" if kept == "tuned" else "solver's")
    return {"block": index, "mse_before": before, "mse_after": after, "kept": kept}
