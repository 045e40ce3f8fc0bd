"""Where quantization time goes: seconds and FLOPs per block and stage, against the machine's GEMM rate.

The engine times its stages (input capture, forward replay, statistics accumulation, the method's block step,
solver, packing, resume saves, host-device copies) with :meth:`Profile.stage`. Stages nest and record
*exclusive* time (the statistics hooks run inside the forward; their seconds are not counted twice), so the stages
of a run add up to its wall time. FLOPs are the analytic counts of the GEMMs a stage must do (:func:`block_flops`,
:func:`hessian_flops`, :func:`feedback_flops`), not measured; a stage without a count has ``flops`` 0.
:func:`gemm_rate` measures fp32 ``torch.matmul`` at one shape in the same process, so ``achieved`` compares like
with like.
"""
from __future__ import annotations

import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["Profile", "gemm_rate", "block_flops", "hessian_flops", "feedback_flops"]

STAGES = ("capture", "forward", "stats", "prepare", "solver", "packing", "finish", "resume_save", "copies")


class Profile:
    """Seconds, FLOPs and calls per ``(block, stage)``; block -1 is the whole-model part (capture)."""

    def __init__(self):
        self.rows: dict[tuple[int, str], list[float]] = {}   # (block, stage) -> [seconds, flops, calls]
        self._stack: list[list[float]] = []                  # per open stage: [start, child seconds]
        self.gemm: dict | None = None
        self.meta: dict = {}

    @contextmanager
    def stage(self, name: str, block: int = -1, flops: float = 0.0):
        self._stack.append([time.perf_counter(), 0.0])
        try:
            yield
        finally:
            start, child = self._stack.pop()
            dt = time.perf_counter() - start
            if self._stack:
                self._stack[-1][1] += dt
            row = self.rows.setdefault((block, name), [0.0, 0.0, 0])
            row[0] += dt - child
            row[1] += flops
            row[2] += 1

    def totals(self) -> dict[str, dict]:
        """Per stage: seconds, GFLOP and GFLOP/s summed over blocks."""
        out: dict[str, dict] = {}
        for (_, name), (s, f, n) in self.rows.items():
            t = out.setdefault(name, {"seconds": 0.0, "gflop": 0.0, "calls": 0})
            t["seconds"] += s
            t["gflop"] += f / 1e9
            t["calls"] += n
        for t in out.values():
            t["gflop_per_s"] = t["gflop"] / t["seconds"] if t["seconds"] > 0 and t["gflop"] > 0 else None
        return {k: out[k] for k in sorted(out, key=lambda k: STAGES.index(k) if k in STAGES else len(STAGES))}

    def to_dict(self) -> dict:
        tot = self.totals()
        seconds = sum(t["seconds"] for t in tot.values())
        gflop = sum(t["gflop"] for t in tot.values())
        rate = self.gemm["gflop_per_s_median"] if self.gemm else None
        floor = gflop / rate if rate else None
        return {
            **self.meta,
            "gemm": self.gemm,
            "total": {"seconds": seconds, "gflop": gflop, "floor_s": floor,
                      "achieved": floor / seconds if floor and seconds else None},
            "stages": tot,
            "blocks": [{"block": b, "stage": s, "seconds": v[0], "gflop": v[1] / 1e9, "calls": v[2]}
                       for (b, s), v in sorted(self.rows.items())],
        }

    def markdown(self) -> str:
        d = self.to_dict()
        g = d["gemm"] or {}
        lines = []
        if g:
            lines.append(f"GEMM rate (fp32 torch.matmul {g['shape']}, {g['threads']} threads, same run): "
                         f"median {g['gflop_per_s_median']:.1f} GFLOP/s (min {g['gflop_per_s_min']:.1f}, "
                         f"max {g['gflop_per_s_max']:.1f}, {g['repeats']} repeats)\n")
        rate = g.get("gflop_per_s_median")
        lines += ["| stage | seconds | share | GFLOP | GFLOP/s | of GEMM rate |", "|---|---:|---:|---:|---:|---:|"]
        total_s = d["total"]["seconds"] or 1.0
        for name, t in d["stages"].items():
            gps = t["gflop_per_s"]
            rate_s = "" if gps is None else f"{gps:.1f}"
            frac = "" if gps is None or not rate else f"{100 * gps / rate:.0f}%"
            lines.append(f"| {name} | {t['seconds']:.1f} | {100 * t['seconds'] / total_s:.0f}% | {t['gflop']:.0f} | "
                         f"{rate_s} | {frac} |")
        tot = d["total"]
        ach = f"{100 * tot['achieved']:.0f}%" if tot["achieved"] else ""
        lines.append(f"| **total** | {tot['seconds']:.1f} | 100% | {tot['gflop']:.0f} | "
                     f"{tot['gflop'] / total_s:.1f} | {ach} |")
        if tot["floor_s"]:
            lines.append(f"\nFLOP floor (counted GFLOP / GEMM rate): {tot['floor_s']:.1f} s; "
                         f"wall of the profiled stages: {tot['seconds']:.1f} s ({tot['seconds'] / tot['floor_s']:.2f}x).")
        return "\n".join(lines) + "\n"

    def write(self, path: str | Path) -> tuple[Path, Path]:
        """``path`` (JSON) and the same name with ``.md`` (the stage table)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        md = path.with_suffix(".md")
        md.write_text(self.markdown())
        return path, md


def gemm_rate(m: int, k: int, n: int, repeats: int = 15) -> dict:
    """fp32 ``torch.matmul`` of ``(m, k) @ (k, n)`` on the CPU with the current thread setting: GFLOP/s median/min/max."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        rates.append(2 * m * k * n / (time.perf_counter() - t) / 1e9)
    return {"shape": [m, k, n], "threads": torch.get_num_threads(), "repeats": repeats,
            "gflop_per_s_median": statistics.median(rates), "gflop_per_s_min": min(rates),
            "gflop_per_s_max": max(rates)}


def block_flops(linear_shapes, tokens: int, windows: int, window: int, attn_width: int) -> float:
    """One forward of a block: ``2·tokens·in·out`` per linear (``linear_shapes``: ``(out, in)`` each), plus
    attention's two products ``QKᵀ`` and ``PV`` on full ``window x window`` scores (``attn_width``: the query width)."""
    return sum(2.0 * tokens * i * o for o, i in linear_shapes) + 4.0 * windows * window * window * attn_width


def hessian_flops(tokens: int, width: int) -> float:
    """``XᵀX`` of ``(tokens, width)`` inputs."""
    return 2.0 * tokens * width * width


def feedback_flops(rows: int, cols: int) -> float:
    """Error feedback (GPTQ's column loop, VPTQ's assignment): the updates of every later column (``rows·cols²``),
    and the Cholesky factor of the inverse Hessian (``cholesky``, ``cholesky_inverse``, ``cholesky``: ``5/3·cols³``)."""
    return float(rows) * cols * cols + 5.0 / 3.0 * cols ** 3
