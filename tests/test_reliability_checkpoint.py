"""Checkpoints never lose a user's file and are checked on load: the manifest, what a save may replace,
recovery after a killed save (a real SIGKILL at every step of one), integrity and consistency checks."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.cli.main import main
from lowbit.config import FormatConfig
from lowbit.errors import CheckpointError
from lowbit.io.checkpoint import MANIFEST_FILE, check_out_path, is_checkpoint, load_checkpoint, read_meta
from lowbit.quantize import QuantRecipe

from conftest import tiny_model, tiny_tokenizer

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama, RTN int4 g32, saved once (hidden 64, MLP 96: q/o_proj are 64x64, k/v_proj 32x64)."""
    m = tiny_model("llama")
    lowbit.quantize(m, QuantRecipe(fmt=FormatConfig(bits=4, group_size=32)), progress=False)
    return lowbit.save(m, tmp_path_factory.mktemp("saved") / "ckpt", tiny_tokenizer(), source_model="old")


@pytest.fixture
def ckpt(saved, tmp_path):
    """A fresh copy of the saved checkpoint, alone in its folder."""
    return Path(shutil.copytree(saved, tmp_path / "w" / "ckpt"))


def _span(ckpt: Path, tensor: str) -> tuple[int, int]:
    """Byte range of ``tensor``'s data in model.safetensors (an 8-byte header length, the JSON header, data)."""
    raw = (ckpt / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8:8 + n])[tensor]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# ---------------------------------------------------------------- the manifest


def test_manifest_lists_every_file(ckpt):
    man = json.loads((ckpt / MANIFEST_FILE).read_text())
    assert man["format_version"] == 1 and man["lowbit_version"] == lowbit.__version__
    files = sorted(p.name for p in ckpt.iterdir() if p.name != MANIFEST_FILE)
    assert sorted(man["files"]) == files
    assert {"config.json", "lowbit.json", "model.safetensors", "tokenizer.json"} <= set(files)
    for rel, e in man["files"].items():
        data = (ckpt / rel).read_bytes()
        assert e == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# ---------------------------------------------------------------- a save owns only what it wrote


def test_save_refuses_a_folder_with_only_a_lowbit_json(ckpt, tmp_path):
    """`echo '{}' > u/lowbit.json` next to a thesis: the save names the files and deletes nothing."""
    u = tmp_path / "u"
    (u / "data").mkdir(parents=True)
    (u / "thesis.txt").write_text("four years")
    (u / "data" / "runs.csv").write_text("1,2")
    (u / "lowbit.json").write_text("{}\n")
    model = load_checkpoint(ckpt)
    for attempt in (lambda: check_out_path(u), lambda: lowbit.save(model, u)):
        with pytest.raises(CheckpointError, match=r"no valid lowbit.manifest.json.*data/, lowbit.json, thesis.txt"):
            attempt()
    assert (u / "thesis.txt").read_text() == "four years" and (u / "data" / "runs.csv").read_text() == "1,2"
    assert sorted(p.name for p in u.iterdir()) == ["data", "lowbit.json", "thesis.txt"]
    assert _siblings(u) == ["u", "w"]  # no temp folder left either


def test_save_refuses_a_checkpoint_holding_a_file_it_did_not_write(ckpt):
    (ckpt / "NOTES.md").write_text("what I tried")
    (ckpt / "plots").mkdir()
    (ckpt / "plots" / "a.png").write_bytes(b"png")
    model = load_checkpoint(ckpt)  # a load does not mind files the manifest does not list
    with pytest.raises(CheckpointError, match=r"also holds NOTES.md, plots/, which its lowbit.manifest.json does "
                                              r"not list .* move them out"):
        lowbit.save(model, ckpt)
    assert (ckpt / "NOTES.md").read_text() == "what I tried" and (ckpt / "plots" / "a.png").is_file()
    (ckpt / "NOTES.md").unlink()
    shutil.rmtree(ckpt / "plots")
    lowbit.save(model, ckpt, tiny_tokenizer(), source_model="again")  # its own files only: replaced
    assert read_meta(ckpt)["source_model"] == "again"
    assert _siblings(ckpt) == ["ckpt"]


def test_save_goes_to_a_new_or_empty_path(ckpt, tmp_path):
    model = load_checkpoint(ckpt)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        lowbit.save(model, out)
        load_checkpoint(out)


def test_checkpoint_without_manifest(ckpt, capsys):
    """No manifest: refused by a verified load (clear message), loaded with verify=False, never replaced."""
    (ckpt / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="not a complete lowbit checkpoint: lowbit.manifest.json is missing.*"
                                              "--no-verify"):
        load_checkpoint(ckpt)
    model = load_checkpoint(ckpt, verify=False)
    with pytest.raises(CheckpointError, match="no valid lowbit.manifest.json"):
        lowbit.save(model, ckpt)
    assert (ckpt / "model.safetensors").is_file()
    assert main(["-q", "info", str(ckpt)]) == 2
    assert "not a complete lowbit checkpoint" in capsys.readouterr().err
    assert main(["-q", "info", str(ckpt), "--no-verify"]) == 0


@pytest.mark.parametrize("cmd", ["eval", "run", "generate", "info", "export"])
def test_no_verify_flag_on_every_command_that_loads_a_checkpoint(cmd, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    assert "--no-verify" in capsys.readouterr().out


def test_manifest_that_does_not_list_the_weights(ckpt):
    man = json.loads((ckpt / MANIFEST_FILE).read_text())
    del man["files"]["model.safetensors"]
    (ckpt / MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="does not list model.safetensors"):
        load_checkpoint(ckpt)


# ---------------------------------------------------------------- integrity on load


def test_flipped_bytes_in_packed_codes(ckpt):
    a, b = _span(ckpt, "model.layers.1.mlp.down_proj.codes")
    wf = ckpt / "model.safetensors"
    byte = wf.read_bytes()[(a + b) // 2]
    _patch(wf, (a + b) // 2, bytes([byte ^ 0x10]))
    with pytest.raises(CheckpointError, match=r"model.safetensors in .* changed after the save: the sha256 differs"):
        load_checkpoint(ckpt)
    load_checkpoint(ckpt, verify=False)  # any code value is valid: only the hash sees it


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scales_are_refused_even_without_verify(ckpt, value, verify):
    name = "model.layers.0.self_attn.v_proj.scale"
    a, _ = _span(ckpt, name)
    _patch(ckpt / "model.safetensors", a + 2 * 5, torch.tensor([value], dtype=torch.float16).view(torch.uint8)
           .numpy().tobytes())
    with pytest.raises(CheckpointError, match=f"tensor '{name}' holds NaN or infinite values"):
        load_checkpoint(ckpt, verify=verify)


def test_same_shape_tensors_swapped_between_layers(saved, ckpt):
    """q_proj and o_proj are both 64x64: swapping their codes keeps every shape, the sha256 sees it."""
    wf = ckpt / "model.safetensors"
    raw = bytearray(wf.read_bytes())
    (a0, b0), (a1, b1) = (_span(ckpt, f"model.layers.0.self_attn.{n}_proj.codes") for n in ("q", "o"))
    raw[a0:b0], raw[a1:b1] = raw[a1:b1], raw[a0:b0]
    wf.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="changed after the save"):
        load_checkpoint(ckpt)
    ids = torch.tensor([[1, 5, 9, 33, 100]])
    with torch.no_grad():  # unchecked, it loads as a different model
        assert not torch.equal(load_checkpoint(saved)(ids).logits, load_checkpoint(ckpt, verify=False)(ids).logits)


def test_group_size_edit_is_caught(ckpt):
    """g32 -> g40 on 64 and 96 columns keeps every buffer shape (2 and 3 groups): the spec no longer matches
    the recipe (any load), and lowbit.json no longer matches its sha256 (verified load)."""
    meta = json.loads((ckpt / "lowbit.json").read_text())
    meta["modules"]["model.layers.1.mlp.down_proj"]["spec"]["format"]["group_size"] = 40
    (ckpt / "lowbit.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    for verify in (True, False):
        with pytest.raises(CheckpointError, match=r"module 'model.layers.1.mlp.down_proj' has format .*'group_size': "
                                                  r"40.*which the recipe does not name"):
            load_checkpoint(ckpt, verify=verify)
    # edited in the recipe too, the JSON is consistent again: only the hash catches it
    for fmt in [m["spec"]["format"] for m in meta["modules"].values()] + [meta["summary"]["recipe"]["fmt"]]:
        fmt["group_size"] = 40
    (ckpt / "lowbit.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    with pytest.raises(CheckpointError, match="lowbit.json in .* changed after the save"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("edit, words", [
    (lambda meta: [1, 2, 3], "holds an array, not the object lowbit writes"),
    (lambda meta: {**meta, "modules": {**meta["modules"], "model.layers.0.mlp.up_proj": "int4"}},
     "the entry of module 'model.layers.0.mlp.up_proj' is a string, not an object with a 'type' and a 'spec'"),
    (lambda meta: {**meta, "modules": {"model.layers.0.mlp.up_proj": {"type": "linear", "spec": {"codec": "scalar"}}}},
     r"module 'model.layers.0.mlp.up_proj' has an invalid spec \('format'\)"),
    (lambda meta: {**meta, "aliases": ["lm_head.weight"]}, "'aliases' is an array, not an object"),
])
def test_malformed_lowbit_json_is_a_clear_error(ckpt, edit, words):
    meta = json.loads((ckpt / "lowbit.json").read_text())
    (ckpt / "lowbit.json").write_text(json.dumps(edit(meta)))
    for verify in (True, False):
        with pytest.raises(CheckpointError, match=words):
            load_checkpoint(ckpt, verify=verify)


def test_spec_values_the_codec_cannot_hold(ckpt):
    meta = json.loads((ckpt / "lowbit.json").read_text())
    spec = meta["modules"]["model.layers.0.mlp.up_proj"]["spec"]
    for key, value, words in (("in_features", 64.0, "in_features must be a positive integer"),
                              ("group_size", 0, "group size must be a positive number"),
                              ("group_size", "32", "group_size must be an integer")):
        s = json.loads(json.dumps(spec))
        (s["format"] if key == "group_size" else s)[key] = value
        meta["modules"]["model.layers.0.mlp.up_proj"]["spec"] = s
        (ckpt / "lowbit.json").write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match=f"invalid spec .*{words}"):
            load_checkpoint(ckpt, verify=False)


# ---------------------------------------------------------------- what a killed save leaves behind


def test_old_folder_restored_on_load(ckpt, caplog):
    """Killed between the two renames: no checkpoint at the path, the previous one in .NAME.old-PID-X."""
    pid = _dead_pid()
    old = ckpt.with_name(f".ckpt.old-{pid}-1a2b3c4d")
    os.replace(ckpt, old)
    tmp = ckpt.with_name(f".ckpt.tmp-{pid}-k3j_x9qa.tmp")
    shutil.copytree(old, tmp)  # the new checkpoint, complete but not renamed yet
    assert is_checkpoint(ckpt)
    with caplog.at_level(logging.INFO, logger="lowbit"):
        model, _ = lowbit.load_model(str(ckpt))
    assert model is not None and read_meta(ckpt)["source_model"] == "old"
    assert _siblings(ckpt) == ["ckpt"]
    assert f"restored {ckpt} from .ckpt.old-{pid}-1a2b3c4d" in caplog.text
    assert f"removed {tmp}" in caplog.text


def test_stale_leftovers_cleaned_on_save_and_others_kept(ckpt, caplog):
    """Leftovers of dead processes go on the next save; a running process's, and names lowbit does not
    write, stay."""
    model = load_checkpoint(ckpt)
    dead, alive = _dead_pid(), os.getppid()
    keep = [f".ckpt.tmp-{alive}-abcd1234.tmp", ".ckpt.backup", ".ckpt.tmp-notapid", f".ckpt.old-{dead}.bak",
            f".ckpt.tmp-{dead}-abcd1234", "ckpt.tmp"]
    for name in [f".ckpt.tmp-{dead}-abcd1234.tmp", f".ckpt.old-{dead}", *keep]:
        (ckpt.parent / name).mkdir()
        (ckpt.parent / name / "big.bin").write_bytes(b"x" * 1000)
    with caplog.at_level(logging.INFO, logger="lowbit"):
        lowbit.save(model, ckpt)
    assert _siblings(ckpt) == sorted(["ckpt", *keep])
    assert caplog.text.count("left by an interrupted save of ckpt") == 2
    load_checkpoint(ckpt)


def test_a_failed_second_rename_puts_the_old_checkpoint_back(ckpt, monkeypatch):
    model = load_checkpoint(ckpt)
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the temp folder into place
            raise OSError("device gone")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="device gone"):
        lowbit.save(model, ckpt, source_model="new")
    monkeypatch.undo()
    assert read_meta(ckpt)["source_model"] == "old" and _siblings(ckpt) == ["ckpt"]
    load_checkpoint(ckpt)


def test_own_pid_leftover_is_stale(ckpt):
    """In a container a new run often has the pid of the killed one: a leftover named with our own pid that
    this process is not writing is stale."""
    tmp = ckpt.with_name(f".ckpt.tmp-{os.getpid()}-zzzz0000.tmp")
    tmp.mkdir()
    load_checkpoint(ckpt)
    assert not tmp.exists()


# ---------------------------------------------------------------- a real SIGKILL at every step of a save

_CHILD = textwrap.dedent('''
    """Load the checkpoint argv[1] once; per line k on stdin, fork a save of it (source_model "new") to argv[2]
    that stops before its k-th step (a file opened for writing, the weights file, a rename, a folder removal)
    and says so; the test kills it there with SIGKILL."""
    import builtins, io, os, shutil, sys, time
    import torch
    torch.set_num_threads(1)
    from transformers import AutoTokenizer
    import lowbit.io.checkpoint as ck

    model, tok = ck.load_checkpoint(sys.argv[1]), AutoTokenizer.from_pretrained(sys.argv[1])
    print("ready", flush=True)
    for line in sys.stdin:
        k, n = int(line), [0]
        pid = os.fork()
        if pid == 0:
            def step(what):
                n[0] += 1
                if n[0] == k:
                    print(f"paused {os.getpid()} {what}", flush=True)
                    time.sleep(120)
                    os._exit(3)

            def hook(fn, writes_only=False):
                def wrapped(*a, **kw):
                    mode = a[1] if len(a) > 1 else kw.get("mode", "r")
                    if not writes_only or any(c in str(mode) for c in "wxa+"):
                        path = next((x for x in a if isinstance(x, (str, os.PathLike))), "")
                        step(f"{fn.__name__} {os.path.basename(path)}")
                    return fn(*a, **kw)
                return wrapped

            builtins.open = io.open = hook(builtins.open, writes_only=True)
            os.replace, os.rename, shutil.rmtree = hook(os.replace), hook(os.rename), hook(shutil.rmtree)
            ck.save_file = hook(ck.save_file)
            ck.save_checkpoint(model, sys.argv[2], tok, {"source_model": "new"})
            print("done", flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
''')


def test_sigkill_at_every_step_of_a_save_leaves_old_or_new(saved, tmp_path):
    target = tmp_path / "w" / "ckpt"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    err = open(tmp_path / "child.err", "w")
    child = subprocess.Popen([sys.executable, str(script), str(saved), str(target)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x.strip()) for x in child.stdout], daemon=True).start()

    def next_line():
        try:
            return lines.get(timeout=120)
        except queue.Empty:
            child.kill()
            pytest.fail(f"the child said nothing for 120 s; its stderr: {(tmp_path / 'child.err').read_text()}")

    model = load_checkpoint(saved)
    seen = []
    try:
        assert next_line() == "ready"
        for k in range(1, 40):
            shutil.rmtree(target.parent, ignore_errors=True)
            shutil.copytree(saved, target)
            child.stdin.write(f"{k}\n")
            child.stdin.flush()
            said = next_line()
            if said == "done":
                assert next_line() == "reaped"
                break
            _, pid, what = said.split(" ", 2)
            os.kill(int(pid), signal.SIGKILL)
            assert next_line() == "reaped"
            # old or new is there (or restorable), never neither
            missing = not target.exists()
            assert is_checkpoint(target), (k, what, _siblings(target))
            if k % 2:   # the next load cleans up ...
                load_checkpoint(target)
                state = read_meta(target)["source_model"]
            else:       # ... as does the next save
                state = json.loads((target / "lowbit.json").read_text())["source_model"] if not missing else "old"
                lowbit.save(model, target, source_model=state)
                assert read_meta(target)["source_model"] == state
                load_checkpoint(target)
            assert state in ("old", "new"), (k, what)
            assert _siblings(target) == ["ckpt"], (k, what)
            seen.append((what, state, missing))
        else:
            pytest.fail("the save did not finish in 40 steps")
    finally:
        child.stdin.close()
        child.wait(timeout=60)
        err.close()
    steps = [what for what, _, _ in seen]
    assert any(w.startswith("save_file") for w in steps) and sum(w.startswith("replace") for w in steps) >= 2
    assert any(missing for _, _, missing in seen), "no kill fell between the two renames"
    assert {state for _, state, _ in seen} == {"old", "new"}
    assert load_checkpoint(target) is not None and read_meta(target)["source_model"] == "new"  # the last one ran
