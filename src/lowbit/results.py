"""Results files: one JSON per run in ``docs/results/``, and a markdown table built from them."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .errors import DataError
from .utils import atomic_write_text

__all__ = ["write_result", "load_results", "render_table", "write_table", "result_name", "source_label",
           "generated_note"]

log = logging.getLogger(__name__)

DEFAULT_DIR = Path("docs/results")


def result_name(res: dict) -> str:
    parts = [res["model"], res["method"]]
    if res.get("tag"):
        parts.append(res["tag"])
    return "__".join(p.replace("/", "_") for p in parts) + ".json"


def write_result(res: dict, results_dir: Path | str = DEFAULT_DIR) -> Path:
    """Write (or replace) one run's JSON; returns its path."""
    for k in ("model", "method", "config", "bpw", "ppl", "protocol", "quant_time_s", "peak_mem_gb", "lowbit_version"):
        if k not in res:
            raise ValueError(f"result is missing field {k!r}")
    path = Path(results_dir) / result_name(res)
    atomic_write_text(path, json.dumps(res, indent=1, sort_keys=True) + "\n")
    return path


def load_results(results_dir: Path | str = DEFAULT_DIR, any_version: bool = False) -> list[dict]:
    """Every run result (a JSON with ``model`` and ``ppl``) of the current protocol version in ``results_dir``
    (``any_version``: of every version); DataError on an unreadable file. Older results are skipped with a log
    line: they were measured on other texts and tasks (docs/evaluation.md), so they never share a table."""
    from .eval.ppl import PROTOCOL_VERSION

    out, old = [], []
    for p in sorted(Path(results_dir).glob("*.json")):
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"results file {p} cannot be read ({e}); fix it, or delete it and rerun its command") from None
        if isinstance(d, dict) and "model" in d and "ppl" in d:
            if any_version or d.get("protocol_version", 1) == PROTOCOL_VERSION:
                out.append(d)
            else:
                old.append(p.name)
    if old:
        log.warning("skipped %d results of an older protocol version in %s (e.g. %s); rerun them to compare",
                    len(old), results_dir, old[0])
    return out


def _fmt(x, nd=2):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


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
            cells = [r["method"], r.get("tag", "") or "-", _fmt(r["bpw"]["blocks"], 3), _fmt(r["bpw"]["all_in"], 3)]
            cells += [_fmt(r["ppl"].get(c)) for c in corpora]
            cells += [_fmt(r.get("quant_time_s"), 1), _fmt(r.get("peak_mem_gb"), 2), device_label(r)]
            if zs:
                avg = r.get("zeroshot_avg")
                cells.append(f"{avg['acc']:.3f} ({avg['n_tasks']})" if avg else "-")
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
