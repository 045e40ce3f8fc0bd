"""In-process A/B of the kernel call path in the lean decode loop: direct pybind11 bindings against torch ops.

The decode loop reaches the C++ kernels (GEMV, RMSNorm, rope + cache write, attention) through
``lowbit.kernels.build.kernel_module()``, which binds the torch ops' own functions directly. Here the
module is swapped, run by run, for a shim that forwards every call to ``torch.ops.lowbit.<name>`` (the
path before the bindings), so both arms run the same kernels on the same model in the same process,
alternating; the ratio is the median of per-pair ratios. Greedy tokens must match between the arms.

    python scripts/ab_bindings.py --models smollm2-135m gemma3-270m --configs int4-g128 int3-g128 fp4-g128 \\
        --threads 2 --pairs 5 --json docs/results/speed/decode_bindings.json --md docs/results/speed/decode_bindings.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import types
from pathlib import Path

import torch

from lowbit.bench.decode import lowbit_model, prompt_model
from lowbit.bench.kernels import median_time
from lowbit.kernels.build import _state, kernel_module
from lowbit.runtime import LeanDecoder

NAMES = ("gemm_int", "gemm_lut", "vq_linear", "rms_norm", "rope_cache", "attn_decode")
#: GEMV shapes of the lean loop on SmolLM2 (1 row: the call's fixed cost; fused q/k/v and gate/up)
CALL_SHAPES = [(1, 576), (192, 576), (576, 576), (960, 576), (3072, 576), (576, 1536)]


def _median_us(fn, n: int = 500) -> float:
    return median_time(fn, n, warmup=20) * 1e6


def call_costs(direct, via_ops, rounds: int = 5) -> list[dict]:
    """Median µs per call of each arm (hot weights), arms alternating over ``rounds``."""
    from lowbit.bench.kernels import bench_layer
    from lowbit.nn.kernel_layouts import layout_for

    out = []
    cases = []
    for o, i in CALL_SHAPES:
        lay = layout_for(bench_layer("int4-g128", o, i)[0])
        x = torch.randn(1, i)
        cases.append((f"gemm_int int4-g128 {o}x{i}", lambda m, lay=lay, x=x: m.gemm_int(
            x, lay.codes, lay.scale_a, lay.zero, None, lay.bits, lay.group_size, lay.in_features)))
    xr, wr = torch.randn(1, 576), torch.randn(576)
    cases.append(("rms_norm 576", lambda m: m.rms_norm(xr, wr, 1e-5)))
    for name, call in cases:
        arms: dict[str, list[float]] = {"direct": [], "torch.ops": []}
        for _ in range(rounds):
            arms["direct"].append(_median_us(lambda: call(direct)))
            arms["torch.ops"].append(_median_us(lambda: call(via_ops)))
        out.append({"call": name, "us_direct": statistics.median(arms["direct"]),
                    "us_ops": statistics.median(arms["torch.ops"])})
        print(f"{name}: direct {out[-1]['us_direct']:.2f} us, torch.ops {out[-1]['us_ops']:.2f} us", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--configs", nargs="+", default=["int4-g128"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", type=Path, default=Path("docs/results/speed/decode_bindings.json"))
    ap.add_argument("--md", type=Path, default=Path("docs/results/speed/decode_bindings.md"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    direct = kernel_module()
    if direct is None:
        raise SystemExit("lowbit's C++ kernels are not available")
    via_ops = types.SimpleNamespace(**{n: getattr(torch.ops.lowbit, n) for n in NAMES})
    load0 = os.getloadavg()[0]
    calls = call_costs(direct, via_ops)
    rows = []
    for name in a.models:
        base, tok, ids = prompt_model(name)
        for cfg in a.configs:
            model = lowbit_model(base, cfg)
            dec = LeanDecoder(model, max_len=ids.shape[1] + a.new_tokens + 8)
            times: dict[str, list[float]] = {"direct": [], "torch.ops": []}
            outs = {}
            for arm, mod in (("direct", direct), ("torch.ops", via_ops)):   # warm-up, both arms
                _state["module"] = mod
                outs[arm] = dec.generate(ids, a.new_tokens)
            assert torch.equal(outs["direct"], outs["torch.ops"]), "the two call paths gave different tokens"
            for i in range(a.pairs):
                order = (("direct", direct), ("torch.ops", via_ops)) if i % 2 == 0 else (("torch.ops", via_ops),
                                                                                       ("direct", direct))
                for arm, mod in order:
                    _state["module"] = mod
                    t0 = time.perf_counter()
                    dec.generate(ids, a.new_tokens)
                    times[arm].append(time.perf_counter() - t0)
            _state["module"] = direct
            ratios = [o / d for d, o in zip(times["direct"], times["torch.ops"])]
            row = {"model": name, "config": cfg, "new_tokens": a.new_tokens,
                   "tok_s_direct": a.new_tokens / statistics.median(times["direct"]),
                   "tok_s_ops": a.new_tokens / statistics.median(times["torch.ops"]),
                   "speedup_median_pair": statistics.median(ratios), "times": times}
            rows.append(row)
            print(f"{name} {cfg}: direct {row['tok_s_direct']:.1f} tok/s, torch.ops {row['tok_s_ops']:.1f} tok/s, "
                  f"x{row['speedup_median_pair']:.3f}", flush=True)
    res = {"calls": calls, "rows": rows, "env": {"threads": a.threads, "pairs": a.pairs, "torch": torch.__version__,
                                 "loadavg_before": load0, "loadavg_after": os.getloadavg()[0],
                                 "date": time.strftime("%Y-%m-%d %H:%M")}}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2) + "\n")
    e = res["env"]
    lines = [f"Generated by `scripts/ab_bindings.py`; raw numbers in `{a.json.as_posix()}`. Lean decode loop, "
             f"greedy {a.new_tokens} tokens after the bench-decode prompt, RTN models (blocks and head in the "
             f"format), {e['threads']} threads, {a.pairs} alternating pairs per row, {e['date']}, load average "
             f"before/after {e['loadavg_before']:.1f} / {e['loadavg_after']:.1f}. Both arms run the same C++ "
             "kernels; *torch.ops* reaches them through the dispatcher, *direct* through pybind11 bindings. "
             "Speedup: median of per-pair time ratios. Greedy tokens are identical in both arms.", "",
             "| model | config | tokens/s direct | tokens/s torch.ops | speedup |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['config']} | {r['tok_s_direct']:.1f} | {r['tok_s_ops']:.1f} | "
                     f"{r['speedup_median_pair']:.3f}x |")
    lines += ["", "Cost of one call (hot weights, one input row; medians of 500 calls, the median of 5 alternating "
              "rounds per arm):", "", "| call | µs direct | µs torch.ops | saved µs |", "|---|---:|---:|---:|"]
    for c in calls:
        lines.append(f"| {c['call']} | {c['us_direct']:.2f} | {c['us_ops']:.2f} | {c['us_ops'] - c['us_direct']:.2f} |")
    a.md.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.json} and {a.md}")


if __name__ == "__main__":
    main()
