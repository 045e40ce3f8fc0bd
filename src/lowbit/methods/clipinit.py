"""RTN + asymmetric clipping (BitDistiller's clipping init) as a calibrated method, and the
``bitdistiller`` entry that names distilled checkpoints.

``clip``: for every linear except q/k (their error is hard to see on the
outputs, as in the reference), the float weight is clamped per group to the
bounds found by :func:`lowbit.formats.clip.clip_search` on the group's
calibration inputs, then rounded to nearest with the format. Used alone it is
a PTQ method ("RTN+clip"); ``lowbit distill --init clip`` starts training
from the clamped weights.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..formats import quantize_rtn
from ..formats.clip import apply_clip, clip_search
from ..models.arch import ArchSpec, get_module
from .registry import register_method


@dataclass(frozen=True)
class ClipConfig:
    clip_grid: int = 20           # grid resolution: shrink steps of 1/clip_grid (flag shared with AWQ)
    clip_tokens: int = 512        # calibration tokens for the search, evenly strided (flag shared with AWQ)
    clip_max_shrink: float = 0.5  # each end shrinks by at most this fraction
    clip_qk: bool = False         # also clip q/k projections (the reference skips them)


def clip_block(data, arch: ArchSpec, stats, fmt, n_grid: int, tokens: int, max_shrink: float = 0.5,
               sym: bool = False, skip_qk: bool = True) -> None:
    """Clamp each linear's float weight to its searched per-group bounds (:func:`clip_search` on ``tokens`` of
    the group's calibration inputs), in place; q/k are left as they are with ``skip_qk``."""
    for group in arch.groups:
        x = stats[group].token_sample(tokens).to(data.device)   # (<= tokens, in)
        for name in group.linears:
            if skip_qk and name in arch.qk:
                continue
            lin = get_module(data.block, name)
            w = lin.weight.data.float()
            lo, hi = clip_search(w, x, fmt, n_grid, max_shrink, sym=sym)
            lin.weight.data = apply_clip(w, lo, hi, fmt.for_width(w.shape[1]).group_size).to(lin.weight.dtype)


def clip_prepare_block(data, arch: ArchSpec, stats, fmt, cfg: ClipConfig) -> None:
    clip_block(data, arch, stats, fmt, cfg.clip_grid, cfg.clip_tokens, cfg.clip_max_shrink, skip_qk=not cfg.clip_qk)


@register_method("clip", config=ClipConfig, needs={"inputs"}, prepare_block=clip_prepare_block)
def clip(weight, stats, fmt, cfg: ClipConfig):
    """RTN after BitDistiller's asymmetric (min/max decoupled) output-aware clipping search."""
    return quantize_rtn(weight, fmt)


@dataclass(frozen=True)
class _NoConfig:
    pass


@register_method("bitdistiller", config=_NoConfig)
def bitdistiller(weight, stats, fmt, cfg):
    """Quantization-aware self-distillation: a training run, see ``lowbit distill``."""
    raise ConfigError("bitdistiller trains the whole model; run `lowbit distill MODEL ...` instead of quantize")
