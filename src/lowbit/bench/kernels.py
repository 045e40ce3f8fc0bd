"""Kernel benchmark: GEMV effective bandwidth and GEMM throughput per format and shape.

Effective bandwidth = bytes the kernel streams (kernel-layout codes + fp16 scales
+ uint8 zeros) / median time. It is reported twice: *hot* (the same layer called
over and over, so its weights sit in L2/L3) and *cold* (calls cycle through enough
copies of the layer to overflow the last-level cache, so weights come from DRAM),
and compared with the machine's memory bandwidth measured here (median of
repeated large-tensor sums, i.e. read bandwidth, same thread count), probed again
just before each format's rows, since a shared host's bandwidth drifts.
"""
from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import time
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..utils import atomic_write_text, write_between_markers

__all__ = ["BENCH_FORMATS", "SHAPES", "bench_kernels", "measure_bandwidth", "write_kernels_report"]

#: (out, in) of the zoo models' linears: smollm2-135m, then gemma3-270m
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (1024, 640), (256, 640), (2048, 640), (640, 2048)]

#: format tags benchmarked (FormatConfig.tag spelling)
#: (``<tag>@q8``: the same layer with int8 activations, ``LOWBIT_KERNEL_ACT=q8``)
BENCH_FORMATS = ["int4-g128", "int4-g128@q8", "int4-sym-g128", "int3-g128", "int3-g128@q8", "int2-g128", "int2-g128@q8",
                 "fp4-g128", "fp4-g128@q8", "nf4-sym-g128", "fp3-g128", "nf3-g128", "vq-v6-k4096",
                 "vq-v8-k4096-r256"]

GEMM_BATCHES = (16, 64, 512)
COLD_BYTES = 96 << 20  # > 2x a 32 MiB L3


def median_time(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure_bandwidth(nbytes: int = 512 << 20, repeats: int = 15, copy: bool = True) -> dict:
    """Memory bandwidth in GB/s (1e9 B/s): read (``sum``) and, with ``copy``, copy (read + write), medians."""
    a = torch.ones(nbytes // 4)
    res = {"read_gbs": nbytes / median_time(lambda: a.sum(), repeats, 2) / 1e9, "bytes": nbytes}
    if copy:
        b = torch.empty_like(a)
        res["copy_gbs"] = 2 * nbytes / median_time(lambda: b.copy_(a), repeats, 2) / 1e9
    return res


def _vq_layer(tag: str, out_f: int, in_f: int):
    """A random VPTQ-shaped layer from ``vq-v<v>-k<k>[-r<k_res>]``: 1% outlier columns (v0 2, k0 256)
    and the per-column norm, as VPTQ's defaults store them."""
    import re

    from ..errors import ConfigError
    from ..formats.codebook import VQWeight
    from ..nn import QuantizedLinear

    mt = re.fullmatch(r"vq-v(\d+)-k(\d+)(?:-r(\d+))?", tag)
    if not mt:
        raise ConfigError(f"VQ tag {tag!r}: expected vq-v<v>-k<k>[-r<k_res>], e.g. vq-v6-k4096")
    v, k, kr = int(mt[1]), int(mt[2]), int(mt[3] or 0)
    if out_f % v or out_f % 2:
        return None, None  # VPTQ picks another vector length for this width
    n_out = max(1, in_f // 100)
    qw = VQWeight(out_f, in_f, torch.randn(k, v).half(), torch.randint(0, k, (out_f // v, in_f - n_out)))
    if kr:
        qw.res_codebook, qw.res_idx = torch.randn(kr, v).half() * 0.1, torch.randint(0, kr, qw.idx.shape)
    qw.outlier_cols = torch.randperm(in_f)[:n_out].sort().values
    qw.out_codebook, qw.out_idx = torch.randn(256, 2).half(), torch.randint(0, 256, (out_f // 2, n_out))
    qw.col_scale, qw.col_bias = torch.rand(in_f).half() * 0.02, torch.randn(in_f).half() * 0.001
    m = QuantizedLinear.from_quantized(qw, qw.layer_spec())
    return m, m.dequantize_weight().clone()


def split_act(tag: str) -> tuple[str, str | None]:
    """``"int4-g128@q8"`` -> ``("int4-g128", "q8")``; a plain tag -> ``(tag, None)``."""
    from ..kernels.ops import check_kernel_activations

    base, sep, act = tag.partition("@")
    if sep:
        check_kernel_activations(act, f"format {tag!r}: the suffix after @ is the kernels' input precision")
    return base, (act or None)


def bench_layer(tag: str, out_f: int, in_f: int):
    from ..config import parse_format_tag
    from ..formats import quantize_rtn
    from ..nn import QuantizedLinear, scalar_spec

    if tag.startswith("vq-"):
        return _vq_layer(tag, out_f, in_f)
    fmt = parse_format_tag(tag).make()
    w = torch.randn(out_f, in_f) * 0.02
    m = QuantizedLinear.from_quantized(quantize_rtn(w, fmt), scalar_spec(fmt, out_f, in_f))
    return m, m.dequantize_weight().clone()


def clone_layout(lay):
    """A copy of kernel layout ``lay`` with its own copy of every tensor (for the cold rotation)."""
    return replace(lay, **{f.name: getattr(lay, f.name).clone() for f in fields(lay)
                           if isinstance(getattr(lay, f.name), torch.Tensor)})


def gemv_times(lay, x1: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds of ``lay.linear(x1)``: hot (one layout) and cold (copies > 96 MiB in rotation)."""
    t_hot = median_time(lambda: lay.linear(x1), repeats * 4)
    copies = [lay] + [clone_layout(lay) for _ in range(max(1, COLD_BYTES // lay.nbytes))]
    cycle = itertools.cycle(copies)
    return t_hot, median_time(lambda: next(cycle).linear(x1), max(repeats * 4, len(copies)))


def bench_kernels(formats=None, shapes=None, batches=GEMM_BATCHES, repeats: int = 30, threads: int | None = None,
                  progress: bool = True, bandwidth_bytes: int = 512 << 20) -> dict:
    """Run the benchmark; returns a JSON-ready dict (see :func:`write_kernels_report`)."""
    from ..kernels import FUSED_MAX_BATCH, load_kernels, use_kernel_activations
    from ..nn.kernel_layouts import layout_for

    if not load_kernels():
        raise RuntimeError("the lowbit C++ kernels are not available (see the log); nothing to benchmark")
    if threads:
        torch.set_num_threads(threads)
    formats = formats or BENCH_FORMATS
    shapes = shapes or SHAPES
    load0 = os.getloadavg()
    bw = measure_bandwidth(bandwidth_bytes)
    rows = []
    torch.manual_seed(0)
    for tag in formats:
        base, act = split_act(tag)
        # the host's bandwidth drifts (28-51 GB/s within an hour here): each format's rows are set
        # against a probe taken just before them
        read_now = measure_bandwidth(bandwidth_bytes, repeats=7, copy=False)["read_gbs"]
        for out_f, in_f in shapes:
            m, w = bench_layer(base, out_f, in_f)
            if m is None:
                continue
            lay = layout_for(m)
            if act == "q8" and not lay.q8_capable:
                from ..errors import ConfigError

                raise ConfigError(f"{tag}: int8 activations apply to INT2/3/4 and FP4 layers only")
            x1 = torch.randn(1, in_f)
            with use_kernel_activations(act):
                t_hot, t_cold = gemv_times(lay, x1, repeats)
            t_f32 = median_time(lambda: F.linear(x1, w), repeats * 4)
            row = {"format": tag, "out": out_f, "in": in_f, "bytes": lay.nbytes,
                   "gemv_hot_us": t_hot * 1e6, "gemv_cold_us": t_cold * 1e6, "fp32_gemv_us": t_f32 * 1e6,
                   "gemv_hot_gbs": lay.nbytes / t_hot / 1e9, "gemv_cold_gbs": lay.nbytes / t_cold / 1e9,
                   "read_gbs_probe": read_now, "cold_frac_of_read_bw": lay.nbytes / t_cold / 1e9 / read_now,
                   "gemm": {}}
            for b in batches:
                xb = torch.randn(b, in_f)
                n = max(5, repeats // (1 + b // 64))
                with use_kernel_activations(act):
                    t = median_time(lambda: lay.linear(xb), n)
                tf = median_time(lambda: F.linear(xb, w), n)
                row["gemm"][str(b)] = {"us": t * 1e6, "gflops": 2 * b * out_f * in_f / t / 1e9,
                                       "fp32_us": tf * 1e6, "fp32_gflops": 2 * b * out_f * in_f / tf / 1e9}
            rows.append(row)
            if progress:
                print(f"{tag:14s} {out_f:5d}x{in_f:<5d} gemv hot {row['gemv_hot_us']:8.1f}us "
                      f"({row['gemv_hot_gbs']:5.1f} GB/s) cold {row['gemv_cold_us']:8.1f}us "
                      f"({row['gemv_cold_gbs']:5.1f} GB/s) fp32 {row['fp32_gemv_us']:7.1f}us | "
                      + " ".join(f"b{k} {v['gflops']:5.1f}" for k, v in row["gemm"].items()) + " GFLOP/s", flush=True)
    bw["read_gbs_after"] = measure_bandwidth(bandwidth_bytes, copy=False)["read_gbs"]
    return {
        "bandwidth": bw,
        "rows": rows,
        "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": _cpu_name(),
                "isa": "avx2+fma" if torch.ops.lowbit.isa() == 1 else "scalar", "machine": platform.machine(),
                "fused_max_batch": FUSED_MAX_BATCH,
                "loadavg_before": load0, "loadavg_after": os.getloadavg(), "repeats": repeats,
                "date": time.strftime("%Y-%m-%d %H:%M")},
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor()


def write_kernels_report(res: dict | list[dict], json_path: Path, md_path: Path) -> None:
    """Write the JSON results and a markdown summary (one section per thread count)."""
    runs = res if isinstance(res, list) else [res]
    atomic_write_text(json_path, json.dumps(runs, indent=2) + "\n")
    lines = ["Generated by `lowbit bench-kernels` (see `src/lowbit/bench_kernels.py`); raw numbers in "
             f"`{json_path.as_posix()}`. GEMV effective bandwidth = kernel bytes (codes + fp16 scales + uint8 "
             "zeros, in the kernel layout) / median time. *hot*: one layer called repeatedly (weights in L2/L3); "
             "*cold*: calls cycle through copies of the layer totalling > 96 MiB, so weights stream from DRAM. "
             "`% bw` = cold bandwidth / measured DRAM read bandwidth. GEMM: GFLOP/s = 2·batch·out·in / time "
             "(batches above the run's `fused_max_batch` dequantize once and call torch's fp32 matmul).", ""]
    for r in runs:
        e, bw = r["env"], r["bandwidth"]
        batches = list(r["rows"][0]["gemm"]) if r["rows"] else []
        lines += [f"## {e['threads']} thread(s), {e['cpu']}, {e['isa']} path", "",
                  f"Measured memory bandwidth: read {bw['read_gbs']:.1f} GB/s, copy {bw['copy_gbs']:.1f} GB/s"
                  + (f" (read again after the rows: {bw['read_gbs_after']:.1f} GB/s)" if "read_gbs_after" in bw else "")
                  + ("; `% bw` uses the read probe taken just before each format's rows (`probe GB/s`)"
                     if r["rows"] and "read_gbs_probe" in r["rows"][0] else "") + ". "
                  f"Load average before/after: {', '.join(f'{v:.1f}' for v in e['loadavg_before'])} / "
                  f"{', '.join(f'{v:.1f}' for v in e['loadavg_after'])}; {e['date']}. "
                  f"Fused kernel up to batch {e.get('fused_max_batch', 32)}.", "",
                  "| format | out x in | KiB | GEMV hot µs | hot GB/s | GEMV cold µs | cold GB/s | probe GB/s | % bw | "
                  "fp32 GEMV µs | "
                  + "".join(f"b{b} GFLOP/s (fp32) | " for b in batches),
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(batches)]
        for row in r["rows"]:
            lines.append(
                f"| {row['format']} | {row['out']}x{row['in']} | {row['bytes'] / 1024:.0f} | {row['gemv_hot_us']:.1f} | "
                f"{row['gemv_hot_gbs']:.1f} | {row['gemv_cold_us']:.1f} | {row['gemv_cold_gbs']:.1f} | "
                f"{row.get('read_gbs_probe', bw['read_gbs']):.1f} | "
                f"{100 * row['cold_frac_of_read_bw']:.0f}% | {row['fp32_gemv_us']:.1f} | "
                + "".join(f"{g['gflops']:.1f} ({g['fp32_gflops']:.1f}) | " for g in row["gemm"].values()))
        lines.append("")
    write_between_markers(md_path, "\n".join(lines), tag="bench")
