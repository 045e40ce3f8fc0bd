"""What checking a checkpoint on load costs: SmolLM2-135M RTN int4 g128 saved once, then loaded with
``verify=True`` (sha256 of every file against the manifest, on a second thread while the model is built),
``verify=False`` (only the spec/buffer and finite checks) and with the loader as it was before manifests
(``--before REV``: ``src/lowbit/io/checkpoint.py`` of that commit, run against today's package), plus the
sha256 of the checkpoint's files alone on one thread. Runs are interleaved (one of each per round, after a
warm-up round) so a drift in the machine's load hits every variant alike; median and spread of ``--runs``.
Each run records wall time and the process's CPU time (all threads: the verifying thread's hashing
included), which a busy shared machine disturbs far less; ``--threads 1`` keeps torch's idle threads from
spinning into it.

    python scripts/checkpoint_load_time.py --runs 5 \
        --json docs/results/diag/checkpoint_load_time.json --md docs/results/diag/checkpoint_load_time.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
import types
from pathlib import Path

import torch

import lowbit.api as api
from lowbit.data.fetch import sha256_file
from lowbit.io.checkpoint import load_checkpoint, read_manifest
from lowbit.quantize import recipe_from_options
from lowbit.utils import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def loader_before(rev: str):
    """``load_checkpoint`` of ``src/lowbit/io/checkpoint.py`` at commit ``rev`` (imports resolve in today's
    ``lowbit.io``), or None when git cannot show it."""
    try:
        src = subprocess.run(["git", "show", f"{rev}:src/lowbit/io/checkpoint.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType("lowbit.io.checkpoint_before")
    mod.__package__ = "lowbit.io"
    exec(compile(src, f"{rev}:checkpoint.py", "exec"), mod.__dict__)
    return mod.load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--before", default="6c4a3b3", help="commit whose loader is the baseline (the last before "
                                                        "manifests)")
    ap.add_argument("--json", default="docs/results/diag/checkpoint_load_time.json")
    ap.add_argument("--md", default="docs/results/diag/checkpoint_load_time.md")
    ap.add_argument("--md-only", action="store_true", help="rewrite --md from the --json of an earlier run")
    args = ap.parse_args()
    if args.md_only:
        return write_md(json.loads(Path(args.json).read_text()), Path(args.md))
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    model, tok = api.load_model(args.model)
    api.quantize(model, recipe_from_options("rtn", {"bits": 4, "group_size": 128}), progress=False)
    with tempfile.TemporaryDirectory(prefix="lowbit-load-time-") as tmp:
        ckpt = api.save(model, Path(tmp) / "ckpt", tok, source_model=args.model)
        del model
        files = read_manifest(ckpt)
        variants = {
            "verify=True": lambda: load_checkpoint(ckpt, verify=True),
            "verify=False": lambda: load_checkpoint(ckpt, verify=False),
            "sha256 only": lambda: [sha256_file(ckpt / rel) for rel in files],
        }
        before = loader_before(args.before)
        if before is not None:
            variants[f"before ({args.before})"] = lambda: before(ckpt)
        times: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        for rnd in range(args.runs + 1):  # round 0 warms the page cache and imports
            for name, fn in variants.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if rnd:
                    times[name].append(dt)
                    cpu[name].append(dc)
        size = sum(e["size"] for e in files.values())

    rows = {k: {"median_s": round(statistics.median(v), 4), "min_s": round(min(v), 4), "max_s": round(max(v), 4),
                "runs_s": [round(x, 4) for x in v], "cpu_median_s": round(statistics.median(cpu[k]), 4),
                "cpu_min_s": round(min(cpu[k]), 4), "cpu_max_s": round(max(cpu[k]), 4),
                "cpu_runs_s": [round(x, 4) for x in cpu[k]]} for k, v in times.items()}
    base_key = f"before ({args.before})" if f"before ({args.before})" in rows else "verify=False"
    base, cbase = rows[base_key]["median_s"], rows[base_key]["cpu_median_s"]
    for k, r in rows.items():
        r["vs_baseline"] = round(r["median_s"] / base, 3)
        r["cpu_vs_baseline"] = round(r["cpu_median_s"] / cbase, 3)
        # each round timed every variant back to back: the per-round ratio cancels most of the machine's drift
        r["paired_ratio_median"] = round(statistics.median(a / b for a, b in zip(times[k], times[base_key])), 3)
    res = {"model": args.model, "recipe": "RTN int4 g128", "checkpoint_bytes": size, "files": len(files),
           "runs": args.runs, "baseline": base_key, "torch_threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "loadavg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
           "machine": platform.machine(),
           "python": platform.python_version(), "torch": torch.__version__, "rows": rows}
    atomic_write_text(Path(args.json), json.dumps(res, indent=1) + "\n")
    write_md(res, Path(args.md))


def write_md(res: dict, path: Path) -> None:
    """The markdown table of a results JSON, with what it says about verifying."""
    rows, base_key = res["rows"], res["baseline"]
    base, ver = rows[base_key], rows.get("verify=True")
    lines = [f"# Checkpoint load time: {res['model']} {res['recipe']} "
             f"({res['checkpoint_bytes'] / 1e6:.1f} MB in {res['files']} files)", "",
             f"Median of {res['runs']} interleaved runs after a warm-up round (page cache warm), "
             f"{res['torch_threads']} torch thread(s) on {res['cpu_count']} CPUs, load average "
             f"{res['loadavg_1m'][0]:.1f} at the start and {res['loadavg_1m'][1]:.1f} at the end. Paired ratio: the "
             f"median over rounds of a variant's wall time over the baseline's in the same round. CPU: process time "
             f"of all threads (the verifying thread's hashing included). Written by "
             f"`scripts/checkpoint_load_time.py`.", "",
             f"| load | wall median (s) | wall min-max (s) | wall / {base_key} | paired ratio | CPU median (s) "
             f"| CPU min-max (s) | CPU / {base_key} |", "|---|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        lines.append(f"| {k} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | {r['vs_baseline']:.3f} "
                     f"| {r['paired_ratio_median']:.3f} | {r['cpu_median_s']:.3f} "
                     f"| {r['cpu_min_s']:.3f}-{r['cpu_max_s']:.3f} | {r['cpu_vs_baseline']:.3f} |")
    if ver is not None and "sha256 only" in rows:
        sha = rows["sha256 only"]
        lines += ["", f"A verified load took {100 * (ver['vs_baseline'] - 1):+.1f}% wall time "
                      f"({100 * (ver['paired_ratio_median'] - 1):+.1f}% paired) and "
                      f"{100 * (ver['cpu_vs_baseline'] - 1):+.1f}% CPU time against {base_key}; hashing every file "
                      f"alone costs {sha['cpu_median_s']:.3f} s CPU, {100 * sha['cpu_vs_baseline']:.1f}% of that "
                      f"load's. The baseline's own wall times spread {100 * (base['max_s'] / base['min_s'] - 1):.0f}% "
                      f"from fastest to slowest run, so differences of a few percent are within the noise here."]
    atomic_write_text(path, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
