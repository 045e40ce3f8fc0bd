"""SmoothQuant+: weight-only quantization after smoothing activation outliers with ONE smoothing strength for the
whole model (Pan et al., 2023, arXiv:2312.03788).

1. ``max|X_j|`` per input channel of every input group, on the float model over all calibration windows (each
   block fed the float outputs of the block before).
2. For each ``a`` on the grid ``k / alpha_grid`` (``k = 0 .. alpha_grid``): smooth every block with
   SmoothQuant's ``s_j = max|X_j|**a / max|W_j|**(1-a)`` (folded by :mod:`lowbit.calib.fold`: ``1/s`` into the
   norm or linear producing the input, ``s`` into the weights; groups with nothing to fold into stay
   unsmoothed), round every block linear with RTN in the chosen format, run the first ``alpha_windows``
   calibration windows through the whole model and take the mean squared error of its logits against the float
   model's. The paper searches one strength on the whole model's output rather than per layer, because the
   layers' weight errors add up through the network; the loss here is the logits' MSE. Float weights are
   restored after each try. The unsmoothed model's loss is measured too, for the record only.
3. The float model is smoothed with the best ``a`` (exact in real arithmetic) and quantized: with RTN (exactly
   the model the search measured), or with GPTQ (``--sqp-gptq``) through the layer-wise engine; the search
   uses RTN either way (a GPTQ pass per grid point would cost ``alpha_grid + 1`` calibrations).

``--sqp-alpha A`` (``0 <= A <= 1``) skips the search. The strength used and every grid point's loss are
recorded in the checkpoint's summary (``method_result``). The whole-model forwards of the search run where the
model is (the calibration passes on ``device``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..calib.engine import GroupStats, float_block_stats
from ..calib.fold import smooth_block
from ..errors import ConfigError
from ..formats import quantize_rtn
from ..models.arch import ArchSpec, get_module
from .gptq import GPTQConfig, gptq
from .registry import register_method

log = logging.getLogger(__name__)

__all__ = ["SmoothQuantPlusConfig", "search_alpha", "smooth_model"]


@dataclass(frozen=True)
class SmoothQuantPlusConfig:
    sqp_alpha: float = -1.0   # smoothing strength a for the whole model, in [0, 1]; < 0: search it
    alpha_grid: int = 20      # the search tries a = k / alpha_grid for k = 0 .. alpha_grid
    alpha_windows: int = 4    # calibration windows whose logits the search compares with the float model's
    sqp_gptq: bool = False    # quantize the smoothed model with GPTQ (engine Hessians) instead of RTN
    damp: float = 0.01        # fraction of mean diag(H) added to H (same flag as GPTQ)
    block_size: int = 128     # columns per lazy batch update (same flag as GPTQ)

    def __post_init__(self):
        if self.sqp_alpha > 1:
            raise ConfigError(f"--sqp-alpha must be in [0, 1] (or < 0 to search it), got {self.sqp_alpha}")
        if self.alpha_grid < 1 or self.alpha_windows < 1:
            raise ConfigError("--alpha-grid and --alpha-windows must be at least 1")


def smooth_model(model: nn.Module, arch: ArchSpec, absmax: list[dict], alpha: float) -> None:
    """Smooth every block of ``model`` in place with strength ``alpha``; ``absmax[i]``: block i's group ->
    ``max|X|`` ``(in,)`` on the float model (not changed)."""
    for block, amax in zip(get_module(model, arch.blocks), absmax):
        smooth_block(block, arch, {g: GroupStats(absmax=a) for g, a in amax.items()}, alpha)


def _round_blocks(model: nn.Module, arch: ArchSpec, fmt) -> None:
    """Every block linear's weight replaced by its RTN-dequantized value (what a QuantizedLinear computes with)."""
    for block in get_module(model, arch.blocks):
        for name in arch.linears:
            lin = get_module(block, name)
            lin.weight.data = quantize_rtn(lin.weight, fmt).dequantize().to(lin.weight.dtype)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    dev = next(model.parameters()).device
    return [model(input_ids=ids[i : i + 1].to(dev), use_cache=False).logits.float() for i in range(ids.shape[0])]


@torch.no_grad()
def search_alpha(model: nn.Module, arch: ArchSpec, absmax: list[dict], ids: torch.Tensor, fmt,
                 grid: int) -> tuple[float, dict[str, float], float]:
    """``(best a, {a: loss}, unsmoothed loss)``: the logits' MSE on windows ``ids`` ``(n, T)`` of the model
    smoothed with each ``a = k / grid`` and rounded with RTN in ``fmt``. ``model`` is left as it was."""
    blocks = get_module(model, arch.blocks)
    saved = [{k: v.clone() for k, v in b.state_dict().items()} for b in blocks]
    ref = _logits(model, ids)

    def loss(alpha: float | None) -> float:
        try:
            if alpha is not None:
                smooth_model(model, arch, absmax, alpha)
            _round_blocks(model, arch, fmt)
            out = _logits(model, ids)
            return sum(float((o - r).pow(2).mean()) for o, r in zip(out, ref)) / len(ref)
        finally:
            for b, sd in zip(blocks, saved):
                b.load_state_dict(sd)

    base = loss(None)
    losses = {}
    for k in range(grid + 1):
        a = round(k / grid, 6)
        losses[f"{a:g}"] = loss(a)
        log.info("smoothquant+: alpha %.3f: logits MSE %.5g (unsmoothed %.5g)", a, losses[f"{a:g}"], base)
    best = min(losses, key=losses.get)
    return float(best), losses, base


def _sqp_prepare_model(model, arch: ArchSpec, calib_ids, fmt, cfg: SmoothQuantPlusConfig, device) -> dict:
    stats = float_block_stats(model, arch, calib_ids, frozenset({"act_absmax"}), device=device)
    absmax = [{g: st.absmax for g, st in s.items()} for s in stats]
    result: dict = {}
    alpha = cfg.sqp_alpha
    if alpha < 0:
        alpha, losses, base = search_alpha(model, arch, absmax, calib_ids[: cfg.alpha_windows], fmt, cfg.alpha_grid)
        result = {"search_loss": "logits MSE", "search_windows": min(cfg.alpha_windows, calib_ids.shape[0]),
                  "losses": losses, "unsmoothed_loss": base}
        log.info("smoothquant+: alpha %.3f (logits MSE %.5g; unsmoothed %.5g)", alpha, losses[f"{alpha:g}"], base)
    smooth_model(model, arch, absmax, alpha)
    return {"sqp_alpha": alpha, **result}


def _layer_needs(cfg: SmoothQuantPlusConfig) -> set[str]:
    return {"hessian"} if cfg.sqp_gptq else set()


@register_method("smoothquant+", config=SmoothQuantPlusConfig, needs={"act_absmax", "hessian"},
                 prepare_model=_sqp_prepare_model, layer_needs=_layer_needs)
def smoothquant_plus(weight, stats, fmt, cfg: SmoothQuantPlusConfig):
    """SmoothQuant+: one smoothing strength searched on the whole model's output, then RTN (or GPTQ) weights."""
    if cfg.sqp_gptq:
        return gptq(weight, stats, fmt, GPTQConfig(damp=cfg.damp, block_size=cfg.block_size))
    return quantize_rtn(weight, fmt)
