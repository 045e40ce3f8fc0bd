"""Plots for the generated pages: Pareto fronts (perplexity vs all-in bpw), the AFPQ grid and distillation
loss curves. PNGs carry no timestamp or software metadata, so the same results give byte-identical files."""
from __future__ import annotations

import math
from pathlib import Path


def primary_corpus(rows: list[dict]) -> str | None:
    """``wiki`` when any row has it, else the alphabetically first corpus."""
    corpora = sorted({c for r in rows for c in r.get("ppl", {})})
    return "wiki" if "wiki" in corpora else (corpora[0] if corpora else None)


def has_ppl(r: dict, corpus: str | None) -> bool:
    """Whether run ``r`` has a perplexity number on ``corpus`` (a diverged run records null there)."""
    return (r.get("ppl") or {}).get(corpus) is not None


AFPQ_COLUMNS = (("INT-asym", "int", False), ("FP-sym", "fp", True), ("FP-asym (AFPQ)", "fp", False),
                ("NF-sym", "nf", True), ("NF-asym", "nf", False))
AFPQ_SOLVERS = ("rtn", "gptq", "awq")
AFPQ_GRID = tuple((b, g) for b in (4, 3) for g in (128, 64, 32))

BPW_KEY = "all_in"   # x axis: bits per weight over all parameters (embedding and head included)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better on both).

    A point is dominated when another has ``x <= x_i`` and ``y <= y_i`` with one strict.
    Non-finite ``y`` (a diverged model) is never on the front.
    """
    front = []
    for i, (x, y) in enumerate(points):
        if not math.isfinite(y):
            continue
        dominated = any((xo <= x and yo <= y) and (xo < x or yo < y)
                        for j, (xo, yo) in enumerate(points) if j != i and math.isfinite(yo))
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def _label(r: dict) -> str:
    return r["method"] + (f" {r['tag']}" if r.get("tag") else "")


def plot_points(rows: list[dict], corpus: str) -> tuple[list[dict], list[tuple[float, float]]]:
    kept = [r for r in rows if has_ppl(r, corpus)]
    kept.sort(key=lambda r: (r["bpw"][BPW_KEY], _label(r)))
    return kept, [(float(r["bpw"][BPW_KEY]), float(r["ppl"][corpus])) for r in kept]


def plot_pareto(rows: list[dict], out: Path | str, corpus: str | None = None, title: str | None = None) -> Path:
    """Perplexity on ``corpus`` vs all-in bpw for ``rows`` (one model), the Pareto front drawn; a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    corpus = corpus or primary_corpus(rows)
    kept, pts = plot_points(rows, corpus) if corpus else ([], [])
    front = pareto_front(pts)
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)   # no pyplot, no global backend switch
    ax = fig.add_subplot()
    methods = sorted({r["method"] for r in kept})
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    finite = [(i, p) for i, p in enumerate(pts) if math.isfinite(p[1])]
    for m in methods:
        sel = [p for i, p in finite if kept[i]["method"] == m]
        ax.scatter([p[0] for p in sel], [p[1] for p in sel], color=colors[m], label=m, s=28, zorder=3)
    if front:
        fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
        ax.step(fx, fy, where="post", color="black", lw=1.2, zorder=2, label="Pareto front")
        ax.scatter(fx, fy, facecolors="none", edgecolors="black", s=90, lw=1.3, zorder=4)
        for i in front:
            ax.annotate(_label(kept[i]), pts[i], textcoords="offset points", xytext=(5, 4), fontsize=7)
    if finite:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        xs = sorted({p[0] for _, p in finite})
        ax.xaxis.set_major_locator(FixedLocator([t for t in (1, 2, 3, 4, 6, 8, 16, 32) if xs[0] / 1.2 <= t <= xs[-1] * 1.2]
                                                or xs))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("bits per weight (all-in: every parameter, embedding and head included)")
    ax.set_ylabel(f"perplexity ({corpus})" if corpus else "perplexity")
    ax.set_title(title or "perplexity vs bits per weight")
    ax.grid(True, which="both", alpha=0.3)
    if methods:
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return _save_png(fig, out)


def _save_png(fig, out: Path | str) -> Path:
    """Write ``fig`` to ``out`` atomically, without a version string (reproducible bytes)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", metadata={"Software": None})
    tmp.replace(out)
    return out


def loss_panels(csvs: list[Path]) -> dict[str, list[tuple[str, Path]]]:
    """Group loss CSVs by ``FORMAT-GROUP`` (see ``plot_loss_curves``): ``{panel: [(line label, path), ...]}``."""
    panels: dict[str, list[tuple[str, Path]]] = {}
    for path in sorted(Path(p) for p in csvs):
        parts = path.stem.split("__")[-1].split("-")
        key, label = ("-".join(parts[:2]), "-".join(parts[2:])) if len(parts) > 2 else ("", path.stem)
        panels.setdefault(key, []).append((label, path))
    return dict(sorted(panels.items()))


def plot_loss_curves(csvs: list[Path], out: Path | str, title: str = "distillation loss") -> Path:
    """Training loss against step for each ``step,loss,...`` CSV; a PNG.

    Files named ``MODEL__METHOD__FORMAT-GROUP-REST.csv`` (e.g. ``..__int2-g128-cakld-30steps``) are drawn
    one panel per ``FORMAT-GROUP``, one line per file labelled ``REST``; other names go to one panel.
    """
    import csv

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = loss_panels(csvs)
    n = max(len(panels), 1)
    fig = Figure(figsize=(min(4.2 * n, 14), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (key, items) in zip(axes, list(panels.items()) or [("", [])]):
        for i, (label, path) in enumerate(items):
            with open(path, newline="", encoding="utf-8") as fh:
                rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh)]
            ax.plot([r[0] for r in rows], [r[1] for r in rows], color=f"C{i % 10}", lw=1.3, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_title(key or title, fontsize=9)
        ax.grid(True, alpha=0.3)
        if items:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("training loss (each run's own objective)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_png(fig, out)


def plot_afpq(cell: dict[tuple, tuple[float, float]], out: Path | str, corpus: str, title: str) -> Path:
    """One model's AFPQ grid as a PNG: a panel per (bits, solver), perplexity against blocks bpw, one line per
    format (INT-asym; FP and NF with one scale dotted, hollow markers, and with two solid) through its group
    sizes. Panels of a row share the bpw axis; each has its own perplexity axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bits_rows = sorted({k[1] for k in cell}, reverse=True)
    fig = Figure(figsize=(4.0 * len(AFPQ_SOLVERS), 3.3 * len(bits_rows)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(bits_rows), len(AFPQ_SOLVERS), squeeze=False, sharex="row")
    colors = {"int": "C0", "fp": "C1", "nf": "C2"}
    for row, b in enumerate(bits_rows):
        for col, s in enumerate(AFPQ_SOLVERS):
            ax = axes[row][col]
            for label, f, sym in AFPQ_COLUMNS:
                pts = sorted(cell[(s, b, g, f, sym)][::-1] for bb, g in AFPQ_GRID if bb == b and (s, b, g, f, sym) in cell)
                pts = [(x, y) for x, y in pts if math.isfinite(y)]
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=4.5, lw=1.3, color=colors[f],
                            ls=":" if sym else "-", mfc="white" if sym else colors[f], label=label)
            ax.set_title(f"{s.upper()}, {b}-bit", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=7)
            if row == len(bits_rows) - 1:
                ax.set_xlabel("bits per weight (blocks)", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"perplexity ({corpus})", fontsize=8)
            if ax.lines:
                ax.legend(fontsize=6)
    fig.suptitle(f"{title}: points left to right are groups of 128, 64, 32", fontsize=9)
    fig.tight_layout()
    return _save_png(fig, out)
