"""``lowbit bench``: a grid of runs (models x methods x configs) from a YAML recipe.

Each grid point is one :func:`lowbit.api.run`: its config becomes a
:class:`~lowbit.quantize.QuantRecipe` through :func:`~lowbit.quantize.recipe_from_options`, the function the
CLI uses too, so a bench row and a hand-made ``lowbit run`` with the same flags give the same results file
(the plan prints that command line).
Runs whose results JSON already exists with the same config and covering
the requested evaluation are skipped unless ``force``. The reports
(``lowbit report``) are rebuilt at the end.

Recipe (see ``recipes/rtn_grid.yaml``)::

    models: [smollm2-135m]          # zoo names, HF folders, GGUF files or hub ids
    methods: [fp32, rtn]            # crossed with `configs`; fp32 runs once, without a config
    configs:                        # keys are `lowbit run` flags without dashes (group-size -> group_size)
      - {bits: 4, group_size: 128}
      - {bits: 3, group_size: 64}
    eval: {ppl: [wiki], seqlen: 512, windows: 40, tasks: all, limit: 200}
    results_dir: docs/results

``methods`` may instead map each method to its own list of configs
(``{rtn: [{bits: 4}], gptq: [{bits: 3, act_order: true}]}``); a method mapped
to nothing uses ``configs``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, LowbitError

log = logging.getLogger(__name__)

__all__ = ["BenchRecipe", "Run", "duration", "estimate_times", "load_recipe", "parse_recipe", "plan_summary",
           "run_argv", "run_bench"]

TOP_KEYS = ("models", "methods", "configs", "eval", "results_dir")
EVAL_KEYS = ("ppl", "seqlen", "windows", "tasks", "limit")


@dataclass(frozen=True)
class Run:
    """One grid point: a model, a method and its flags (``{dest: value}``)."""

    model: str
    method: str
    config: tuple[tuple[str, object], ...] = ()

    def label(self) -> str:
        cfg = " ".join(f"{k}={v}" for k, v in self.config)
        return f"{self.model} {self.method}" + (f" {cfg}" if cfg else "")


@dataclass(frozen=True)
class BenchRecipe:
    runs: tuple[Run, ...]
    eval: dict = field(default_factory=dict)
    results_dir: str = "docs/results"
    source: str = "<recipe>"


_TYPE_NAMES = {bool: (bool, "true or false"), int: (int, "an integer"), float: ((int, float), "a number")}


def _check_value(where: str, key: str, value, want: type | tuple, what: str, example: str) -> None:
    ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}.{key}: expected {what}, got {value!r} ({type(value).__name__}); "
                          f"write it like `{key}: {example}`")


def _check_config(where: str, cfg, options: dict[str, object]) -> tuple[tuple[str, object], ...]:
    if cfg is None:
        return ()
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: a config is a mapping of `lowbit run` flags, like {{bits: 4, group_size: 128}}; "
                          f"got {cfg!r}")
    out = []
    for key, value in cfg.items():
        dest = str(key).replace("-", "_")
        if dest not in options:
            hint = " (set it under `eval:`)" if dest in EVAL_KEYS else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; config keys are `lowbit run` flags without "
                              f"dashes: {', '.join(sorted(options))}")
        want, what = _TYPE_NAMES.get(options[dest], (str, "a string"))
        example = {bool: "true", int: "4", str: "int8"}.get(want, "0.01")  # type: ignore[call-overload]
        _check_value(where, dest, value, want, what, example)
        out.append((dest, value))
    return tuple(sorted(out))


def parse_recipe(data, source: str = "<recipe>") -> BenchRecipe:
    """Validate a recipe mapping (a parsed YAML file); every error names the key and the fix."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe is a YAML mapping with keys {', '.join(TOP_KEYS)}")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; a recipe has: {', '.join(TOP_KEYS)}")
    models = data.get("models")
    if isinstance(models, str):
        models = [models]
    if not models:
        raise ConfigError(f"{source}: missing `models`; add e.g. `models: [smollm2-135m]`")
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise ConfigError(f"{source}: `models` must be a list of model names, like [smollm2-135m]; got {models!r}")
    methods = data.get("methods")
    if isinstance(methods, str):
        methods = [methods]
    if not methods:
        raise ConfigError(f"{source}: missing `methods`; add e.g. `methods: [fp32, rtn]`")
    from ..quantize import recipe_option_types

    options = recipe_option_types()   # {config key: type}: every `lowbit run` quantization flag without dashes
    configs = data.get("configs")
    if configs is not None and not isinstance(configs, list):
        raise ConfigError(f"{source}: `configs` must be a list of mappings, like [{{bits: 4, group_size: 128}}]")
    default = tuple(_check_config(f"{source}: configs[{i}]", c, options) for i, c in enumerate(configs or []))
    if isinstance(methods, list):
        methods = {m: None for m in methods}
    if not isinstance(methods, dict):
        raise ConfigError(f"{source}: `methods` must be a list of names or a mapping name -> list of configs")
    from ..methods import method_names

    known = ["fp32", *method_names()]
    grid: list[tuple[str, tuple]] = []
    for m, cfgs in methods.items():
        if m not in known:
            raise ConfigError(f"{source}: methods: unknown method {m!r}; known: {', '.join(known)}")
        if m == "fp32":
            if cfgs:
                raise ConfigError(f"{source}: methods.fp32 takes no configs (it is the float reference)")
            grid.append((m, ()))
            continue
        if cfgs is None:
            cfg_list = default or ((),)
        elif isinstance(cfgs, list):
            cfg_list = tuple(_check_config(f"{source}: methods.{m}[{i}]", c, options) for i, c in enumerate(cfgs))
        else:
            raise ConfigError(f"{source}: methods.{m} must be a list of configs, like [{{bits: 4}}]")
        grid += [(m, c) for c in cfg_list or ((),)]
    ev = _check_eval(source, data.get("eval") or {})
    results_dir = data.get("results_dir", "docs/results")
    if not isinstance(results_dir, str):
        raise ConfigError(f"{source}: `results_dir` must be a path string, like docs/results")
    for m, c in grid:
        if m != "fp32":
            try:
                run_recipe(Run("", m, c))
            except LowbitError as exc:
                cfg = " ".join(f"{k}={v}" for k, v in c)
                raise ConfigError(f"{source}: methods.{m} {{{cfg}}}: {exc}") from None
    runs = tuple(dict.fromkeys(Run(model, m, c) for model in models for m, c in grid))
    return BenchRecipe(runs, ev, results_dir, source)


def run_recipe(run: Run):
    """The :class:`~lowbit.quantize.QuantRecipe` of a grid point (None for ``fp32``, the float reference)."""
    from ..quantize import recipe_from_options

    return None if run.method == "fp32" else recipe_from_options(run.method, dict(run.config))


def eval_config(ev: dict):
    """The :class:`~lowbit.config.EvalConfig` of a recipe's ``eval`` mapping (defaults for what it leaves out)."""
    from ..config import EvalConfig
    from ..eval.tasks import resolve_tasks
    from ..eval.zeroshot import parse_limit

    kw = {}
    if "ppl" in ev:
        kw["ppl"] = tuple(ev["ppl"])
    if "seqlen" in ev:
        kw["seqlen"] = ev["seqlen"]
    if "windows" in ev:
        kw["windows"] = None if ev["windows"] == "all" else ev["windows"]
    if ev.get("tasks"):
        kw["tasks"] = tuple(resolve_tasks(ev["tasks"]))
    if "limit" in ev:
        kw["limit"] = parse_limit(ev["limit"])
    return EvalConfig(**kw)


def _check_eval(source: str, ev) -> dict:
    if not isinstance(ev, dict):
        raise ConfigError(f"{source}: `eval` must be a mapping with keys {', '.join(EVAL_KEYS)}")
    for k in ev:
        if k not in EVAL_KEYS:
            raise ConfigError(f"{source}: eval: unknown key {k!r}; eval has: {', '.join(EVAL_KEYS)}")
    ev = dict(ev)
    if isinstance(ev.get("ppl"), str):
        ev["ppl"] = [ev["ppl"]]
    if "ppl" in ev and not (isinstance(ev["ppl"], list) and ev["ppl"] and all(isinstance(c, str) for c in ev["ppl"])):
        raise ConfigError(f"{source}: eval.ppl: expected a list of corpora, like [wiki]; got {ev['ppl']!r}")
    if "seqlen" in ev:
        _check_value(f"{source}: eval", "seqlen", ev["seqlen"], int, "an integer", "512")
    if "windows" in ev and not (ev["windows"] == "all" or (isinstance(ev["windows"], int)
                                                           and not isinstance(ev["windows"], bool))):
        raise ConfigError(f"{source}: eval.windows: expected an integer or 'all'; got {ev['windows']!r}")
    if "tasks" in ev:
        from ..eval.tasks import resolve_tasks

        t = ev["tasks"]
        if not isinstance(t, (str, list)):
            raise ConfigError(f"{source}: eval.tasks: expected 'all', a comma-separated string or a list")
        try:
            ev["tasks"] = ",".join(resolve_tasks(t))
        except LowbitError as exc:
            raise ConfigError(f"{source}: eval.tasks: {exc}") from None
    if "limit" in ev:
        from ..eval.zeroshot import parse_limit

        try:
            parse_limit(ev["limit"])
        except LowbitError as exc:
            raise ConfigError(f"{source}: eval.limit: {exc}; e.g. `limit: 200`") from None
    return ev


def load_recipe(path: str | Path) -> BenchRecipe:
    """Read and validate a YAML recipe file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    return parse_recipe(data, str(path))


def run_argv(run: Run, ev: dict, results_dir: str, quiet: bool = False) -> list[str]:
    """The ``lowbit run`` command line that gives the same results file as this grid point (shown in plans)."""
    argv = (["-q"] if quiet else []) + ["run", run.model, "--method", run.method]
    for key, value in run.config:
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    if "ppl" in ev:
        argv += ["--ppl", *ev["ppl"]]
    for k in ("seqlen", "windows", "tasks", "limit"):
        if k in ev:
            argv += [f"--{k}", str(ev[k])]
    return argv + ["--results-dir", results_dir]


def expected_result(run: Run, recipe, results_dir: str | Path) -> tuple[Path, dict]:
    """The results path and config the grid point writes (without running it)."""
    from ..eval.record import result_name

    model = Path(str(run.model)).name
    if recipe is None:
        name, config = result_name({"model": model, "method": "fp32", "tag": ""}), {"storage": {"dtype": "float32"}}
    else:
        name, config = result_name({"model": model, "method": recipe.method, "tag": recipe.tag()}), recipe.to_dict()
    return Path(results_dir) / name, json.loads(json.dumps(config))


def same_config(stored: dict | None, current: dict) -> bool:
    """Whether a results file's config is the recipe ``current``: equal, except that a method option the
    file lacks matches when ``current`` holds that option's default (an option added to the method after the
    file was written, at its default, changes nothing the file measured)."""
    if stored == current:
        return True
    if not isinstance(stored, dict) or set(stored) != set(current):
        return False
    if any(stored[k] != current[k] for k in current if k != "method_config"):
        return False
    old, new = stored.get("method_config") or {}, current.get("method_config") or {}
    if set(old) - set(new) or any(old[k] != new[k] for k in old):
        return False
    import dataclasses

    from ..methods.registry import get_method

    defaults = {f.name: f.default for f in dataclasses.fields(get_method(current["method"]).config)}
    return all(k in defaults and new[k] == defaults[k] for k in set(new) - set(old))


def is_cached(run: Run, recipe, ev, results_dir: str | Path) -> bool:
    """Whether the results JSON exists with the same config and covers evaluation ``ev`` (an EvalConfig)."""
    path, config = expected_result(run, recipe, results_dir)
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    from ..eval.ppl import PROTOCOL_VERSION

    if not same_config(res.get("config"), config) or res.get("protocol_version", 1) != PROTOCOL_VERSION:
        return False
    for corpus in ev.ppl:
        p = res.get("protocol", {}).get(corpus)
        if corpus not in res.get("ppl", {}) or not p or p.get("seqlen") != ev.seqlen or p.get("windows") != ev.windows:
            return False
    if ev.tasks:
        zp = res.get("zeroshot_protocol") or {}
        if not set(ev.tasks) <= set(res.get("zeroshot") or {}) or zp.get("limit") != ev.limit:
            return False
    return True


def run_point(point: dict, progress: bool = True) -> Path:
    """Run one grid point (``{model, method, config, eval, results_dir, device}``, JSON-ready) and write its
    results file; the reports are left to the caller."""
    from ..api import run
    from ..eval.record import write_result

    pt = Run(point["model"], point["method"], tuple((k, v) for k, v in point["config"]))
    res = run(pt.model, run_recipe(pt), eval_config(point["eval"]), device=point.get("device") or "auto",
              progress=progress)
    return write_result(res, point["results_dir"])


def run_bench(recipe: BenchRecipe, force: bool = False, dry_run: bool = False, quiet: bool = False,
              jobs: int = 1, device: str | None = None, log_dir: str | Path = "out/bench-logs") -> list[dict]:
    """Run (or plan, with ``dry_run``) every grid point; returns ``[{run, argv, status}]``.

    ``status``: ``cached`` (skipped), ``planned`` (dry run), ``done`` or ``failed``
    (``jobs`` > 1 only). Points not cached carry a time estimate (``est_s``,
    ``est_n``: :func:`estimate_times`); a real run logs their sum first.
    ``device`` is every run's compute device (default: each run's own, auto).
    With ``jobs`` > 1 the grid points run in that many processes at once
    (on the CPU, splitting the cores: :func:`job_threads`), each logging to
    ``log_dir/<results name>.log``; a failed point is reported and the others
    go on. The reports are rebuilt from the results folder after the runs.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    ev = eval_config(recipe.eval)
    plan = []
    for run in recipe.runs:
        argv = run_argv(run, recipe.eval, recipe.results_dir, quiet or jobs > 1)
        if device is not None:
            argv += ["--device", str(device)]
        rr = run_recipe(run)
        cached = not force and is_cached(run, rr, ev, recipe.results_dir)
        point = {"model": run.model, "method": run.method, "config": [list(kv) for kv in run.config],
                 "eval": recipe.eval, "results_dir": recipe.results_dir, "device": device}
        plan.append({"run": run.label(), "argv": argv, "point": point,
                     "result": expected_result(run, rr, recipe.results_dir)[0],
                     "status": "cached" if cached else ("planned" if dry_run else "todo")})
    todo = [p for p in plan if p["status"] == "todo"]
    if todo:
        from ..eval.record import check_results_dir

        check_results_dir(recipe.results_dir)   # before the first point runs, not after its evaluation
    estimate_times(plan, recipe.results_dir)
    if todo and not quiet:
        log.info("%s", plan_summary(plan, jobs))
    for i, p in enumerate(plan, 1):
        if p["status"] != "todo":
            log.info("[%d/%d] %s: %s", i, len(plan), p["run"], p["status"])
        elif jobs == 1:
            log.info("[%d/%d] lowbit %s", i, len(plan), " ".join(p["argv"]))
            log.info("recorded %s", run_point(p["point"], progress=not quiet))
            p["status"] = "done"
    if jobs > 1 and todo:
        _run_parallel(todo, jobs, Path(log_dir), quiet, job_threads(jobs, device))
    if not dry_run:
        from ..report.pages import write_report

        write_report(recipe.results_dir)
    for p in plan:
        del p["point"], p["result"]
    return plan


def _device_kind(device) -> str:
    """``cpu`` or ``cuda`` for a ``--device`` value or a results file's ``env.device`` (``auto``: this machine's)."""
    from ..utils import default_device

    name = str(device or "auto")
    if name == "auto":
        return default_device().type
    return "cuda" if name.startswith("cuda") else name.split(":")[0]


def estimate_times(plan: list[dict], results_dir: str | Path) -> None:
    """Add ``est_s`` and ``est_n`` to each point not cached: the median wall time (quantization plus
    evaluation) of the ``est_n`` earlier results in ``results_dir`` with the same model and method on the same
    kind of device (cpu or cuda); ``est_s`` is None where there is none.

    A rough guide for planning, not a measurement: formats, thread counts and
    how many runs shared the machine differ between the earlier runs.
    """
    import statistics

    from ..eval.record import load_results

    seen: dict[tuple[str, str, str], list[float]] = {}
    for r in load_results(results_dir):
        if "quant_time_s" not in r and "eval_time_s" not in r:
            continue
        key = (r["model"], r["method"], _device_kind((r.get("env") or {}).get("device", "cpu")))
        seen.setdefault(key, []).append(float(r.get("quant_time_s") or 0) + float(r.get("eval_time_s") or 0))
    for p in plan:
        if p["status"] == "cached":
            continue
        pt = p["point"]
        times = seen.get((Path(str(pt["model"])).name, pt["method"], _device_kind(pt["device"])), [])
        p["est_s"] = statistics.median(times) if times else None
        p["est_n"] = len(times)


def duration(seconds: float) -> str:
    """``26 min`` or, from 90 minutes on, ``13.7 h``."""
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def plan_summary(plan: list[dict], jobs: int = 1) -> str:
    """One line on the points still to run and their estimated time (:func:`estimate_times`); '' when none."""
    left = [p for p in plan if p["status"] in ("planned", "todo")]
    if not left:
        return ""
    known = [p["est_s"] for p in left if p.get("est_s") is not None]
    msg = f"{len(left)} of {len(plan)} points {'planned' if left[0]['status'] == 'planned' else 'to run'}"
    if known:
        msg += (f"; about {duration(sum(known))} of run time in all, from the median times of earlier runs "
                "of the same model and method on this kind of device")
        if jobs > 1:
            msg += f" (about {duration(sum(known) / jobs)} with {jobs} at a time, if each runs as fast)"
        if len(known) < len(left):
            msg += f" ({len(left) - len(known)} point(s) with no earlier run to go by)"
    return msg


def job_threads(jobs: int, device: str | None) -> int | None:
    """CPU threads for each of ``jobs`` parallel runs: the cores split between them when the runs compute on
    the CPU (``device`` cpu, or auto on a machine without a GPU), so ``jobs`` processes do not each start a
    thread per core; None (each run's own default) on a GPU or when ``OMP_NUM_THREADS`` is set already."""
    import os

    from ..utils import resolve_device

    if jobs < 2 or os.environ.get("OMP_NUM_THREADS") or resolve_device(device or "auto").type != "cpu":
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


def _run_parallel(todo: list[dict], jobs: int, log_dir: Path, quiet: bool, threads: int | None = None) -> None:
    """Each grid point in its own ``python -m lowbit.bench.grid POINT`` process, ``jobs`` at a time (``threads``: each one's
    ``OMP_NUM_THREADS``, see :func:`job_threads`)."""
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm.auto import tqdm

    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
        log.info("%d runs at a time on the CPU, %d thread(s) each", jobs, threads)

    def one(p):
        logfile = log_dir / f"{p['result'].stem}.log"
        with open(logfile, "w") as fh:
            rc = subprocess.run([sys.executable, "-m", "lowbit.bench.grid", json.dumps(p["point"])], stdout=fh,
                                stderr=subprocess.STDOUT, check=False, env=env).returncode
        return p, rc, logfile

    failed = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(one, p) for p in todo]
        for fut in tqdm(as_completed(futures), total=len(futures), desc=f"bench ({jobs} jobs)", disable=quiet):
            p, rc, logfile = fut.result()
            p["status"] = "done" if rc == 0 else "failed"
            (log.info if rc == 0 else log.error)("%s: %s (log: %s)", p["run"], p["status"], logfile)
            if rc:
                failed.append(p["run"])
    if failed:
        log.error("%d of %d grid points failed: %s", len(failed), len(todo), "; ".join(failed))


def main(argv: list[str] | None = None) -> int:
    """``python -m lowbit.bench.grid POINT_JSON``: one grid point in its own process (``--jobs`` > 1)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        log.info("recorded %s", run_point(json.loads(args[0]), progress=False))
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
