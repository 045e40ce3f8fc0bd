"""Optional lm-evaluation-harness integration (``pip install 'lowbit[lmeval]'``).

:func:`wrap` turns a lowbit model (float or quantized, it is a transformers
model either way) into lm-eval's ``HFLM``; :func:`evaluate_lm_eval` runs the
default zero-shot suite through lm-eval's OWN task definitions (its installed
YAMLs, with their ``process_docs`` / ``utils`` functions; tested with lm-eval
0.4.13) over lowbit's local data and lowbit's item subset:

- each task's YAML (``TaskSpec.lm_eval``, under ``lm_eval/tasks/``) is loaded
  with its includes and ``!function`` references resolved, renamed
  ``lowbit_<task>``, and pointed at a JSON-lines file of the selected rows
  (``dataset_path: json``, ``data_files: {validation: ...}``) written in
  lowbit's seeded order, with only a validation split (no train or test split,
  so ARC and OpenBookQA score their validation rows as lowbit does) and no
  few-shot examples;
- columns are typed as those YAMLs expect (``TaskSpec.lm_eval_doc``: PIQA's
  ``label`` an int; BoolQ gains SuperGLUE's int ``label`` = ``int(answer)``);
  each row also carries ``lowbit_id`` (lowbit's item id);
- the dict configs go to ``lm_eval.simple_evaluate`` (no limit: the file is
  the subset), so ``limit=N`` here is exactly ``lowbit eval --limit N``.

The answer has lm-eval's own numbers: ``acc_norm`` is None where the task's
YAML does not list it (WinoGrande, BoolQ, Social IQa); with
``log_samples=True`` every task also has its per-item requests, option
log-likelihoods and metrics, for item-for-item comparison with lowbit's scorer.
lm-eval is imported lazily; without it these functions raise a LowbitError
that says how to install it. The optional ``bb_*`` BIG-bench tasks have no
lm-eval definition and are refused.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..errors import LowbitError
from .tasks import (
    DEFAULT_LIMIT, DEFAULT_SEED, TASKS, build_items, items_digest, resolve_tasks, subset_order, task_rows,
)

__all__ = ["evaluate_lm_eval", "lm_eval_task_config", "lm_eval_task_name", "wrap"]


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise LowbitError("the lm-eval integration needs lm-evaluation-harness: pip install 'lowbit[lmeval]' "
                          f"(or pip install 'lm-eval>=0.4'); import failed: {exc}") from None
    return lm_eval, HFLM, TaskManager


def lm_eval_task_name(task: str) -> str:
    """The lm-eval name of a lowbit task (``social_iqa`` -> ``lowbit_social_iqa``)."""
    return f"lowbit_{task}"


def wrap(model, tokenizer, batch_size: int = 8, **kwargs):
    """lm-eval's ``HFLM`` around an in-memory lowbit model (BOS per the architecture row, as lowbit's scorer)."""
    _, HFLM, _ = _lm_eval()
    from ..models.arch import arch_for

    kwargs.setdefault("add_bos_token", arch_for(model).bos_per_window)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)


def _load_yaml(path: Path) -> dict:
    """An lm-eval task YAML with includes merged and ``!function`` references resolved."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml        # lm-eval >= 0.4.10
    except ImportError:
        from lm_eval.utils import load_yaml_config               # older 0.4.x

        return load_yaml_config(yaml_path=str(path), mode="full")
    return load_yaml(path, resolve_func=True)


def _spec(task: str):
    spec = TASKS[task]
    if not spec.lm_eval:
        raise LowbitError(f"task {task!r} has no lm-evaluation-harness definition; evaluate_lm_eval covers "
                          f"the default suite ({', '.join(n for n, t in TASKS.items() if t.lm_eval)})")
    return spec


def lm_eval_task_config(task: str, data_file: str | Path, cache_dir: str | Path | None = None) -> dict:
    """lm-eval's own config of ``task``, reading the validation rows in ``data_file`` (JSON lines).

    ``cache_dir``: where ``datasets`` keeps the table it builds from that file.
    """
    lm_eval, _, _ = _lm_eval()
    spec = _spec(task)
    path = Path(lm_eval.__file__).parent / "tasks" / spec.lm_eval
    if not path.is_file():
        raise LowbitError(f"lm-eval {getattr(lm_eval, '__version__', '?')} has no task file {path} "
                          "(lowbit was tested with lm-eval 0.4.13)")
    cfg = dict(_load_yaml(path))
    for key in ("tag", "group", "task_alias"):
        cfg.pop(key, None)
    kwargs: dict = {"data_files": {"validation": str(data_file)}}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    cfg.update(task=lm_eval_task_name(task), dataset_path="json", dataset_name=None, dataset_kwargs=kwargs,
               training_split=None, validation_split="validation", test_split=None, fewshot_split=None,
               num_fewshot=0, metadata={**meta, "lowbit_task": task, "lm_eval_yaml": spec.lm_eval})
    return cfg


def _write_rows(task: str, limit: int | None, seed: int, path: Path, progress: bool) -> str:
    """The selected rows of ``task`` as JSON lines, in lowbit's order; returns lowbit's items digest."""
    spec = _spec(task)
    rows = task_rows(task, progress)
    order = subset_order(len(rows), limit, seed)
    cast = spec.lm_eval_doc or dict
    with open(path, "w", encoding="utf-8") as f:
        for i in order:
            f.write(json.dumps({**cast(rows[i]), "lowbit_id": str(i)}, ensure_ascii=False) + "\n")
    items = build_items(task, rows)
    return items_digest([items[i] for i in order])


def _samples(samples: list[dict], metrics: list[str]) -> list[dict]:
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        out.append({"id": s["doc"]["lowbit_id"],
                    "arguments": [[str(a) for a in args] for args in s["arguments"]],
                    "lls": [float(r[0]) for r in s["filtered_resps"]],
                    **{m: float(s[m]) for m in metrics if m in s}})
    return out


def evaluate_lm_eval(model, tokenizer, tasks="all", limit: int | None = DEFAULT_LIMIT, seed: int = DEFAULT_SEED,
                     batch_size: int = 8, log_samples: bool = False, progress: bool = False, **kwargs) -> dict:
    """``{task: {acc, acc_norm, acc_stderr, acc_norm_stderr, n, metrics, items_sha256[, samples]}}`` from lm-eval.

    lm-eval's own task definitions run over lowbit's subset (``limit``/``seed``
    as :func:`lowbit.eval.zeroshot.evaluate_zeroshot`). ``metrics``: what
    lm-eval reports for the task (``acc_norm`` and its stderr are None when it
    does not); ``items_sha256``: lowbit's digest of the same subset. With
    ``log_samples``, ``samples`` lists per item (lowbit's order) ``id``,
    ``arguments`` (lm-eval's ``[context, continuation]`` requests), ``lls``
    and the per-item metrics. ``kwargs`` go to ``lm_eval.simple_evaluate``.
    """
    lm_eval, _, TaskManager = _lm_eval()
    names = resolve_tasks(tasks)
    for n in names:
        _spec(n)
    lm = wrap(model, tokenizer, batch_size)
    res = {}
    with tempfile.TemporaryDirectory(prefix="lowbit-lmeval-") as tmp:
        configs, digests = [], {}
        for n in names:
            data = Path(tmp) / f"{n}.jsonl"
            digests[n] = _write_rows(n, limit, seed, data, progress)
            configs.append(lm_eval_task_config(n, data, Path(tmp) / "hf-datasets"))
        kwargs.setdefault("bootstrap_iters", 1000)   # acc/acc_norm are means: lm-eval's analytic stderr
        out = lm_eval.simple_evaluate(model=lm, tasks=configs, task_manager=TaskManager(include_defaults=False),
                                      log_samples=log_samples, **kwargs)
    for n, cfg in zip(names, configs):
        t = lm_eval_task_name(n)
        r = out["results"][t]
        metrics = [m["metric"] for m in cfg.get("metric_list") or []]
        res[n] = {"acc": r.get("acc,none"), "acc_norm": r.get("acc_norm,none"),
                  "acc_stderr": r.get("acc_stderr,none"), "acc_norm_stderr": r.get("acc_norm_stderr,none"),
                  "n": out.get("n-samples", {}).get(t, {}).get("effective"), "metrics": metrics,
                  "items_sha256": digests[n]}
        if log_samples:
            res[n]["samples"] = _samples(out["samples"][t], metrics)
    return res
