"""Prefill speed of the integer W8A8 / W4A4 path vs fp32 and bf16 torch, per layer and end to end.

    python scripts/bench_w8a8.py --layers smollm2-135m gemma3-270m            # per-layer, synthetic weights
    python scripts/bench_w8a8.py --model smollm2-135m --method w8a8          # + end to end (2048-token prefill)
    python scripts/bench_w8a8.py --gemm smollm2-135m gemma3-270m --gemm-tokens 1024 \
        --model smollm2-135m --method w8a8 --tokens 1024 --repeats 7 --no-bf16   # GEMMs per shape + end to end
    python scripts/bench_w8a8.py --model smollm2-135m --method dgq --also w8a8 --tokens 1024 --no-bf16
        # fp32, DGQ A8W4 and W8A8 in one alternating loop (--also: repeatable, METHOD or METHOD:JSON)

Medians over ``--repeats`` runs after one warm-up; 2048 tokens (batch x seq = 4 x 512). End to end,
the fp32 and the quantized model run alternately and ``int_vs_fp32`` is the median of the per-pair
ratios.
``--gemm``: each zoo linear shape at ``--gemm-tokens`` tokens, the candidates timed round-robin (a slow
spell of a shared machine hits all alike): fp32 ``F.linear``, the library ``int_mm`` (the backend its
dispatcher picks, named), each int8 backend forced (``torch._int_mm`` on the stored ``(N, K)`` layout,
the hand-written kernel), ``torch._int_mm`` on a contiguous ``(K, N)`` copy (is a pre-transposed layout
worth keeping?) and the whole W8A8 module forward; median, min and max of each.
Writes ``docs/results/flatquant_speed.json`` (merged with what is already there) and the
end-to-end table between the ``prefill`` markers of ``docs/flattenquant.md`` (``prefill-gemm``: the GEMM table).
Model memory: the stored tensors (codes, scales, flattening maps; float tensors at fp16, or fp32
for the float model), from :func:`lowbit.nn.bpw.bpw_report`; end to end also the tensors held in memory
per dtype, the resident set after loading and at the end, and the process's peak (which includes the fp32
model it times against).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.bench.kernels import median_time
from lowbit.formats import IntFormat, quantize_rtn
from lowbit.nn.w8a8 import QuantizedActLinear, act_spec, from_quantized_weight

# (name, in, out) of each distinct linear shape
SHAPES = {
    "smollm2-135m": [("q/o", 576, 576), ("k/v", 576, 192), ("gate/up", 576, 1536), ("down", 1536, 576)],
    "gemma3-270m": [("q", 640, 1024), ("o", 1024, 640), ("k/v", 640, 256), ("gate/up", 640, 2048), ("down", 2048, 640)],
}


def _median_s(fn, repeats: int) -> float:
    return median_time(fn, repeats, warmup=1)


def _shape_inputs(model: str, tokens: int):
    """``(name, in, out, x (tokens, in), w (out, in))`` per zoo shape: random inputs and weights."""
    for name, k, n in SHAPES[model]:
        yield name, k, n, torch.randn(tokens, k), torch.randn(n, k) * 0.05


def _spread_ms(fns: dict, repeats: int) -> dict:
    """``{name: {"median_ms", "min_ms", "max_ms"}}``, the functions timed round-robin after one warm-up each."""
    for fn in fns.values():
        fn()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"median_ms": round(statistics.median(v), 4), "min_ms": round(min(v), 4), "max_ms": round(max(v), 4)}
            for k, v in ts.items()}


@torch.no_grad()
def bench_gemm(model: str, tokens: int, repeats: int) -> list[dict]:
    """Per zoo shape: fp32 vs the library int8 GEMM vs each backend, plus the whole W8A8 forward."""
    from lowbit.kernels.intmm import available_backends, int_mm, int_mm_backend, int_mm_on

    rows = []
    for name, k, n, x, w in _shape_inputs(model, tokens):
        mod = _act_layer(w, 8, x)
        qa, _ = mod.quantize_input(x)
        a, b = qa.to(torch.int8), mod.int_weight()
        fns = {"fp32": lambda: F.linear(x, w), "library": lambda: int_mm(a, b)}
        for backend in available_backends("cpu"):
            if backend != "reference":
                fns[backend] = lambda backend=backend: int_mm_on(backend, a, b)
        if "torch" in fns:
            bt = b.T.contiguous()                                              # (K, N) row-major copy
            fns["torch_kn_contiguous"] = lambda: torch._int_mm(a, bt)
        fns["w8a8_module"] = lambda: mod(x)
        row = {"model": model, "layer": name, "in": k, "out": n, "tokens": tokens,
               "library_backend": int_mm_backend(a, b), "times": _spread_ms(fns, repeats)}
        row["fp32_over_library"] = round(row["times"]["fp32"]["median_ms"] / row["times"]["library"]["median_ms"], 3)
        print(row)
        rows.append(row)
    return rows


def _cpu_flags() -> dict:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        flags = set()
    return {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")}


def _rss_mib(field: str = "VmRSS") -> float | None:
    """This process's resident set (``VmRSS``) or its peak (``VmHWM``) in MiB, from /proc (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _tensor_mib(model) -> dict:
    """MiB of the tensors a model holds (parameters and buffers, shared storage once) per dtype."""
    seen, out = set(), {}
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            out[str(t.dtype).replace("torch.", "")] = out.get(str(t.dtype).replace("torch.", ""), 0) + st.nbytes()
    return {k: round(v / 2**20, 1) for k, v in sorted(out.items())}


def _act_layer(w: torch.Tensor, bits: int, x: torch.Tensor) -> QuantizedActLinear:
    qw = quantize_rtn(w, IntFormat(bits, -1, sym=True))
    spec = act_spec(w.shape[1], w.shape[0], bits, bits)
    return from_quantized_weight(qw, spec, float(x.abs().max()) / ((1 << (bits - 1)) - 1))


@torch.no_grad()
def bench_layers(model: str, tokens: int, repeats: int) -> list[dict]:
    rows = []
    for name, k, n, x, w in _shape_inputs(model, tokens):
        xb, wb = x.bfloat16(), w.bfloat16()
        row = {"model": model, "layer": name, "in": k, "out": n, "tokens": tokens,
               "fp32_ms": _median_s(lambda: F.linear(x, w), repeats) * 1e3,
               "bf16_ms": _median_s(lambda: F.linear(xb, wb), repeats) * 1e3}
        for bits in (8, 4):
            mod = _act_layer(w, bits, x)
            row[f"w{bits}a{bits}_int_ms"] = _median_s(lambda: mod(x), repeats) * 1e3
        a = torch.randint(-127, 128, (tokens, k), dtype=torch.int8)
        from lowbit.kernels.intmm import int_mm

        row["gemm_int8_only_ms"] = _median_s(lambda: int_mm(a, mod.int_weight()), repeats) * 1e3
        row = {kk: (round(v, 3) if isinstance(v, float) else v) for kk, v in row.items()}
        print(row)
        rows.append(row)
    return rows


#: the weight format each method is benchmarked with (default: int8 symmetric per output channel)
METHOD_FORMATS = {"dgq": {"bits": 4, "group_size": 128, "sym": True}}


def _quantized_copy(model, tok, method: str, method_config: dict, calib: int, in_place: bool = False):
    """``model`` quantized with ``method``: a deep copy, or ``model`` itself with ``in_place`` (calibrated methods:
    ``calib`` windows of ``wiki-train``; the format from :data:`METHOD_FORMATS`)."""
    import copy

    import lowbit
    from lowbit.config import FormatConfig
    from lowbit.methods.registry import get_method
    from lowbit.quantize import QuantRecipe

    q = model if in_place else copy.deepcopy(model)
    calib_ids = None
    if get_method(method).needs:
        from lowbit.data.calib import sample_windows
        calib_ids = sample_windows(tok, "wiki-train", calib, 512, 0)
    fmt = FormatConfig(**METHOD_FORMATS.get(method, {"bits": 8, "group_size": -1, "sym": True}))
    lowbit.quantize(q, QuantRecipe(method=method, fmt=fmt, method_config=method_config), calib_ids=calib_ids,
                    progress=False)
    return q


def _run_key(method: str, cfg: dict) -> str:
    return method + "".join(f"/{k}={v}" for k, v in sorted(cfg.items()))


def _spread(ts: list[float]) -> dict:
    return {"median_s": round(statistics.median(ts), 4), "min_s": round(min(ts), 4), "max_s": round(max(ts), 4)}


@torch.no_grad()
def bench_model(model_name: str, method: str, method_config: dict, tokens: int, repeats: int, calib: int,
                bf16: bool = True, also: list[tuple[str, dict]] = ()) -> dict:
    """End-to-end prefill of fp32 against ``method``; every ``also`` (method, config) is quantized too and its
    forwards join the same alternating loop (one run: every ratio compares forwards timed side by side)."""
    import copy

    from lowbit.api import load_model

    model, tok = load_model(model_name)
    rss_loaded = _rss_mib()
    seq = 512
    ids = torch.randint(10, model.config.vocab_size, (tokens // seq, seq))
    from lowbit.nn.bpw import bpw_report

    res = {"model": model_name, "method": method, "method_config": method_config, "tokens": tokens,
           "batch": tokens // seq, "seq": seq, "fp32_mib": round(bpw_report(model, "float32")["total_bits"] / 8 / 2**20, 1)}
    fp32 = copy.deepcopy(model)  # kept to interleave its timings with the quantized model's
    if bf16:
        mb = copy.deepcopy(model).to(torch.bfloat16)
        res["bf16_s"] = _median_s(lambda: mb(input_ids=ids, use_cache=False), repeats)
        mb = None  # free the bf16 copy
    others = {_run_key(m, c): _quantized_copy(model, tok, m, c, calib) for m, c in also}
    model = _quantized_copy(model, tok, method, method_config, calib, in_place=True)
    # fp32 and integer forwards alternate, so a slow spell of this shared machine hits both alike;
    # the ratio is the median of the per-pair ratios
    t_fp, t_int = [], []
    t_other = {k: [] for k in others}
    for i in range(repeats + 1):
        for m, ts in ((fp32, t_fp), (model, t_int), *((others[k], t_other[k]) for k in others)):
            t0 = time.perf_counter()
            m(input_ids=ids, use_cache=False)
            if i:  # the first round warms up
                ts.append(time.perf_counter() - t0)
    res["fp32_s"], res["int_s"] = statistics.median(t_fp), statistics.median(t_int)
    res["fp32_spread"], res["int_spread"] = _spread(t_fp), _spread(t_int)
    if others:
        from lowbit.nn.w8a8 import act_linear_summary as _summary

        res["same_run"] = {
            k: {"int_s": statistics.median(ts), "int_tok_s": round(tokens / statistics.median(ts), 1),
                "int_spread": _spread(ts), "int_times_s": [round(t, 4) for t in ts],
                "int_vs_fp32": round(statistics.median(a / b for a, b in zip(t_fp, ts)), 3),
                # per-pair ratio of this model's forward to the main method's: > 1 = the main method is faster
                "over_main": round(statistics.median(b / a for a, b in zip(t_int, ts)), 3),
                "int_mib": round(bpw_report(others[k], "float16")["total_bits"] / 8 / 2**20, 1),
                "act_linears": _summary(others[k])}
            for k, ts in t_other.items()}
    res["fp32_times_s"], res["int_times_s"] = [round(t, 4) for t in t_fp], [round(t, 4) for t in t_int]
    for k in ("fp32", "bf16", "int"):
        if f"{k}_s" in res:
            res[f"{k}_tok_s"] = round(tokens / res[f"{k}_s"], 1)
    res["int_vs_fp32"] = round(statistics.median(a / b for a, b in zip(t_fp, t_int)), 3)
    from lowbit.nn.w8a8 import act_linear_summary

    res["act_linears"] = act_linear_summary(model)
    res["int_mib"] = round(bpw_report(model, "float16")["total_bits"] / 8 / 2**20, 1)
    from lowbit.kernels.intmm import dispatcher

    # what the models hold in memory (the float model: fp32; the quantized one: int8 codes, fp16 scales and
    # what stayed float, such as a tied embedding), the int8 block weights against their fp32 bytes
    int8_mib = sum(m.int_weight().numel() for m in model.modules() if isinstance(m, QuantizedActLinear)) / 2**20
    fp32_lin_mib = sum(4 * m.in_features * m.out_features for m in model.modules()
                       if isinstance(m, QuantizedActLinear)) / 2**20
    res["memory"] = {"fp32_tensors_mib": _tensor_mib(fp32), "int_tensors_mib": _tensor_mib(model),
                     "int8_gemm_weights_mib": round(int8_mib, 1), "fp32_weights_of_those_mib": round(fp32_lin_mib, 1),
                     "rss_after_load_mib": rss_loaded, "rss_end_mib": _rss_mib(), "peak_rss_mib": _rss_mib("VmHWM")}
    res["int8_gemm_decisions"] = {f"M{m}xK{k}xN{n}": {"backend": b, "ms": {kk: round(v * 1e3, 3) for kk, v in t.items()}}
                                  for (_, _, m, k, n), (b, t) in sorted(dispatcher.decisions.items())}
    # per shape, oneDNN's prepacked s8 linear or int_mm (each with its rescale), as measured once
    res["int8_linear_decisions"] = {f"M{m}xK{k}xN{n}": {"path": b, "ms": {kk: round(v * 1e3, 3) for kk, v in t.items()}}
                                    for (_, m, k, n), (b, t) in sorted(dispatcher.linear_decisions.items())}
    res["loadavg_1m"] = round(os.getloadavg()[0], 2)
    res["date"] = time.strftime("%Y-%m-%d %H:%M")
    res["threads"] = torch.get_num_threads()
    print(res)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", nargs="*", default=[], choices=sorted(SHAPES))
    p.add_argument("--gemm", nargs="*", default=[], choices=sorted(SHAPES),
                   help="int8 GEMM per zoo shape: fp32 vs library vs each backend")
    p.add_argument("--gemm-tokens", type=int, default=1024)
    p.add_argument("--model", default=None)
    p.add_argument("--method", default="w8a8")
    p.add_argument("--method-config", default="{}", help="JSON method config")
    p.add_argument("--also", action="append", default=[], metavar="METHOD[:JSON]",
                   help="another method timed in the same alternating loop (repeatable), e.g. w8a8")
    p.add_argument("--calib", type=int, default=16, help="calibration windows for calibrated methods")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="also time torch bf16")
    p.add_argument("--out", default="docs/results/flatquant_speed.json")
    p.add_argument("--md", default="docs/flattenquant.md", help="markdown file for the end-to-end table ('' = none)")
    args = p.parse_args()
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data["env"] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                   "cpu": platform.processor(), "loadavg_1m": round(os.getloadavg()[0], 2),
                   "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_flags": _cpu_flags(),
                   "intmm_mode": os.environ.get("LOWBIT_INTMM", "auto")}
    for m in args.gemm:
        data.setdefault("gemm", {})[m] = bench_gemm(m, args.gemm_tokens, args.repeats)
    if args.gemm:
        data["gemm_env"] = dict(data["env"], date=time.strftime("%Y-%m-%d %H:%M"))
    for m in args.layers:
        data.setdefault("layers", {})[m] = bench_layers(m, args.tokens, args.repeats)
    if args.layers:
        data["layers_env"] = dict(data["env"], date=time.strftime("%Y-%m-%d %H:%M"))
    if args.model:
        cfg = json.loads(args.method_config)
        also = [(a.split(":", 1)[0], json.loads(a.split(":", 1)[1]) if ":" in a else {}) for a in args.also]
        r = bench_model(args.model, args.method, cfg, args.tokens, args.repeats, args.calib, args.bf16, also)
        key = f"{args.model}/{_run_key(args.method, cfg)}"
        data.setdefault("end_to_end", {})[key] = r
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    print(f"wrote {out}")
    if data.get("end_to_end") and args.md:
        write_prefill_table(data["end_to_end"], Path(args.md))
        print(f"wrote the prefill table in {args.md}")
        if any("same_run" in r for r in data["end_to_end"].values()):
            write_same_run_table(data["end_to_end"], Path(args.md))
            print(f"wrote the same-run table in {args.md}")
    if args.layers and args.md:
        write_layer_table(data["layers"], data["layers_env"], Path(args.md))
        print(f"wrote the per-layer table in {args.md}")
    if args.gemm and args.md:
        write_gemm_table(data["gemm"], data["gemm_env"], Path(args.md))
        print(f"wrote the int8 GEMM table in {args.md}")


def _cell(t: dict | None) -> str:
    return f"{t['median_ms']:.2f} ({t['min_ms']:.2f}-{t['max_ms']:.2f})" if t else "-"


def write_gemm_table(gemm: dict, env: dict, md_path: Path) -> None:
    """Markdown table of the per-shape int8 GEMM timings between the ``prefill-gemm`` markers."""
    from lowbit.utils import write_between_markers

    flags = ", ".join(f for f, on in (env.get("cpu_flags") or {}).items() if on) or "?"
    lines = [(f"Generated by `scripts/bench_w8a8.py --gemm ...` from `docs/results/flatquant_speed.json`: "
              f"{env.get('date', '?')}, torch {env.get('torch')}, {env.get('threads')} threads, CPU capability "
              f"{env.get('cpu_capability')} ({flags}), load average {env.get('loadavg_1m')} at the start; random "
              "weights and codes; ms as median (min-max). library = `int_mm` with the backend its dispatcher "
              "picked; torch = `torch._int_mm` on the stored (N, K) rows read as a (K, N) view; hand = the "
              "C++ kernel; torch (K,N) copy = `torch._int_mm` on a contiguous transpose; W8A8 module = "
              "activation codes + GEMM + rescale."), "",
             ("| model | layer | in x out | tokens | fp32 ms | library ms (backend) | torch ms | hand ms "
              "| torch (K,N) copy ms | W8A8 module ms | fp32 / library |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, rows in gemm.items():
        for r in rows:
            t = r["times"]
            lines.append(f"| {model} | {r['layer']} | {r['in']}x{r['out']} | {r['tokens']} | {_cell(t.get('fp32'))} | "
                         f"{_cell(t.get('library'))} ({r['library_backend']}) | {_cell(t.get('torch'))} | "
                         f"{_cell(t.get('lowbit'))} | {_cell(t.get('torch_kn_contiguous'))} | "
                         f"{_cell(t.get('w8a8_module'))} | {r['fp32_over_library']:.2f}x |")
    write_between_markers(md_path, "\n".join(lines), tag="prefill-gemm")


def write_layer_table(layers: dict, env: dict, md_path: Path) -> None:
    """Markdown table of the per-layer timings between the ``prefill-layers`` markers."""
    from lowbit.utils import write_between_markers

    lines = [(f"Generated by `scripts/bench_w8a8.py --layers ...` from `docs/results/flatquant_speed.json`: "
              f"{env.get('date', '?')}, {env.get('threads')} threads, load average {env.get('loadavg_1m')} at the "
              "start; random weights "
              "and inputs, medians; W8A8/W4A4 int = the whole QuantizedActLinear forward (activation "
              "quantization, integer GEMM, rescale); int8 GEMM only = the integer kernel alone."), "",
             "| model | layer | in x out | tokens | fp32 ms | bf16 ms | W8A8 int ms | W4A4 int ms | int8 GEMM only ms | fp32 / W8A8 int |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model, rows in layers.items():
        for r in rows:
            lines.append(f"| {model} | {r['layer']} | {r['in']}x{r['out']} | {r['tokens']} | {r['fp32_ms']:.1f} | "
                         f"{r['bf16_ms']:.1f} | {r['w8a8_int_ms']:.1f} | {r['w4a4_int_ms']:.1f} | "
                         f"{r['gemm_int8_only_ms']:.1f} | {r['fp32_ms'] / r['w8a8_int_ms']:.2f}x |")
    write_between_markers(md_path, "\n".join(lines), tag="prefill-layers")


def _s_cell(sp: dict) -> str:
    return f"{sp['median_s']:.3f} ({sp['min_s']:.3f}-{sp['max_s']:.3f})"


def write_same_run_table(rows: dict, md_path: Path) -> None:
    """Markdown table of the runs that timed several quantized models beside fp32 (``--also``), between the
    ``prefill-same-run`` markers: every ratio in a run compares forwards timed alternately in one process."""
    from lowbit.utils import write_between_markers

    lines = [("Generated by `scripts/bench_w8a8.py --model M --method A --also B` from "
              "`docs/results/flatquant_speed.json`. Prefill of batch x 512 random tokens; fp32 and each quantized "
              "model timed in turn in one process, after one warm-up round; seconds per forward as median "
              "(min-max); x fp32 = median of the per-round ratios fp32 time / model time."), "",
             "| model | run | config | tokens | s per forward | tok/s | x fp32 | stored MiB | threads | date |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for key in sorted(k for k, r in rows.items() if "same_run" in r):
        r = rows[key]
        run = key.split("/", 1)[1]
        common = f"| {r['tokens']} |"
        lines.append(f"| {r['model']} | {run} | fp32 {common} {_s_cell(r['fp32_spread'])} | {r['fp32_tok_s']:.1f} "
                     f"| 1.00x | {r['fp32_mib']:.1f} | {r['threads']} | {r['date']} |")
        lines.append(f"| {r['model']} | {run} | {run} {common} {_s_cell(r['int_spread'])} | {r['int_tok_s']:.1f} "
                     f"| {r['int_vs_fp32']:.2f}x | {r['int_mib']:.1f} | {r['threads']} | {r['date']} |")
        for k, o in r["same_run"].items():
            lines.append(f"| {r['model']} | {run} | {k} {common} {_s_cell(o['int_spread'])} | {o['int_tok_s']:.1f} "
                         f"| {o['int_vs_fp32']:.2f}x | {o['int_mib']:.1f} | {r['threads']} | {r['date']} |")
    write_between_markers(md_path, "\n".join(lines), tag="prefill-same-run")


def write_prefill_table(rows: dict, md_path: Path) -> None:
    """Markdown table of the end-to-end rows (each ratio within one process) between the ``prefill`` markers."""
    from lowbit.utils import write_between_markers

    lines = [("Generated by `scripts/bench_w8a8.py` from `docs/results/flatquant_speed.json`. Prefill of "
              "batch x 512 random tokens; fp32 and the integer path timed alternately in the same process "
              "(medians; integer / fp32 = median of the per-pair ratios); model MiB: stored tensors."), "",
             ("| model | config | tokens | fp32 tok/s | integer path tok/s | integer / fp32 | INT4 share of MACs "
              "| flattened columns | fp32 MiB | quantized MiB | int8 GEMM weights / fp32 | peak RSS MiB | threads "
              "| load avg |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in sorted(rows):
        r = rows[key]
        act = r.get("act_linears") or {}
        cfg = key.split("/", 1)[1]
        mib = [f"{r[k]:.1f}" if k in r else "-" for k in ("fp32_mib", "int_mib")]
        mem = r.get("memory") or {}
        w_ratio = (f"{mem['int8_gemm_weights_mib'] / mem['fp32_weights_of_those_mib']:.2f}x"
                   if mem.get("fp32_weights_of_those_mib") else "-")
        peak = mem.get("peak_rss_mib") or "-"
        lines.append(f"| {r['model']} | {cfg} | {r['tokens']} | {r['fp32_tok_s']:.1f} | {r['int_tok_s']:.1f} | "
                     f"{r['int_vs_fp32']:.2f}x | {100 * act.get('int4_share', 0):.1f}% | "
                     f"+{100 * act.get('flatten_overhead', 0):.1f}% | {mib[0]} | {mib[1]} | {w_ratio} | {peak} | "
                     f"{r.get('threads', '-')} | "
                     f"{r.get('loadavg_1m', '-')} |")
    write_between_markers(md_path, "\n".join(lines), tag="prefill")


if __name__ == "__main__":
    main()
