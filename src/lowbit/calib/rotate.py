"""Rotating the residual stream (QuaRot-style, fused): a function-preserving rewrite of the float model applied
before any method quantizes it, so every solver (RTN, GPTQ, AWQ, ...) can use it unchanged.

With an orthogonal ``Q`` (hidden x hidden, :func:`lowbit.calib.hadamard.random_hadamard`) the model is
rewritten to carry ``h Q`` wherever it carried the residual stream ``h``:

1. every norm's gain moves into the linears it feeds (:func:`lowbit.calib.fold.fold_norm_gain`), so each norm
   computes only ``x / rms(x)``, which commutes with ``Q`` (``rms(x Q) = rms(x)``);
2. the embedding becomes ``E Q``; each linear that reads a norm's output (q/k/v, gate/up, the head) gets
   ``W Q`` (``(x Q)(W Q)^T = x W^T``); each linear that writes into the stream (o_proj, down_proj) gets
   ``Q^T W`` and its bias ``b Q``.

The result is an ordinary Hugging Face model with plain weights: exporters, kernels and checkpoints need nothing
new, and its float logits equal the original's up to rounding. Its weights have no outlier columns left
(a Hadamard matrix spreads each column over all), which is what helps low-bit rounding.

A head tied to the embedding is untied: the head becomes ``W diag(g) Q`` (``g`` the final norm's gain) and the
embedding ``E Q``, which differ unless ``g`` is constant. Refused: blocks whose norms subtract the mean
(LayerNorm: OPT), and Gemma-2/3, whose extra norms sit on each branch before the residual add: their diagonal
gain would have to act in the unrotated basis, which no plain weight can express.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..models.arch import ArchSpec, arch_for, get_module, untie_word_embeddings
from .fold import fold_norm_gain
from .hadamard import random_hadamard

__all__ = ["check_rotatable", "rotate_model"]


def _reads_writes(arch: ArchSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Block linears that read the residual stream (through a norm) and those that write into it."""
    reads = tuple(n for g in arch.groups if g.prev is not None and g.prev_kind == "norm" for n in g.linears)
    return reads, tuple(n for n in arch.linears if n not in reads)


def _norms(model: nn.Module, arch: ArchSpec) -> list[tuple[str, nn.Module]]:
    names = [f"{arch.blocks}.{i}.{g.prev}" for i in range(len(get_module(model, arch.blocks)))
             for g in arch.groups if g.prev is not None and g.prev_kind == "norm"]
    return [(n, get_module(model, n)) for n in names + [arch.final_norm]]


def check_rotatable(model: nn.Module, arch: ArchSpec | None = None) -> None:
    """UnsupportedModelError, saying why, when the residual stream of ``model`` cannot be rotated exactly."""
    arch = arch or arch_for(model)
    if arch.post_norms is not None:
        raise UnsupportedModelError(
            f"--rotate is not supported for {arch.name} ({model.config.model_type}): its "
            f"{' and '.join(arch.post_norms)} normalise each branch before the residual add, and their per-channel "
            "gain would have to act before the rotation; no plain weight can express that, so the rotated model "
            "would not compute the same function. Quantize it without --rotate.")
    if not arch.lean_decode or arch.final_norm is None:
        raise UnsupportedModelError(
            f"--rotate needs pre-norm blocks with RMSNorm; {arch.name} ({model.config.model_type}) uses LayerNorm, "
            "which subtracts the mean and so does not commute with a rotation. Quantize it without --rotate.")
    for name, norm in _norms(model, arch):
        if isinstance(norm, nn.LayerNorm) or getattr(norm, "bias", None) is not None:
            raise UnsupportedModelError(f"--rotate needs bias-free RMSNorms; {name} is a {type(norm).__name__}")
    hidden = get_module(model, arch.embed).weight.shape[1]
    reads, writes = _reads_writes(arch)
    block = get_module(model, arch.blocks)[0]
    for name in reads + writes:
        w = get_module(block, name).weight
        if (w.shape[1] if name in reads else w.shape[0]) != hidden:
            raise UnsupportedModelError(f"--rotate: {arch.blocks}.0.{name} {tuple(w.shape)} does not "
                                        f"{'read' if name in reads else 'write'} the {hidden}-wide residual stream")


def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    p.data = value.to(p.dtype)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> dict:
    """Rotate ``model``'s residual stream in place by ``random_hadamard(hidden, seed)``; returns what was done
    (``{"rotate": "hadamard", "seed", "hidden", "untied_embeddings"}``) for the checkpoint's record.

    Products are taken in float64 and stored in each weight's dtype. UnsupportedModelError for an architecture
    that cannot be rotated exactly (:func:`check_rotatable`).
    """
    arch = arch_for(model)
    check_rotatable(model, arch)
    emb, head = get_module(model, arch.embed), get_module(model, arch.head)
    q = random_hadamard(emb.weight.shape[1], seed)                    # (hidden, hidden), orthogonal
    tied = untie_word_embeddings(model)
    blocks = get_module(model, arch.blocks)
    reads, writes = _reads_writes(arch)
    for block in blocks:
        for g in arch.groups:
            if g.prev is not None and g.prev_kind == "norm":
                fold_norm_gain(get_module(block, g.prev), [get_module(block, n) for n in g.linears], arch.norm_offset)
    fold_norm_gain(get_module(model, arch.final_norm), [head], arch.norm_offset)

    _set(emb.weight, emb.weight.double() @ q)                         # (vocab, hidden): rows are stream vectors
    _set(head.weight, head.weight.double() @ q)
    for block in blocks:
        for name in reads:
            lin = get_module(block, name)
            _set(lin.weight, lin.weight.double() @ q)                 # (out, hidden)
        for name in writes:
            lin = get_module(block, name)
            _set(lin.weight, q.T @ lin.weight.double())               # (hidden, in)
            if lin.bias is not None:
                _set(lin.bias, lin.bias.double() @ q)
    return {"rotate": "hadamard", "seed": seed, "hidden": q.shape[0], "untied_embeddings": tied}
