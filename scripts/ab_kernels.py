"""A/B the fused GEMV kernels of the working tree against those of a git revision, in one process.

``gemm_int`` and ``gemm_lut``; a ``<tag>@q8`` format times ``gemm_q8`` (int8 inputs), a ``vq-...`` tag
``vq_linear``. The base revision's ``lowbit_kernels.cpp``, ``q8_ops.cpp`` and ``vq_ops.cpp`` are compiled
with their ops renamed to ``torch.ops.lowbit_base``; both run on the same kernel layouts (the layout code
is the working tree's, so the base must share it; VQ codebooks are widened to float32 for the base)
and their calls alternate, so both see the same machine state. GEMV from DRAM: each call reads a
different copy of the layer (> 96 MiB of copies). Writes JSON and a markdown table.

    python scripts/ab_kernels.py --base HEAD~1 --formats fp4-g128 nf3-g128 int4-g128 \
        --json docs/results/speed/kernels_ab.json --md docs/results/speed/kernels_ab.md
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = tuple(f"src/lowbit/kernels/csrc/{n}.cpp" for n in ("lowbit_kernels", "q8_ops", "vq_ops"))
SHAPES = [(576, 576), (1536, 576), (576, 1536), (2048, 640), (640, 2048)]


def build_base(rev: str) -> None:
    from torch.utils.cpp_extension import load

    work = Path(tempfile.mkdtemp(prefix="lowbit-ab-"))
    paths = []
    for source in SOURCES:
        got = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{source}"], capture_output=True, text=True)
        if got.returncode:  # q8_ops.cpp is younger than some revisions
            continue
        src = got.stdout
        for macro in ("TORCH_LIBRARY", "TORCH_LIBRARY_IMPL", "TORCH_LIBRARY_FRAGMENT"):
            src = src.replace(f"{macro}(lowbit,", f"{macro}(lowbit_base,")
        # and the C++ namespaces, so no symbol of the base can stand in for the working tree's (with
        # equal names, the dynamic linker may bind one library's calls to the other's functions)
        src = re.sub(r"\bnamespace lowbit(_vq|_q8)?\b", lambda mt: f"namespace lowbit{mt[1] or ''}_base", src)
        src = re.sub(r"\blowbit(_vq|_q8)?::", lambda mt: f"lowbit{mt[1] or ''}_base::", src)
        paths.append(work / ("base_" + Path(source).name))
        paths[-1].write_text(src)
    load(name="lowbit_base_kernels", sources=[str(p) for p in paths], extra_cflags=["-O3", "-fopenmp"],
         extra_ldflags=["-fopenmp"], build_directory=str(work), is_python_module=False)


def base_layout(lay):
    """The layout as the base revision reads it: float32 VQ codebooks (the only dtype before 2026-11-24)."""
    if hasattr(lay, "kind") or lay.codebook.dtype == torch.float32:
        return lay
    from dataclasses import replace

    return replace(lay, codebook=lay.codebook.float(),
                   res_codebook=None if lay.res_codebook is None else lay.res_codebook.float())


def call(ns: str, lay, x, act: str | None = None):
    op = getattr(torch.ops, ns)
    if not hasattr(lay, "kind"):  # a VQKernelLayout
        return op.vq_linear(x, lay.codes, lay.codebook, lay.res_codes, lay.res_codebook, lay.main_cols,
                            lay.out_codes, lay.out_codebook, lay.outlier_cols, lay.col_scale, lay.col_bias, None,
                            lay.v, lay.v0)
    if act == "q8":
        return op.gemm_q8(x, lay.codes, lay.scale_a, lay.scale_b, lay.zero, *lay.q8_args, None, lay.bits,
                          lay.group_size, lay.in_features)
    if lay.kind == "int":
        return op.gemm_int(x, lay.codes, lay.scale_a, lay.zero, None, lay.bits, lay.group_size, lay.in_features)
    return op.gemm_lut(x, lay.codes, lay.scale_a, lay.scale_b, lay.table, None, lay.bits, lay.group_size,
                       lay.in_features)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD", help="git revision to compare against (default: HEAD)")
    ap.add_argument("--formats", nargs="+", default=["fp4-g128", "fp4-sym-g128", "nf4-g128", "nf3-g128",
                                                     "int4-g128"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=40, help="calls per kernel and shape (medians)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args()

    from lowbit.bench.kernels import COLD_BYTES, clone_layout, bench_layer, split_act
    from lowbit.kernels import load_kernels
    from lowbit.nn.kernel_layouts import layout_for

    if not load_kernels():
        raise SystemExit("the lowbit kernels did not build here; nothing to compare")
    build_base(args.base)
    torch.set_num_threads(args.threads)
    rows = []
    for tag in args.formats:
        base_tag, act = split_act(tag)
        for out_f, in_f in SHAPES:
            m, w = bench_layer(base_tag, out_f, in_f)
            if m is None:  # a VQ vector length that does not divide out
                continue
            lay = layout_for(m)
            lays = [lay] + [clone_layout(lay) for _ in range(max(1, COLD_BYTES // lay.nbytes))]
            by_ns = {"lowbit": lays, "lowbit_base": [base_layout(lay_k) for lay_k in lays]}
            x = torch.randn(1, in_f)
            scale = (x.abs() @ w.abs().T).max().item()
            for ns in ("lowbit", "lowbit_base"):  # both must agree with the dequantized weight
                err = (call(ns, by_ns[ns][0], x, act) - x @ w.T).abs().max().item() / scale
                if err > (1e-2 if act else 2e-6):  # int8 inputs: the input's rounding error
                    raise SystemExit(f"{ns} {tag} {out_f}x{in_f}: error {err:.2e} of |x||W|")
            times = {"lowbit": [], "lowbit_base": []}
            for rep in range(args.repeats + 4):
                order = ("lowbit", "lowbit_base") if rep % 2 else ("lowbit_base", "lowbit")
                for k, ns in enumerate(order):
                    lay_k = by_ns[ns][(2 * rep + k) % len(lays)]
                    t0 = time.perf_counter()
                    call(ns, lay_k, x, act)
                    if rep >= 4:  # warm-up calls are not counted
                        times[ns].append(time.perf_counter() - t0)
            new, base = statistics.median(times["lowbit"]), statistics.median(times["lowbit_base"])
            rows.append({"format": tag, "out": out_f, "in": in_f, "bytes": lay.nbytes, "base_us": base * 1e6,
                         "new_us": new * 1e6, "speedup": base / new, "new_gbs": lay.nbytes / new / 1e9})
            print(f"{tag:14s} {out_f:5d}x{in_f:<5d} base {base * 1e6:8.1f} us  new {new * 1e6:8.1f} us  "
                  f"x{base / new:.2f}", flush=True)
    env = {"base": args.base, "head": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                      capture_output=True, text=True).stdout.strip(),
           "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
           "loadavg_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    if args.md:
        lines = [f"Kernel A/B, GEMV (batch 1) from DRAM, {args.threads} threads, medians of {args.repeats} "
                 f"alternating calls: base = `{args.base}`, new = working tree at {env['head']} "
                 f"({env['date']}). Generated by `scripts/ab_kernels.py`.", "",
                 "| format | out x in | KiB | base µs | new µs | base / new | new GB/s |",
                 "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['format']} | {r['out']}x{r['in']} | {r['bytes'] / 1024:.0f} | {r['base_us']:.1f} | "
                  f"{r['new_us']:.1f} | {r['speedup']:.2f} | {r['new_gbs']:.1f} |" for r in rows]
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
