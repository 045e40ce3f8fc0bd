"""GPTQ with the first position of each calibration window weighted by W in the Hessian, and its perplexity.

The diagnosis in docs/methods.md ("Why GPTQ int4 g128 loses to RTN on SmolLM2") found GPTQ moving output
error onto the first position of each window (the attention-sink token), whose inputs hold only ~0.1-0.2%
of tr(H) while the model's attention leans on them. If that is the cause, weighting those rows up in
H = 2 X^T X / n must close the perplexity gap to RTN; weighting them down (W=0) must widen it. Each run
quantizes SmolLM2-135M with the `lowbit run` defaults (int4 g128 asymmetric, 128 x 512 wiki-train windows,
seed 0, damp 0.01) and scores wiki over 40 x 512 windows (protocol v2). Writes one JSON per run.

    python scripts/gptq_sink_weight.py --weight 1 10 100 0 --out docs/results/diag/gptq_sink_weight.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import lowbit.api as api
from lowbit.calib import engine
from lowbit.config import EvalConfig
from lowbit.quantize import recipe_from_options
from lowbit.utils import atomic_write_text


def weighted_add(weight: float):
    """GroupStats.add with each window's first position scaled by sqrt(weight) (so its rows count weight x)."""
    base = engine.GroupStats.add

    def add(self, x, needs):
        if x.dim() == 3 and weight != 1.0:
            x = x.detach().clone()
            x[:, 0] *= weight ** 0.5
        return base(self, x, needs)

    return base, add


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--weight", type=float, nargs="+", default=[1.0, 10.0, 100.0, 0.0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    recipe = recipe_from_options("gptq", {"bits": args.bits, "group_size": args.group_size})
    rows = []
    for w in args.weight:
        base, add = weighted_add(w)
        engine.GroupStats.add = add
        try:
            t0 = time.perf_counter()
            res = api.run(args.model, recipe, EvalConfig(), device="cpu", progress=False)
        finally:
            engine.GroupStats.add = base
        rows.append({"first_position_weight": w, "ppl_wiki": res["ppl"]["wiki"], "seconds": round(time.perf_counter() - t0),
                     "recipe": recipe.to_dict(), "protocol": res["protocol"]["wiki"], "threads": torch.get_num_threads()})
        print(json.dumps(rows[-1]["first_position_weight"]), rows[-1]["ppl_wiki"], flush=True)
        atomic_write_text(args.out, json.dumps({"model": args.model, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
