"""Mixed precision under a size budget: one format per tensor, the least summed predicted damage that fits.

Items are the decoder-block linears (each takes one of the candidate formats) and, with a budget that counts every
stored tensor (``--all-in``, ``--target-mb``), the embedding and the head, each also free to stay at the storage
dtype. A tied embedding and head are one item: both kept (stored once), or each at its own choice (stored twice).
A choice costs the exact bits it stores (:func:`lowbit.nn.bpw.codec_bits` of its spec, float32 buffers at the
storage dtype); everything not chosen (norms, biases, fixed embedding or head) is a fixed cost. Its damage is the
sensitivity pass's score (:mod:`lowbit.calib.sensitivity`), by default divided by the tensor's output energy.

The solver (:func:`solve_mckp`) is a multiple-choice knapsack by dynamic programming over the bits left after every
item's cheapest choice. Costs are counted in units of ``u`` bits, rounded up, so a plan never exceeds its budget;
``u`` is the gcd of all cost steps when that keeps the table within ``max_cols`` columns (the plan is then
optimal for the predicted damage), else the span of costs over ``max_cols`` (optimal within that rounding). The
best damage within a capacity never rises with the capacity, and ``u`` does not depend on the budget, so a larger
budget never gives a larger predicted damage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import reduce

import numpy as np
import torch
from torch import nn

from .config import FormatConfig, MixConfig, StorageConfig
from .errors import ConfigError
from .models.arch import ArchSpec, get_module
from .nn import scalar_spec
from .nn.bpw import codec_bits, count_params, stored_bits

__all__ = ["Plan", "solve_mckp", "plan_budget", "format_plan", "KEEP"]

#: the choice of leaving the embedding or head at the storage dtype
KEEP = "keep"


def solve_mckp(costs: list[list[int]], damages: list[list[float]], budget: int,
               max_cols: int = 1 << 18) -> tuple[list[int], float] | None:
    """``(choice index per item, predicted damage)`` minimising the summed damage with summed cost <= ``budget``;
    None when even the cheapest choices exceed it. ``costs[i][c]``, ``damages[i][c]``: item i's choice c."""
    base = sum(min(cs) for cs in costs)
    if budget < base:
        return None
    excess = [[c - min(cs) for c in cs] for cs in costs]
    span = sum(max(es) for es in excess)
    step = reduce(math.gcd, (e for es in excess for e in es), 0) or 1
    unit = max(step, -(-span // max_cols))
    units = [[-(-e // unit) for e in es] for es in excess]
    cap = min((budget - base) // unit, sum(max(us) for us in units))
    best = np.zeros(cap + 1)                          # least damage of the items so far within k units
    picks = np.zeros((len(costs), cap + 1), np.int16)
    for i, (us, ds) in enumerate(zip(units, damages)):
        new = np.full(cap + 1, np.inf)
        for c, (w, d) in enumerate(zip(us, ds)):
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[: cap + 1 - w] + d
            better = cand < new                       # ties keep the earlier choice
            new[better] = cand[better]
            picks[i, better] = c
        best = new
    chosen, k = [], cap
    for i in range(len(costs) - 1, -1, -1):
        c = int(picks[i, k])
        chosen.append(c)
        k -= units[i][c]
    return chosen[::-1], float(best[cap])


@dataclass
class _Item:
    names: tuple[str, ...]             # tensor paths this item decides (two for a tied embedding and head)
    choices: list[tuple[str, ...]]     # a tag (or KEEP) per name
    bits: list[int]
    damage: list[float]


@dataclass
class Plan:
    """A budget's answer: a candidate tag per block linear, the embedding's and head's (None: as the recipe says,
    :data:`KEEP`: storage dtype), what it stores against the budget, and its predicted damage."""

    layers: dict[str, str]
    embed: str | None
    head: str | None
    bits: int                  # what the budget counts: block bits (blocks bpw) or every stored bit
    budget_bits: int
    damage: float
    per: int                   # the budget's divisor: block weights, parameters, or 8e6 bits per MB
    unit: str                  # "bpw" or "MB"
    target: float
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def achieved(self) -> float:
        return self.bits / self.per

    def summary(self) -> dict:
        """JSON-ready: the target, what the plan takes, its predicted damage, tensors per format."""
        return {"target": self.target, "unit": self.unit, "achieved": round(self.achieved, 6), "bits": self.bits,
                "budget_bits": self.budget_bits, "predicted_damage": self.damage, "tensors_per_format": self.counts,
                "embed": self.embed, "head": self.head}


def _single(name: str, opts: list[tuple[str, int, float]]) -> _Item:
    """The item of one tensor from its ``(tag, bits, damage)`` options."""
    return _Item((name,), [(t,) for t, _, _ in opts], [b for _, b, _ in opts], [d for _, _, d in opts])


def _tensor_bits(weight: torch.Tensor, fmt: FormatConfig, storage: str) -> int:
    """Bits ``weight`` stores at ``fmt`` (its format for this weight: a K-quant's width fallback included)."""
    f = fmt.make().for_weight(weight.detach().float())
    return sum(codec_bits("scalar", scalar_spec(f, *weight.shape), storage).values())


def _float_bits(weight: torch.Tensor, storage: str) -> int:
    return weight.numel() * torch.finfo(getattr(torch, storage)).bits


def _items(model: nn.Module, arch: ArchSpec, mix: MixConfig, scores: dict, storage: str,
           embed: FormatConfig | None, head: FormatConfig | None) -> tuple[list[_Item], int]:
    """The items to choose and the bits of everything else the budget counts."""
    fmts = mix.formats()
    dmg = scores["damage"]

    def damage(name: str, tag: str) -> float:
        if tag == KEEP:
            return 0.0
        d = dmg[name][tag]
        return d / scores["energy"][name] if mix.damage == "relative" and scores["energy"][name] > 0 else d

    def options(name: str, weight: torch.Tensor, keep: bool) -> list[tuple[str, int, float]]:
        opts = [(t, _tensor_bits(weight, f, storage), damage(name, t)) for t, f in fmts.items()]
        return opts + ([(KEEP, _float_bits(weight, storage), 0.0)] if keep else [])

    items = []
    for i, block in enumerate(get_module(model, arch.blocks)):
        for lname in arch.linears:
            path = f"{arch.blocks}.{i}.{lname}"
            items.append(_single(path, options(path, get_module(block, lname).weight, keep=False)))
    if not mix.counts_all:   # blocks bpw: the block linears' biases are the only fixed cost
        fixed = sum(_float_bits(get_module(b, n).bias, storage) for b in get_module(model, arch.blocks)
                    for n in arch.linears if getattr(get_module(b, n), "bias", None) is not None)
        return items, fixed
    emb_w, head_w = get_module(model, arch.embed).weight, get_module(model, arch.head).weight
    tied = emb_w is head_w
    fixed = (stored_bits(model, storage) - sum(_float_bits(get_module(model, it.names[0]).weight, storage)
                                               for it in items)
             - _float_bits(emb_w, storage) - (0 if tied else _float_bits(head_w, storage))
             + sum(_tensor_bits(w, f, storage) for w, f in ((emb_w, embed), (head_w, head)) if f is not None))
    free = [(n, w) for n, w, given in ((arch.embed, emb_w, embed), (arch.head, head_w, head)) if given is None]
    if tied and len(free) == 2:   # kept, both are stored once; else each is stored at its own choice
        e, h = options(arch.embed, emb_w, True), options(arch.head, head_w, True)
        pairs = [(a, b) for a in e for b in h]
        items.append(_Item((arch.embed, arch.head), [(a[0], b[0]) for a, b in pairs],
                           [a[1] if a[0] == b[0] == KEEP else a[1] + b[1] for a, b in pairs],
                           [a[2] + b[2] for a, b in pairs]))
        return items, fixed
    for name, w in free:
        items.append(_single(name, options(name, w, True)))
    return items, fixed


def plan_budget(model: nn.Module, arch: ArchSpec, mix: MixConfig, scores: dict, storage: StorageConfig,
                embed: FormatConfig | None = None, head: FormatConfig | None = None,
                n_params: int | None = None) -> Plan:
    """The plan of ``mix``'s budget for float ``model`` from the sensitivity ``scores``; ``embed``/``head``: formats
    the recipe fixes (the budget then counts them, not chooses them). ConfigError when no plan fits, naming the
    smallest target that does."""
    items, fixed = _items(model, arch, mix, scores, storage.dtype, embed, head)
    if mix.target_mb is not None:
        per, unit, target = 8_000_000, "MB", mix.target_mb
    elif mix.all_in:
        per, unit, target = n_params or count_params(model), "bpw", mix.target_bpw
    else:
        per, unit, target = sum(get_module(b, n).weight.numel() for b in get_module(model, arch.blocks)
                                for n in arch.linears), "bpw", mix.target_bpw
    budget = math.floor(target * per)
    solved = solve_mckp([it.bits for it in items], [it.damage for it in items], budget - fixed)
    if solved is None:
        least = fixed + sum(min(it.bits) for it in items)
        what = f"--target-mb {target:g}" if unit == "MB" else f"--target-bpw {target:g}{' --all-in' * mix.all_in}"
        raise ConfigError(f"{what} cannot be met: the smallest plan over the candidates "
                          f"({', '.join(mix.candidates)}) takes {math.ceil(least / per * 1e4) / 1e4:.4f} {unit}; "
                          f"ask for at least that, or add a smaller candidate format")
    chosen, damage = solved
    picked: dict[str, str] = {}
    for it, c in zip(items, chosen):
        picked.update(zip(it.names, it.choices[c]))
    bits = fixed + sum(it.bits[c] for it, c in zip(items, chosen))
    counts: dict[str, int] = {}
    for tag in picked.values():
        counts[tag] = counts.get(tag, 0) + 1
    return Plan(layers={n: t for n, t in picked.items() if n not in (arch.embed, arch.head)},
                embed=picked.get(arch.embed), head=picked.get(arch.head), bits=bits, budget_bits=budget,
                damage=damage, per=per, unit=unit, target=target, counts=dict(sorted(counts.items())))


def format_plan(plan: dict, blocks: str = "model.layers") -> str:
    """A plain-text table of a recipe's block ``layers`` (``{path: FormatConfig or its dict}``): one row per block,
    one column per linear."""
    rows: dict[str, dict[str, str]] = {}
    for path, fmt in plan.items():
        if not path.startswith(blocks + "."):
            continue   # the embedding and head: the plan's summary names them
        idx, _, name = path[len(blocks) + 1:].partition(".")
        rows.setdefault(idx, {})[name] = FormatConfig(**fmt).tag() if isinstance(fmt, dict) else fmt.tag()
    names = list(dict.fromkeys(n for r in rows.values() for n in r))
    widths = [max([len("block")] + [len(i) for i in rows])] + [
        max([len(n)] + [len(r.get(n, "-")) for r in rows.values()]) for n in names]
    lines = ["  ".join(h.ljust(w) for h, w in zip(["block", *names], widths))]
    for idx in sorted(rows, key=int):
        lines.append("  ".join(c.ljust(w) for c, w in zip([idx, *(rows[idx].get(n, "-") for n in names)], widths)))
    return "\n".join(lines)
