"""The LUT GEMM (``gemm_lut_tiled``) against dequantize-then-matmul, per zoo shape, and a prefill end to end.

    python scripts/bench_lut_gemm.py --threads 2 --json docs/results/speed/lut_gemm.json

GEMM rows (two-scale NF4 g128 by default, random weights of each zoo linear shape, random inputs): every path
timed round-robin in one process, ``--repeats`` rounds after a warm-up, median and min/max in µs:

- ``tile``: the LUT GEMM (16/8/4-row float tiles decoded once, hand-written micro-kernel over the batch);
- ``mm``: the same tiles multiplied by torch's BLAS (``at::mm`` per 64-row tile);
- ``fused``: the fused GEMV/GEMM kernel (``gemm_lut``, decodes each weight again for every 4 input rows);
- ``dequant_mm``: ``dequant_lut`` of the whole weight then ``F.linear`` (dequantize-then-matmul, per call);
- ``fp32``: ``F.linear`` with the float weight already there (torch fp32, what a cached float weight costs).

Prefill (``--prefill``): SmolLM2-135M, blocks and head RTN-quantized to the format (as ``lowbit bench-decode``
does), a forward of ``--prefill-batch`` x 512 random tokens (``LOWBIT_BATCH_PATH=tile`` pins the LUT GEMM; by
default each layer shape takes its measured fastest path, which may be the kept dequantized weight), alternating with the fp32 model (one warm-up pair,
which also makes the batch-path measurements); the ratio is the median of the per-pair ratios. The chosen batch
path per layer shape (``BatchDispatcher.decisions``) is written with the times it was chosen from.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {   # (out, in) of each distinct linear of the zoo models
    "smollm2-135m": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
    "gemma3-270m": [(1024, 640), (256, 640), (2048, 640), (640, 2048)],
}


def _spread_us(fns: dict, repeats: int) -> dict:
    """``{name: {"median_us", "min_us", "max_us"}}``, timed round-robin (``bench_w8a8._spread_ms``)."""
    from bench_w8a8 import _spread_ms

    return {k: {f"{s[:-3]}_us": round(v * 1e3, 1) for s, v in t.items()} for k, t in _spread_ms(fns, repeats).items()}


@torch.no_grad()
def bench_gemm(fmt_tag: str, batches: list[int], repeats: int) -> list[dict]:
    from lowbit.config import parse_format_tag
    from lowbit.formats import quantize_rtn
    from lowbit.nn import QuantizedLinear, scalar_spec
    from lowbit.nn.kernel_layouts import layout_for

    fmt = parse_format_tag(fmt_tag, default_group=128).make()
    rows = []
    for model, shapes in SHAPES.items():
        for out_f, in_f in shapes:
            w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(out_f * 7 + in_f)) * 0.05
            lay = layout_for(QuantizedLinear.from_quantized(quantize_rtn(w, fmt), scalar_spec(fmt, out_f, in_f)))
            wd = lay.dequantize()
            for b in batches:
                x = torch.randn(b, in_f)
                fns = {"tile": lambda: lay.run_path("tile", x, None), "mm": lambda: lay.run_path("mm", x, None),
                       "dequant_mm": lambda: F.linear(x, lay.dequantize()), "fp32": lambda: F.linear(x, wd)}
                if b <= 128:
                    fns["fused"] = lambda: lay.run_path("fused", x, None)
                t = _spread_us(fns, repeats)
                med = {k: v["median_us"] for k, v in t.items()}
                row = {"model": model, "format": fmt_tag, "out": out_f, "in": in_f, "batch": b, "times": t,
                       "tile_vs_dequant_mm": round(med["dequant_mm"] / med["tile"], 2),
                       "tile_vs_fp32": round(med["fp32"] / med["tile"], 2)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


@torch.no_grad()
def bench_prefill(fmt_tag: str, batch: int, repeats: int) -> dict:
    from lowbit.bench.decode import lowbit_model
    from lowbit.api import load_model
    from lowbit.kernels.ops import batch_dispatcher

    base, _ = load_model("smollm2-135m")
    base = base.eval()
    model = lowbit_model(base, fmt_tag)
    ids = torch.randint(10, base.config.vocab_size, (batch, 512), generator=torch.Generator().manual_seed(0))
    t_fp, t_q = [], []
    for i in range(repeats + 1):
        for m, ts in ((base, t_fp), (model, t_q)):
            t0 = time.perf_counter()
            m(input_ids=ids, use_cache=False)
            if i:   # the first pair warms up (and measures the batch paths)
                ts.append(time.perf_counter() - t0)
    res = {"model": "smollm2-135m", "format": fmt_tag, "blocks_and_head": True, "tokens": batch * 512,
           "fp32_s": {"median": round(statistics.median(t_fp), 4), "min": round(min(t_fp), 4), "max": round(max(t_fp), 4)},
           "quant_s": {"median": round(statistics.median(t_q), 4), "min": round(min(t_q), 4), "max": round(max(t_q), 4)},
           "quant_vs_fp32": round(statistics.median(a / b for a, b in zip(t_fp, t_q)), 3),
           "paths": {f"{sig[4]}x{sig[5]} @{bucket} rows": {"path": p, "us": {k: round(v * 1e6) for k, v in t.items()}}
                     for (sig, _, bucket), (p, t) in sorted(batch_dispatcher.decisions.items())}}
    print(json.dumps(res), flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="nf4-g128", help="format tag (default: two-scale NF4 g128)")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", action="store_true", help="also time a SmolLM2 prefill against fp32")
    ap.add_argument("--prefill-batch", type=int, default=2)
    ap.add_argument("--prefill-repeats", type=int, default=5)
    ap.add_argument("--no-gemm", action="store_true", help="only the prefill")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lowbit.kernels import load_kernels

    if not load_kernels():
        print("the lowbit kernels could not be built", file=sys.stderr)
        return 1
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "isa": torch.ops.lowbit.isa(),
           "loadavg_before": os.getloadavg(), "command": " ".join(sys.argv),
           "batch_path": os.environ.get("LOWBIT_BATCH_PATH", "auto"),
           "gemm": [] if args.no_gemm else bench_gemm(args.format, args.batches, args.repeats)}
    if args.prefill:
        res["prefill"] = bench_prefill(args.format, args.prefill_batch, args.prefill_repeats)
    res["loadavg_after"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        runs = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps(runs + [res], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
