"""Results records: one JSON per run in ``docs/results/`` (written, named and read here)."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from ..errors import DataError
from ..utils import atomic_write_text
from .ppl import PROTOCOL_VERSION

__all__ = ["DEFAULT_DIR", "check_results_dir", "env_record", "evaluate_record", "finite_ppl", "load_results", "result_name", "write_result"]

log = logging.getLogger(__name__)

DEFAULT_DIR = Path("docs/results")


def result_name(res: dict) -> str:
    parts = [res["model"], res["method"]]
    if res.get("tag"):
        parts.append(res["tag"])
    return "__".join(p.replace("/", "_") for p in parts) + ".json"


def finite_ppl(ppl: dict) -> tuple[dict, dict]:
    """``(values, reasons)``: perplexities rounded to 4 decimals, a non-finite one as None with its reason in
    ``reasons`` (``{corpus: "perplexity is inf (...)"}``). JSON has no Infinity or NaN; a record keeps its
    ``ppl`` numbers or nulls and says why under ``nonfinite``."""
    values, reasons = {}, {}
    for corpus, v in ppl.items():
        if v is not None and math.isfinite(v):
            values[corpus] = round(v, 4)
        else:
            values[corpus] = None
            if v is not None:
                reasons[corpus] = (f"perplexity is {v} (a window's loss was not finite, or the mean loss too large "
                                   f"to exponentiate): the model diverged")
    return values, reasons


def _nonfinite_fields(obj, path: str = "") -> list[str]:
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [f"{path} = {obj}"]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [f for k, v in items for f in _nonfinite_fields(v, f"{path}.{k}" if path else str(k))]


def write_result(res: dict, results_dir: Path | str = DEFAULT_DIR) -> Path:
    """Write (or replace) one run's JSON; returns its path.

    Non-finite perplexities are written as null with a reason (:func:`finite_ppl`); any other non-finite number
    is a ValueError naming its field, since strict JSON has no Infinity or NaN.
    """
    for k in ("model", "method", "config", "bpw", "ppl", "protocol", "quant_time_s", "peak_mem_gb", "lowbit_version"):
        if k not in res:
            raise ValueError(f"result is missing field {k!r}")
    ppl, reasons = finite_ppl(res["ppl"])
    res = {**res, "ppl": ppl}
    if reasons:
        res["nonfinite"] = {**res.get("nonfinite", {}), **reasons}
    bad = _nonfinite_fields(res)
    if bad:
        raise ValueError(f"result field(s) {', '.join(bad)} not finite; a results file holds only finite numbers")
    path = Path(results_dir) / result_name(res)
    atomic_write_text(path, json.dumps(res, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return path


def check_results_dir(results_dir: Path | str = DEFAULT_DIR) -> None:
    """OutputError now, before any model loads, when results cannot be written to ``results_dir`` or the index
    beside it (``results.md`` goes to its parent)."""
    from ..utils import check_writable

    for folder in (Path(results_dir), Path(results_dir).parent):
        check_writable(folder, f"--results-dir {results_dir}")


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


# fields of a distillation run's summary copied into its evaluation result (the report's budget column)
DISTILL_RESULT_FIELDS = ("loss", "init", "steps", "seqlen", "batch_size", "grad_accum", "lr", "teacher_samples",
                         "max_new_tokens", "teacher_source", "n_windows", "beta", "final_loss", "seed")


def env_record(device=None) -> dict:
    """Software, machine and load: what a result's times and numbers depend on besides its recipe."""
    import datetime
    import platform

    import torch
    import transformers

    from ..utils import device_name

    # transformers builds the model (and, for GGUF sources, converts it): its version is part of the protocol
    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "machine": platform.machine(),
           "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat()}
    if device is not None:
        env["device"] = device_name(device)
    if hasattr(os, "getloadavg"):  # above `threads`, other work shared the cores and the times overstate the compute
        env["cpus"] = os.cpu_count()
        env["load_avg_15m"] = round(os.getloadavg()[2], 2)
    return env


def evaluate_record(model, tokenizer, ev, *, model_name: str, method: str, tag: str, config: dict,
                    summary: dict, device=None, progress: bool = True) -> dict:
    """Evaluate ``model`` as ``ev`` (an :class:`lowbit.config.EvalConfig`) asks and return its results record:
    bpw (blocks and all-in, itemised), perplexity with its protocol (null where not finite, the reason under
    ``nonfinite``), zero-shot fields, times, memory and environment. ``method``/``tag``/``config`` name the recipe (``fp32`` for the float reference);
    ``summary`` is what quantization returned. Nothing is written (:func:`write_result`)."""
    import time

    from .._version import __version__
    from ..nn.bpw import bpw_report
    from ..nn.w8a8 import act_linear_summary
    from ..utils import peak_memory_gb, resolve_device
    from .ppl import evaluate_ppl
    from .zeroshot import result_fields

    storage = (config.get("storage") or {}).get("dtype", "float32" if method == "fp32" else "float16")
    rep = bpw_report(model, storage)
    device = resolve_device(device or "auto")
    model.to(device)
    ppl, protos = {}, {}
    t0 = time.perf_counter()
    for corpus in ev.ppl:
        ppl[corpus], protos[corpus] = evaluate_ppl(model, tokenizer, corpus, ev.seqlen, ev.windows, progress=progress)
    zeroshot = result_fields(model, tokenizer, list(ev.tasks), ev.limit, progress=progress)
    ppl_values, nonfinite = finite_ppl(ppl)
    res = {
        "model": model_name,
        "method": method,
        "tag": tag,
        "config": config,
        "bpw": {"blocks": round(rep["blocks"], 6), "all_in": round(rep["all_in"], 6)},
        "bpw_detail": {"blocks_bits": rep["blocks_bits"], "blocks_weights": rep["blocks_weights"],
                       "total_bits": rep["total_bits"], "n_params": rep["n_params"], "storage_dtype": storage,
                       "blocks_items": rep["blocks_items"]},
        "ppl": ppl_values,
        "protocol": protos,
        "protocol_version": PROTOCOL_VERSION,
        "quant_time_s": summary.get("quant_time_s", 0.0),
        "peak_mem_gb": summary.get("peak_mem_gb") or peak_memory_gb(device),
        "eval_time_s": round(time.perf_counter() - t0, 1),
        "lowbit_version": __version__,
        "env": env_record(device),
        **zeroshot,
    }
    if nonfinite:
        res["nonfinite"] = nonfinite
    if summary.get("method_result"):  # what a whole-model step found (SmoothQuant+'s smoothing strength)
        res["method_result"] = summary["method_result"]
    if summary.get("mix_plan"):  # a size budget: what its plan takes and predicts
        res["mix_plan"] = summary["mix_plan"]
    if summary.get("block_tune"):  # block-wise reconstruction: each block's output MSE before and after
        res["block_tune"] = summary["block_tune"]
    if summary.get("distill"):  # distilled checkpoints: the training run that produced them
        res["distill"] = {k: summary["distill"][k] for k in DISTILL_RESULT_FIELDS if k in summary["distill"]}
    act = act_linear_summary(model)
    if act["macs_per_token"]:  # weight+activation methods: precision mix and flattening overhead
        res["act_linears"] = {"macs_per_token": act["macs_per_token"], "int4_share": round(act["int4_share"], 4),
                              "flatten_overhead": round(act["flatten_overhead"], 4)}
    return res
