"""Per-tensor sensitivity: the damage each candidate format does to each tensor, for size budgets (docs/mixed.md).

The damage of format F on a linear W is its output error on the calibration tokens, RTN being the quantizer:

    damage = mean over tokens of ||(W - Q_F(W)) x||^2 = tr(D H Dᵀ) / 2,   D = W - Q_F(W)

with H = 2 XᵀX / n, the Hessian the engine collects per input group (q/k/v share one). The embedding's input is
one-hot, so its damage is the token-weighted mean of ||E[t] - Q_F(E)[t]||^2, tokens counted add-one (a row the
calibration text never uses still counts a little). The head is a linear whose inputs are hooked on a forward of
the first ``head_windows`` windows. Each block sees the float model's hidden states: a score is the damage of one
tensor alone, so scores add up across tensors only as an approximation (the allocator's assumption).

``energy`` is the same mean of ||W x||^2 (D = W), the scale a relative damage divides by.

Scores are cached in ``$LOWBIT_CACHE/sensitivity/MODEL-CALIB.json``, keyed by the model's fingerprint (its config and
weights, as :func:`~lowbit.calib.engine.model_fingerprint` hashes them, after any rotation), the calibration
windows' sha256 and the candidate's tag, so another budget over the same candidates costs no pass, and new
candidates cost a pass for those alone.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..cache import cache_dir
from ..formats import quantize_rtn
from ..models.arch import ArchSpec, get_module
from ..utils import atomic_write_text
from .engine import GroupStats, _to, capture_inputs, collect_stats, model_fingerprint

log = logging.getLogger(__name__)

__all__ = ["SCORES_VERSION", "linear_damage", "embedding_damage", "sensitivity_pass", "sensitivity_scores",
           "scores_path"]

#: bump when the definition of a score changes, so older cache files are recomputed
SCORES_VERSION = 1
_HESSIAN = frozenset({"hessian"})


def _quad(d: torch.Tensor, h: torch.Tensor) -> float:
    """tr(D H Dᵀ) / 2 for ``d`` ``(out, in)``, ``h`` ``(in, in)``: the mean squared output of ``d`` (H = 2XᵀX/n)."""
    return float(((d @ h) * d).sum()) / 2


def linear_damage(weight: torch.Tensor, hessian: torch.Tensor, fmts: dict) -> tuple[dict[str, float], float]:
    """``({tag: damage}, energy)`` of ``weight`` ``(out, in)`` under each ``{tag: Format}``, given its input
    Hessian ``(in, in)``."""
    w = weight.detach().float()
    h = hessian.to(w.device, torch.float32)
    return {tag: _quad(w - quantize_rtn(w, f).dequantize(), h) for tag, f in fmts.items()}, _quad(w, h)


def embedding_damage(weight: torch.Tensor, counts: torch.Tensor, fmts: dict) -> tuple[dict[str, float], float]:
    """``({tag: damage}, energy)`` of an embedding ``(vocab, dim)`` whose rows are used ``counts`` ``(vocab,)`` times."""
    w = weight.detach().float()
    p = (counts.float() + 1) / (counts.sum() + counts.numel())   # add-one: every row counts a little

    def mean_sq(d: torch.Tensor) -> float:
        return float((p.to(d.device) * (d * d).sum(1)).sum())

    return {tag: mean_sq(w - quantize_rtn(w, f).dequantize()) for tag, f in fmts.items()}, mean_sq(w)


@torch.no_grad()
def sensitivity_pass(model: nn.Module, arch: ArchSpec, fmts: dict, calib_ids: torch.Tensor, *,
                     embed_head: bool = False, batch_size: int = 8, device=None, offload="cpu",
                     progress: bool = True, head_windows: int = 16) -> dict:
    """``{"damage": {tensor: {tag: float}}, "energy": {tensor: float}}`` of every decoder-block linear (by its path,
    ``model.layers.0.self_attn.q_proj``) and, with ``embed_head``, the embedding and head, under each
    ``{tag: Format}``. The model is left as it was (float)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    offload = torch.device(offload)
    damage: dict[str, dict[str, float]] = {}
    energy: dict[str, float] = {}
    blocks = get_module(model, arch.blocks)
    inputs, block_kwargs = capture_inputs(model, arch, calib_ids, batch_size, offload)
    for i in tqdm(range(len(blocks)), desc="sensitivity", disable=not progress):
        block = blocks[i].to(device)
        outputs: list[torch.Tensor] = []
        stats = collect_stats(block, arch.groups, inputs, _to(block_kwargs[i], device), _HESSIAN, device, offload,
                              outputs)
        for g in arch.groups:
            for name in g.linears:
                path = f"{arch.blocks}.{i}.{name}"
                damage[path], energy[path] = linear_damage(get_module(block, name).weight, stats[g].hessian, fmts)
        inputs = outputs   # the float block's outputs: each tensor is scored alone
        blocks[i] = block.to(offload) if device != offload else block
    if embed_head:
        emb = get_module(model, arch.embed)
        counts = torch.bincount(calib_ids.reshape(-1), minlength=emb.weight.shape[0])
        damage[arch.embed], energy[arch.embed] = embedding_damage(emb.weight, counts, fmts)
        head = get_module(model, arch.head)
        st = GroupStats()
        hook = head.register_forward_pre_hook(lambda m, a: st.add(a[0], _HESSIAN))
        dev = next(model.parameters()).device
        try:
            for s in range(0, min(head_windows, calib_ids.shape[0]), batch_size):
                model(input_ids=calib_ids[s: min(s + batch_size, head_windows)].to(dev), use_cache=False)
        finally:
            hook.remove()
        damage[arch.head], energy[arch.head] = linear_damage(head.weight, st.hessian, fmts)
    return {"damage": damage, "energy": energy}


def scores_path(model_key: str, calib_key: str) -> Path:
    """The cache file of one model and one set of calibration windows."""
    return cache_dir() / "sensitivity" / f"{model_key}-{calib_key}.json"


def sensitivity_scores(model: nn.Module, arch: ArchSpec, fmts: dict, calib_ids: torch.Tensor, *,
                       embed_head: bool = False, cache: bool = True, **pass_kw) -> dict:
    """:func:`sensitivity_pass`'s scores for the ``{tag: Format}`` candidates, read from the cache where it holds
    them (a pass runs only for the tags it lacks) and written back; adds ``"path"`` (the cache file, or None)."""
    model_key = model_fingerprint(model)
    calib_key = hashlib.sha256(calib_ids.cpu().numpy().tobytes()).hexdigest()[:16]
    path = scores_path(model_key, calib_key) if cache else None
    data = {"version": SCORES_VERSION, "model": model_key, "calib": calib_key, "damage": {}, "energy": {}}
    if path is not None and path.is_file():
        try:
            old = json.loads(path.read_text())
            if old.get("version") == SCORES_VERSION and old.get("model") == model_key and old.get("calib") == calib_key:
                data = old
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable sensitivity cache %s (%s)", path, e)
    have = data["damage"]
    if not have or (embed_head and arch.embed not in have):
        todo = fmts   # a first pass, or one that adds the embedding and head: every candidate
    else:
        todo = {tag: f for tag, f in fmts.items() if any(tag not in s for s in have.values())}
    if todo:
        log.info("sensitivity pass for %s", ", ".join(todo))
        new = sensitivity_pass(model, arch, todo, calib_ids, embed_head=embed_head, **pass_kw)
        for name, scores in new["damage"].items():
            data["damage"].setdefault(name, {}).update(scores)
        data["energy"].update(new["energy"])
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))
    else:
        log.info("sensitivity scores from %s", path)
    return {**data, "path": str(path) if path is not None else None}
