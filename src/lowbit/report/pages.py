"""Reports rebuilt from the results JSON files alone: results table, leaderboard, Pareto plots.

``write_report(results_dir)`` writes, next to ``results_dir`` (``docs/``):

- ``results.md``: :func:`lowbit.report.tables.render_table` (every run, every corpus);
- ``leaderboard.md``: per model, the runs sorted by all-in bpw with the
  primary-corpus perplexity, the mean zero-shot accuracy, a Pareto mark, the
  per-task zero-shot table, and the model's Pareto plot embedded;
- ``plots/pareto_<model>.png``: perplexity vs bits per weight, front highlighted;
- ``comparisons.md``: method x format tables, the AFPQ grid (with ``plots/afpq_<model>.png``), distillation
  and VPTQ tables; the AFPQ grid also goes between the ``<!-- afpq:begin/end -->`` markers of ``formats.md``.

Output depends only on the JSON files: rows are sorted, floats formatted at
fixed precision, and PNGs carry no timestamp or software metadata, so the
same files give byte-identical reports (for one matplotlib version).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import DataError
from ..eval.record import DEFAULT_DIR, load_results
from ..utils import atomic_write_text, write_between_markers
from .plots import AFPQ_COLUMNS, AFPQ_GRID, AFPQ_SOLVERS, BPW_KEY, has_ppl, plot_points, primary_corpus, pareto_front, plot_afpq, plot_loss_curves, plot_pareto
from .tables import fmt_num, generated_note, ppl_cell, source_label, write_table, zs_avg

__all__ = ["afpq_cells", "primary_corpus", "render_afpq", "render_comparisons", "render_distillation", "render_leaderboard",
           "render_vector_quantization", "write_report"]


def _slug(model: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model)


def _per_model(results: list[dict], methods=None):
    """``(model, its runs, their primary corpus)`` for each model in name order; ``methods``: only their runs."""
    for model in sorted({r["model"] for r in results}):
        rows = [r for r in results if r["model"] == model and (methods is None or r["method"] in methods)]
        yield model, rows, primary_corpus(rows)


def render_leaderboard(results: list[dict], plots: dict[str, str] | None = None,
                       source: str = DEFAULT_DIR.as_posix()) -> str:
    """The leaderboard markdown: per model, runs by all-in bpw; ``plots`` maps model -> image path."""
    intro = (f"{generated_note(source)} "
             "bpw all-in counts every parameter (embedding, head, norms at their storage width); "
             "Pareto = no other run has both fewer bits (all-in) and lower perplexity. "
             "Zero-shot: mean accuracy over tasks (number of tasks); protocol in `docs/evaluation.md`.")
    lines = ["# Leaderboard", "", intro, ""]
    for model, rows, corpus in _per_model(results):
        kept, pts = plot_points(rows, corpus) if corpus else ([], [])
        on_front = {id(kept[i]) for i in pareto_front(pts)}
        lines += [f"## {model}", ""]
        if plots and model in plots:
            lines += [f"![{model}: perplexity vs bpw]({plots[model]})", ""]
        head = ["method", "config", "bpw (blocks)", "bpw (all-in)", f"ppl {corpus}", "zero-shot acc", "Pareto"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        rows.sort(key=lambda r: (-r["bpw"][BPW_KEY], r["method"], r.get("tag", "")))
        for r in rows:
            lines.append("| " + " | ".join([r["method"], r.get("tag", "") or "-", fmt_num(r["bpw"]["blocks"], 3),
                                            fmt_num(r["bpw"][BPW_KEY], 3), ppl_cell(r, corpus), zs_avg(r),
                                            "yes" if id(r) in on_front else ""]) + " |")
        lines.append("")
        zs_rows = [r for r in rows if r.get("zeroshot")]
        if zs_rows:
            tasks = sorted({t for r in zs_rows for t in r["zeroshot"]})
            protos = sorted({json.dumps({k: (r.get("zeroshot_protocol") or {}).get(k) for k in ("limit", "seed")},
                                        sort_keys=True) for r in zs_rows})
            lines += [f"Zero-shot accuracy per task (acc / acc_norm; items per task and seed: {'; '.join(protos)}):", ""]
            head = ["method", "config", *tasks]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            chance = {t: next(r["zeroshot"][t]["chance"] for r in zs_rows if t in r["zeroshot"]) for t in tasks}
            lines.append("| chance | - | " + " | ".join(f"{chance[t]:.3f}" for t in tasks) + " |")
            for r in zs_rows:
                cells = [f"{r['zeroshot'][t]['acc']:.3f} / {r['zeroshot'][t]['acc_norm']:.3f}"
                         if t in r["zeroshot"] else "-" for t in tasks]
                lines.append("| " + " | ".join([r["method"], r.get("tag", "") or "-", *cells]) + " |")
            lines.append("")
    return "\n".join(lines)


#: weight-only methods compared format by format in comparisons.md
PIVOT_METHODS = ("rtn", "clip", "gptq", "awq")
_FORMAT_ORDER = {"int": 0, "fp": 1, "nf": 2}


def _fmt_key(fmt: dict) -> tuple:
    g = fmt.get("group_size", 128)
    return (-fmt.get("bits", 0), -(g if g > 0 else 10**6), _FORMAT_ORDER.get(fmt.get("format"), 9), not fmt.get("sym"))


def _plain_format_runs(rows: list[dict], corpus: str | None):
    """``(run, fmt)`` for the runs with a perplexity on ``corpus`` whose tag is exactly their format's tag
    (no method options, no quantized embedding or head)."""
    from ..config import FormatConfig

    for r in rows:
        fmt = (r.get("config") or {}).get("fmt")
        if fmt and has_ppl(r, corpus) and r.get("tag") == FormatConfig(**fmt).tag():
            yield r, fmt


def render_comparisons(results: list[dict], afpq_plots: dict[str, str] | None = None,
                       source: str = DEFAULT_DIR.as_posix()) -> str:
    """Per model: one row per weight format, one perplexity column per weight-only method (default settings).

    Rows are the runs whose tag is exactly the format tag (no method options,
    no quantized embedding or head), so every cell of a row has the same bpw.
    """
    intro = (f"{generated_note(source)} One row per weight format, "
             "one column per weight-only method at its default settings; cells are perplexity on the model's first "
             "corpus (protocol in `results.md`). `asym` = asymmetric INT, or two scales (positive and negative "
             "halves, AFPQ) for FP/NF; `sym` = one scale. A dash: not run.")
    lines = ["# Method x format comparisons", "", intro, ""]
    for model, rows, corpus in _per_model(results, PIVOT_METHODS):
        cells: dict[tuple, dict] = {}
        for r, fmt in _plain_format_runs(rows, corpus):
            key = tuple(sorted(fmt.items()))
            cells.setdefault(key, {"fmt": fmt, "bpw": r["bpw"]["blocks"]})[r["method"]] = r["ppl"][corpus]
        if not cells:
            continue
        methods = [m for m in PIVOT_METHODS if any(m in c for c in cells.values())]
        lines += [f"## {model} (ppl {corpus})", "",
                  "| format | bits | group | scales | bpw (blocks) | " + " | ".join(methods) + " | best |",
                  "|---|---|---|---|---|" + "---|" * (len(methods) + 1)]
        for c in sorted(cells.values(), key=lambda c: _fmt_key(c["fmt"])):
            f = c["fmt"]
            have = {m: c[m] for m in methods if m in c}
            best = min(have, key=have.get) if len(have) > 1 else "-"
            lines.append(f"| {f['format'].upper()} | {f['bits']} | {'pc' if f['group_size'] == -1 else f['group_size']} | "
                         f"{'sym' if f.get('sym') else 'asym'} | {c['bpw']:.3f} | "
                         + " | ".join(_fmt_ppl(c.get(m)) for m in methods) + f" | {best} |")
        lines.append("")
    lines += render_afpq(results, afpq_plots)
    lines += render_distillation(results)
    lines += render_vector_quantization(results)
    return "\n".join(lines)


#: the AFPQ table's columns: (label, format, sym) — INT-asym, FP and NF with one scale and with two


def afpq_cells(results: list[dict]) -> dict[str, tuple[str, dict[tuple, tuple[float, float]]]]:
    """The AFPQ grid's cells per model: ``{model: (corpus, {(solver, bits, group, format, sym): (ppl, bpw)})}``.

    Only models with at least one FP/NF cell; only runs whose tag is exactly the format tag; bpw is the blocks'.
    """
    out = {}
    for model, rows, corpus in _per_model(results, AFPQ_SOLVERS):
        cell: dict[tuple, tuple[float, float]] = {}
        for r, fmt in _plain_format_runs(rows, corpus):
            key = (r["method"], fmt.get("bits"), fmt.get("group_size"), fmt.get("format"), bool(fmt.get("sym")))
            if (key[1], key[2]) in AFPQ_GRID:
                cell[key] = (r["ppl"][corpus], r["bpw"]["blocks"])
        if any(k[3] in ("fp", "nf") for k in cell):
            out[model] = (corpus, cell)
    return out


def render_afpq(results: list[dict], plots: dict[str, str] | None = None, header: bool = True) -> list[str]:
    """The AFPQ table: per model and solver, rows (bits, group), one column per format, cells ppl (bpw).

    Shown for each model with at least one FP/NF run of the grid (``recipes/afpq_grid.yaml``). The best
    cell of each row is bold; under each model, counts of the (solver, bits, group) points where two
    scales beat one (FP and NF separately) and where the best cell is a two-scale format, over the
    points that have all the cells compared. Only runs whose tag is exactly the format tag count.
    ``plots``: ``{model: path of its plot_afpq PNG, relative to the document}``, embedded under the table.
    ``header=False`` leaves out the section title and its introduction (for embedding in another page).
    """
    out: list[str] = []
    grid = afpq_cells(results)
    if grid and header:
        out += ["## Number formats (AFPQ): one scale against two", "",
                "The grid of `recipes/afpq_grid.yaml`: INT-asym, FP and NF with one fp16 scale per group (sym) "
                "and with two (asym: positive and negative halves, AFPQ), under RTN, GPTQ and AWQ. Cells: "
                "perplexity (blocks bpw); bold: best of the row. FP3 is {0, ±1, ±2, ±4} "
                "(`docs/formats.md`). A dash: not run.", ""]
    for model, (corpus, cell) in grid.items():
        fp32 = _fp32_ppl([r for r in results if r["model"] == model], corpus)
        n_cells = sum(1 for s in AFPQ_SOLVERS for bg in AFPQ_GRID for _, f, sym in AFPQ_COLUMNS
                      if (s, *bg, f, sym) in cell)
        total = len(AFPQ_SOLVERS) * len(AFPQ_GRID) * len(AFPQ_COLUMNS)
        out += [f"### {model} (ppl {corpus}; fp32 {_fmt_ppl(fp32)}; {n_cells} of {total} cells run)", "",
                "| solver | bits | group | " + " | ".join(c[0] for c in AFPQ_COLUMNS) + " |",
                "|---|---|---|" + "---|" * len(AFPQ_COLUMNS)]
        wins = {"fp": [0, 0], "nf": [0, 0]}
        same_bits = {"fp": [0, 0], "nf": [0, 0]}   # two scales at group g against one scale at g/2: equal bpw
        best_two = [0, 0]
        for s in AFPQ_SOLVERS:
            for b, g in AFPQ_GRID:
                have = {(f, sym): cell[(s, b, g, f, sym)] for _, f, sym in AFPQ_COLUMNS if (s, b, g, f, sym) in cell}
                if not have:
                    continue
                best = min(have, key=lambda k: have[k][0])
                texts = []
                for _, f, sym in AFPQ_COLUMNS:
                    if (f, sym) not in have:
                        texts.append("-")
                        continue
                    ppl, bpw = have[(f, sym)]
                    t = f"{_fmt_ppl(ppl)} ({bpw:.3f})"
                    texts.append(f"**{t}**" if (f, sym) == best and len(have) > 1 else t)
                out.append(f"| {s} | {b} | {g} | " + " | ".join(texts) + " |")
                for f in ("fp", "nf"):
                    if (f, True) in have and (f, False) in have:
                        wins[f][1] += 1
                        wins[f][0] += have[(f, False)][0] < have[(f, True)][0]
                    half = cell.get((s, b, g // 2, f, True))
                    if (f, False) in have and half is not None:
                        same_bits[f][1] += 1
                        same_bits[f][0] += have[(f, False)][0] < half[0]
                if len(have) == len(AFPQ_COLUMNS):
                    best_two[1] += 1
                    best_two[0] += best[0] != "int" and not best[1]
        out.append("")
        out.append(f"Two scales beat one at the same bits and group: FP {wins['fp'][0]} of {wins['fp'][1]}, "
                   f"NF {wins['nf'][0]} of {wins['nf'][1]} (solver, bits, group) points. At equal bpw (two scales "
                   f"at group g against one scale at g/2): FP {same_bits['fp'][0]} of {same_bits['fp'][1]}, NF "
                   f"{same_bits['nf'][0]} of {same_bits['nf'][1]}. The best cell of a complete row is a two-scale "
                   f"format in {best_two[0]} of {best_two[1]} rows (at 16/group more bits than one scale).")
        out.append("")
        if plots and model in plots:
            out += [f"![{model}: AFPQ grid, perplexity vs bpw]({plots[model]})", ""]
    return out


#: scalar runs shown beside VPTQ: (method, format tag), the issue's GPTQ int2/int3 at g128 and g64
_VQ_BESIDE = tuple((m, f"int{b}-g{g}") for m in ("gptq", "awq") for b in (2, 3) for g in (128, 64))


def render_vector_quantization(results: list[dict]) -> list[str]:
    """Per model: every ``vptq`` run beside GPTQ/AWQ int2/int3 (g128, g64), with bpw itemised by kind.

    Item columns are bits per block weight of each kind of stored buffer (``lowbit.nn.bpw.ITEM_KINDS``):
    they sum to the blocks bpw. Runs recorded before itemised accounting show dashes there.
    """
    from ..nn.bpw import ITEM_KINDS, item_kind

    out: list[str] = []
    for model, rows, corpus in _per_model(results):
        vq = [r for r in rows if r["method"] == "vptq" and has_ppl(r, corpus)]
        if not vq:
            continue
        if not out:
            out += ["## Vector quantization (VPTQ): where the bits go", "",
                    "Every VPTQ run beside GPTQ and AWQ at int2/int3 (g128, g64). Item columns are bits per block "
                    "weight of each kind of stored buffer: codes (indices, residual indices), codebooks (main and "
                    "residual, fp16), scales (fp16 scales and packed zero points), outliers (outlier columns' "
                    "indices, codebook and column list), norms (per-column scale and bias), other (biases); they "
                    "sum to the blocks bpw. Quantization time is the recorded wall time (device and notes in each "
                    "result JSON).", ""]
        beside = [r for r in rows if (r["method"], r.get("tag")) in _VQ_BESIDE and has_ppl(r, corpus)]
        named = {n for r in vq + beside for n in ((r.get("bpw_detail") or {}).get("blocks_items") or {})}
        kinds = [k for k, _ in ITEM_KINDS] + (["other"] if any(item_kind(n) == "other" for n in named) else [])
        fp32 = _fp32_ppl(rows, corpus)
        out += [f"### {model} (ppl {corpus}; fp32 {_fmt_ppl(fp32)})", "",
                "| method | config | " + " | ".join(kinds) + " | bpw (blocks) | ppl | zero-shot acc | quant time (s) |",
                "|---|---|" + "---|" * len(kinds) + "---|---|---|---|"]
        for r in sorted(vq + beside, key=lambda r: (r["bpw"]["blocks"], r["method"], r.get("tag", ""))):
            detail = r.get("bpw_detail") or {}
            items = detail.get("blocks_items")
            cells = ["-"] * len(kinds)
            if items:
                per = {k: 0 for k in kinds}
                for name, bits in items.items():
                    per[item_kind(name)] += bits
                cells = [f"{per[k] / detail['blocks_weights']:.3f}" for k in kinds]
            out.append(f"| {r['method']} | {r.get('tag') or '-'} | " + " | ".join(cells)
                       + f" | {r['bpw']['blocks']:.3f} | {_fmt_ppl(r['ppl'][corpus])} | {zs_avg(r)} | "
                       f"{r.get('quant_time_s', 0):.0f} |")
        out.append("")
    return out


def render_distillation(results: list[dict]) -> list[str]:
    """Per model and format with distilled runs: the PTQ runs of that format, then every distillation run.

    PTQ rows are the pivot methods' runs of exactly that format (any calibration, stated per row);
    distilled rows are ``bitdistiller`` runs, one per (init, loss, steps, seqlen). ``gap closed`` is the
    share of the log-perplexity gap between the run's own init and fp32 that the run closes.
    """
    from ..config import FormatConfig

    out: list[str] = []
    for model, rows, corpus in _per_model(results):
        bd = [r for r in rows if r["method"] == "bitdistiller" and has_ppl(r, corpus)]
        if not bd:
            continue
        fp32 = _fp32_ppl(rows, corpus)
        if not out:
            out += ["## Quantization-aware distillation (BitDistiller)", "",
                    "Per format: the post-training runs of that format, then the distilled students "
                    "(`lowbit distill`). `gap closed` = 1 - log(ppl / ppl fp32) / log(ppl init / ppl fp32), with "
                    "the init run of the same format and the same calibration (a dash where that run is missing). "
                    "Budget: optimizer steps x batch x tokens per window, and the teacher-generated sequences "
                    "trained on. Calibration: windows x tokens of the PTQ run or of the student's init.", ""]
        fmts = sorted({tuple(sorted(r["config"]["fmt"].items())) for r in bd}, key=lambda k: _fmt_key(dict(k)))
        for key in fmts:
            fmt = dict(key)
            same = [r for r in rows if (r.get("config") or {}).get("fmt") == fmt and has_ppl(r, corpus)]
            ptq = sorted((r for r in same if r["method"] in PIVOT_METHODS and r.get("tag") == FormatConfig(**fmt).tag()),
                         key=lambda r: PIVOT_METHODS.index(r["method"]))
            dist = sorted((r for r in same if r["method"] == "bitdistiller"),
                          key=lambda r: tuple(str(r["config"]["method_config"].get(k)) for k in ("init", "steps", "loss")))
            out += [f"### {model}: {FormatConfig(**fmt).tag()} (ppl {corpus}; fp32 {_fmt_ppl(fp32)})", "",
                    "| run | init | loss | budget | calibration | bpw (blocks) | ppl | gap closed | zero-shot acc |",
                    "|---|---|---|---|---|---|---|---|---|"]

            def calib(r):
                c = (r.get("config") or {}).get("calib") or {}
                return f"{c['nsamples']} x {c['seqlen']}" if c else "-"

            for r in ptq:
                out.append(f"| PTQ {r['method']} | - | - | - | {calib(r)} | {r['bpw']['blocks']:.3f} | "
                           f"{_fmt_ppl(r['ppl'][corpus])} | - | {zs_avg(r)} |")
            for r in dist:
                mc = r["config"]["method_config"]
                init = next((p for p in ptq if p["method"] == mc.get("init") and calib(p) == calib(r)), None)
                gap = "-"
                if init is not None and fp32 and init["ppl"][corpus] > fp32:
                    frac = 1 - math.log(r["ppl"][corpus] / fp32) / math.log(init["ppl"][corpus] / fp32)
                    gap = f"{100 * frac:.0f}%"
                out.append(f"| distilled | {mc.get('init')} | {mc.get('loss')} | {_budget(r)} | "
                           f"{calib(r)} | {r['bpw']['blocks']:.3f} | {_fmt_ppl(r['ppl'][corpus])} | {gap} | {zs_avg(r)} |")
            out.append("")
    return out


def _budget(r: dict) -> str:
    """Training budget of a distilled run: steps x batch x window tokens, and the teacher sequences."""
    d, mc = r.get("distill") or {}, r["config"]["method_config"]
    if "batch_size" not in d:
        return f"{mc.get('steps')} steps, seqlen {mc.get('seqlen')}"
    batch = d["batch_size"] * d.get("grad_accum", 1)
    teacher = f", {d['teacher_samples']} teacher seqs" if "teacher_samples" in d else ""
    return f"{mc.get('steps')} x {batch} x {mc.get('seqlen')}{teacher}"


def _fp32_ppl(rows: list[dict], corpus: str | None) -> float | None:
    """Perplexity of the model's fp32 run on ``corpus``, or None when there is none."""
    return next((r["ppl"][corpus] for r in rows if r["method"] == "fp32" and has_ppl(r, corpus)), None)


def _fmt_ppl(x) -> str:
    return "-" if x is None else (f"{x:.2f}" if x < 1e4 else f"{x:.3g}")


def write_report(results_dir: Path | str = "docs/results", docs_dir: Path | str | None = None) -> dict[str, Path]:
    """Rebuild ``results.md``, ``comparisons.md``, ``leaderboard.md``, ``plots/*.png`` and the generated part of
    ``formats.md`` from ``results_dir``."""
    results_dir = Path(results_dir)
    docs = Path(docs_dir) if docs_dir else results_dir.parent
    results = load_results(results_dir)
    if not results:
        why = "does not exist" if not results_dir.is_dir() else "holds no results JSON"
        raise DataError(f"results folder {results_dir} {why}; write results with `lowbit run` or `lowbit eval` "
                        f"(--results-dir), or pass the folder that holds them")
    out = {"results": write_table(results_dir, docs / "results.md", results)}
    plots_dir = docs / "plots"
    plots: dict[str, str] = {}
    made = set()
    for model, rows, corpus in _per_model(results):
        if corpus is None:
            continue
        png = plot_pareto(rows, plots_dir / f"pareto_{_slug(model)}.png", title=f"{model}: perplexity vs bits per weight")
        plots[model] = png.relative_to(docs).as_posix()
        out[f"plot:{model}"] = png
        made.add(png.name)
    losses = sorted((results_dir / "loss").glob("*.csv")) if (results_dir / "loss").is_dir() else []
    for model in sorted({p.name.split("__")[0] for p in losses}):
        png = plot_loss_curves([p for p in losses if p.name.startswith(model + "__")],
                               plots_dir / f"loss_{_slug(model)}.png", title=f"{model}: distillation loss")
        out[f"loss:{model}"] = png
        made.add(png.name)
    afpq_plots: dict[str, str] = {}
    for model, (corpus, cell) in afpq_cells(results).items():
        png = plot_afpq(cell, plots_dir / f"afpq_{_slug(model)}.png", corpus, title=f"{model}, AFPQ grid")
        afpq_plots[model] = png.relative_to(docs).as_posix()
        out[f"afpq:{model}"] = png
        made.add(png.name)
    for pattern in ("pareto_*.png", "loss_*.png", "afpq_*.png"):   # plots of models or runs no longer in the results
        for stale in plots_dir.glob(pattern) if plots_dir.is_dir() else []:
            if stale.name not in made:
                stale.unlink()
    out["comparisons"] = docs / "comparisons.md"
    source = source_label(results_dir, out["comparisons"])   # the indexes below all sit in `docs`
    atomic_write_text(out["comparisons"], render_comparisons(results, afpq_plots, source=source) + "\n")
    # formats.md keeps its prose; only the part between its afpq markers is generated
    if write_between_markers(docs / "formats.md", "\n".join(render_afpq(results, afpq_plots, header=False)).strip(),
                             tag="afpq", append=False):
        out["formats"] = docs / "formats.md"
    out["leaderboard"] = docs / "leaderboard.md"
    atomic_write_text(out["leaderboard"], render_leaderboard(results, plots, source=source) + "\n")
    return out
