"""Quantize the first N blocks of a zoo model with a profile, for speed A/B runs; or compare two saved results.

    # one side: first 2 blocks, GPTQ int4 g128, 128 x 512 wiki-train (seed 0); prints wall time, load, peak RSS
    # and the --profile stage table, saves the quantized state dict
    OMP_NUM_THREADS=2 python scripts/quantize_profile.py gptq --blocks 2 --save /tmp/sd_new.pt --profile /tmp/p.json
    # base side: the same with PYTHONPATH pointing at the other checkout's src/, then
    python scripts/quantize_profile.py --compare /tmp/sd_base.pt /tmp/sd_new.pt

Method options: ``--opt key=value`` (default ``bits=4 group_size=128``; VPTQ: ``vptq_preset=2.3``).
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import torch


def compare(a_path: str, b_path: str) -> None:
    a, b = torch.load(a_path), torch.load(b_path)
    if a.keys() != b.keys():
        raise SystemExit(f"the state dicts hold different tensors: {sorted(set(a) ^ set(b))[:10]}")
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    print(f"{len(a)} tensors, {len(diff)} differ", diff[:10])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", nargs="?")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", type=int, default=None, help="keep only the first N decoder blocks")
    ap.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="method/format option")
    ap.add_argument("--save", help="write the quantized state dict here (for --compare)")
    ap.add_argument("--profile", help="write the profile JSON here (and its .md beside it)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two saved state dicts tensor by tensor")
    a = ap.parse_args()
    if a.compare:
        return compare(*a.compare)
    if not a.method:
        ap.error("give a method, or --compare A B")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from lowbit.api import calibration_windows, load_model
    from lowbit.calib.profile import Profile
    from lowbit.quantize import quantize_model, recipe_from_options

    opts = {"vptq_preset": 2.3} if a.method == "vptq" else {"bits": 4, "group_size": 128}
    for kv in a.opt:
        k, v = kv.split("=", 1)
        opts[k] = int(v) if v.lstrip("-").isdigit() else float(v) if v.replace(".", "", 1).isdigit() else v
    recipe = recipe_from_options(a.method, opts)
    model, tok = load_model(a.model)
    if a.blocks is not None:
        model.model.layers = model.model.layers[:a.blocks]
    ids = calibration_windows(recipe, tok, model)
    p = Profile()
    t = time.perf_counter()
    quantize_model(model, recipe, ids, progress=False, profile=p)
    wall = time.perf_counter() - t
    print(f"{a.method} {a.model} blocks {a.blocks or 'all'}: wall {wall:.1f} s, load {os.getloadavg()}, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    print(p.markdown())
    if a.save:
        torch.save(dict(model.state_dict()), a.save)
    if a.profile:
        p.meta.update({"model": a.model, "blocks": a.blocks, "wall_s": round(wall, 1), "loadavg": os.getloadavg()})
        p.write(a.profile)


if __name__ == "__main__":
    main()
