"""Where calibration time goes: time each phase of the layer-wise engine on one block.

Usage: python scripts/profile_calib.py [MODEL] [NSAMPLES] [BLOCK]
Prints seconds per phase (capture, statistics pass, GPTQ solve, quantized re-run) and the
projection to all blocks. Medians are not needed here: each phase runs once on a quiet machine.
"""
from __future__ import annotations

import sys
import time

import torch

from lowbit.api import load_model
from lowbit.calib.engine import capture_inputs, collect_stats, run_block
from lowbit.data.calib import sample_windows
from lowbit.formats import IntFormat
from lowbit.methods.gptq import gptq_quantize
from lowbit.models.arch import arch_for, get_module
from lowbit.nn import to_module
from lowbit.models.arch import set_module


def main(model_name="smollm2-135m", nsamples=32, index=0):
    model, tok = load_model(model_name)
    arch = arch_for(model)
    bos = tok.bos_token_id if arch.bos_per_window else None
    ids = sample_windows(tok, "wiki-train", nsamples, 512, 0, bos_id=bos)
    cpu = torch.device("cpu")
    t = {}
    t0 = time.perf_counter()
    inputs, kwargs = capture_inputs(model, arch, ids, 8, cpu)
    t["capture"] = time.perf_counter() - t0
    block = get_module(model, arch.blocks)[index]
    t0 = time.perf_counter()
    run_block(block, inputs, kwargs[index], cpu, cpu)
    t["forward only"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = collect_stats(block, arch.groups, inputs, kwargs[index], frozenset({"hessian"}), cpu, cpu)
    t["stats pass (forward + H)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for g in arch.groups:
        for name in g.linears:
            lin = get_module(block, name)
            qw = gptq_quantize(lin.weight, stats[g].hessian, IntFormat(bits=3, group_size=128))
            set_module(block, name, to_module(lin, qw))
    t["gptq solve (7 linears)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_block(block, inputs, kwargs[index], cpu, cpu)
    t["quantized re-run"] = time.perf_counter() - t0
    n_blocks = len(get_module(model, arch.blocks))
    per_block = t["stats pass (forward + H)"] + t["gptq solve (7 linears)"] + t["quantized re-run"]
    print(f"{model_name}, {nsamples} x 512 calibration tokens, block {index}, threads {torch.get_num_threads()}")
    for k, v in t.items():
        print(f"  {k:28s} {v:8.2f} s")
    print(f"  per block {per_block:.1f} s -> {n_blocks} blocks ~ {per_block * n_blocks / 60:.1f} min (+ capture)")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0] if a else "smollm2-135m", int(a[1]) if len(a) > 1 else 32, int(a[2]) if len(a) > 2 else 0)
