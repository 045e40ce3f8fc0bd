"""Add itemised block bits (``bpw_detail.blocks_items``) to results recorded before they were recorded.

A run's stored buffers follow from its settings and the model's layer shapes
alone (the codecs' ``buffer_shapes``), so the items can be recomputed without
the checkpoint. Handled: weight-only scalar runs (every linear in one group-wise
format) and ``vptq`` runs (presets resolved per layer, as the method does).
A result is updated only when its recomputed items sum exactly to the
``blocks_bits`` it recorded; anything else is reported and left alone.

    python scripts/backfill_bpw_items.py docs/results            # dry run
    python scripts/backfill_bpw_items.py docs/results --write
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowbit.config import FormatConfig
from lowbit.methods.vptq import VPTQConfig, layer_config, vq_spec
from lowbit.models.arch import arch_for, get_module
from lowbit.models.loading import load_model
from lowbit.nn.bpw import codec_bits
from lowbit.nn.qlinear import scalar_spec
from lowbit.utils import atomic_write_text

SCALAR_METHODS = {"rtn", "clip", "gptq", "awq", "bitdistiller"}


def block_shapes(model_name: str, cache: dict) -> list[tuple[int, int]]:
    """``(out, in)`` of every block linear of a model, in the order the bpw report visits them."""
    if model_name not in cache:
        model, _ = load_model(model_name)
        arch = arch_for(model)
        cache[model_name] = [tuple(get_module(block, name).weight.shape)
                             for block in get_module(model, arch.blocks) for name in arch.linears]
    return cache[model_name]


def items_for(res: dict, cache: dict) -> dict[str, int] | None:
    """Recomputed ``{buffer: bits}`` over the blocks, or None for a method this cannot rebuild.

    The model is loaded (once per name, into ``cache``) only for the runs that can be rebuilt.
    """
    cfg = res.get("config") or {}
    if res["method"] == "vptq":
        base = VPTQConfig(**cfg["method_config"])
        specs = [("vq", vq_spec(layer_config(base, o, i), o, i)) for o, i in block_shapes(res["model"], cache)]
    elif res["method"] in SCALAR_METHODS and cfg.get("fmt"):
        fmt = FormatConfig(**cfg["fmt"]).make()
        specs = [("scalar", scalar_spec(fmt, o, i)) for o, i in block_shapes(res["model"], cache)]
    else:
        return None
    items: dict[str, int] = {}
    for codec, spec in specs:
        for name, bits in codec_bits(codec, spec).items():
            items[name] = items.get(name, 0) + bits
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results_dir", type=Path)
    ap.add_argument("--write", action="store_true", help="update the JSON files (default: report only)")
    args = ap.parse_args()
    cache: dict = {}
    for path in sorted(args.results_dir.rglob("*.json")):
        res = json.loads(path.read_text())
        if not isinstance(res, dict) or "method" not in res or "bpw_detail" not in res:
            continue
        detail = res["bpw_detail"]
        if "blocks_items" in detail:
            continue
        items = items_for(res, cache)
        if items is None:
            print(f"skip  {path.name}: method {res['method']} not rebuilt")
            continue
        if sum(items.values()) != detail["blocks_bits"]:
            print(f"MISMATCH {path.name}: recomputed {sum(items.values())} bits, recorded {detail['blocks_bits']}")
            continue
        print(f"ok    {path.name}: " + ", ".join(f"{k} {v / detail['blocks_weights']:.3f}" for k, v in items.items()))
        if args.write:
            detail["blocks_items"] = items
            atomic_write_text(path, json.dumps(res, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
