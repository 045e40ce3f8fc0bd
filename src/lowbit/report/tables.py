"""The per-run results table (``docs/results.md``) and the helpers every generated page shares."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..eval.record import DEFAULT_DIR, load_results
from ..utils import atomic_write_text

__all__ = ["device_label", "fmt_num", "generated_note", "ppl_cell", "render_table", "source_label", "write_table",
           "zs_avg"]


def fmt_num(x, nd=2):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def ppl_cell(r: dict, corpus: str | None) -> str:
    """Run ``r``'s perplexity on ``corpus`` for a table: ``n/a`` where the run recorded a non-finite one (null, the
    reason under ``nonfinite``), ``-`` where it has none."""
    ppl = r.get("ppl") or {}
    return "n/a" if corpus in ppl and ppl[corpus] is None else fmt_num(ppl.get(corpus))


def zs_avg(r: dict) -> str:
    """A run's mean zero-shot accuracy and its number of tasks, ``-`` without zero-shot results."""
    avg = r.get("zeroshot_avg")
    return f"{avg['acc']:.3f} ({avg['n_tasks']})" if avg else "-"


def device_label(r: dict) -> str:
    """``cpu`` or the GPU's name, from the run's env (runs recorded before ``--device`` existed ran on the CPU)."""
    dev = (r.get("env") or {}).get("device", "cpu")
    return dev[dev.find("(") + 1 : -1].replace("NVIDIA ", "") if "(" in dev else dev


def source_label(results_dir: Path | str, index: Path | str) -> str:
    """How a generated index at ``index`` names ``results_dir``: relative to the folder above the index's
    own, so ``docs/results.md`` says ``docs/results`` and ``out/results.md`` says ``out/demo``."""
    return Path(os.path.relpath(Path(results_dir).resolve(), Path(index).resolve().parent.parent)).as_posix()


def generated_note(source: str) -> str:
    """The opening sentence of every generated index: which results folder it was built from."""
    return f"Generated from `{source}/*.json` by `lowbit report`; do not edit by hand."


def render_table(results: list[dict], source: str = DEFAULT_DIR.as_posix()) -> str:
    """A markdown table per model, sorted by method then bpw. Deterministic for the same files.

    ``source`` is the results folder the table is generated from, named in its header.
    """
    note = ("Quantization time and peak memory depend on the device column (GPU peak = CUDA max allocated, "
            "CPU peak = process RSS); GPU grids ran several points at once on one GPU, so their times are upper bounds.")
    note += " n/a: the perplexity was not finite (the reason is under `nonfinite` in the run's JSON)."
    lines = ["# Results", "", generated_note(source), note, ""]
    for model in sorted({r["model"] for r in results}):
        rows = [r for r in results if r["model"] == model]
        corpora = sorted({c for r in rows for c in r["ppl"]})
        lines += [f"## {model}", ""]
        protos = sorted({json.dumps({c: {k: v for k, v in p.items() if k in ("seqlen", "n_windows", "bos")}
                                     for c, p in r["protocol"].items()}, sort_keys=True) for r in rows})
        lines.append("Protocol: " + "; ".join(protos) + ". Calibration, seed and format per row in the JSON files.")
        lines.append("")
        zs = any(r.get("zeroshot_avg") for r in rows)
        head = ["method", "config", "bpw (blocks)", "bpw (all-in)"] + [f"ppl {c}" for c in corpora]
        head += ["quant time (s)", "peak mem (GB)", "device"]
        head += ["zero-shot acc (tasks)"] if zs else []
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        rows.sort(key=lambda r: (r["method"] != "fp32", r["method"], -r["bpw"]["blocks"], r.get("tag", "")))
        for r in rows:
            cells = [r["method"], r.get("tag", "") or "-", fmt_num(r["bpw"]["blocks"], 3), fmt_num(r["bpw"]["all_in"], 3)]
            cells += [ppl_cell(r, c) for c in corpora]
            cells += [fmt_num(r.get("quant_time_s"), 1), fmt_num(r.get("peak_mem_gb"), 2), device_label(r)]
            if zs:
                cells.append(zs_avg(r))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_table(results_dir: Path | str = DEFAULT_DIR, out: Path | str | None = None,
                results: list[dict] | None = None) -> Path:
    """Write ``results.md`` (default: beside ``results_dir``) from ``results`` (default: loaded from ``results_dir``)."""
    out = Path(out) if out else Path(results_dir).parent / "results.md"
    if results is None:
        results = load_results(results_dir)
    atomic_write_text(out, render_table(results, source=source_label(results_dir, out)))
    return out
