"""Results records: one JSON per run in ``docs/results/`` (written, named and read here)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import DataError
from ..utils import atomic_write_text
from .ppl import PROTOCOL_VERSION

__all__ = ["DEFAULT_DIR", "write_result", "load_results", "result_name"]

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
