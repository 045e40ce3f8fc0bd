"""Bad inputs fail early and by name: incomplete or damaged weights, pickles, non-finite weights and results,
unwritable outputs, resume folders of another run. Tiny models only."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit import api
from lowbit.config import EvalConfig, FormatConfig
from lowbit.errors import CheckpointError
from lowbit.quantize import QuantRecipe

from conftest import tiny_model, tiny_tokenizer


def _rewrite_weights(folder: Path, keep) -> list[str]:
    """Rewrite ``folder/model.safetensors`` with only the tensors ``keep(name)`` accepts; returns the dropped names."""
    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    dropped = sorted(k for k in tensors if not keep(k))
    save_file({k: v for k, v in tensors.items() if keep(k)}, str(f), metadata={"format": "pt"})
    return dropped


def _ev(text_file) -> EvalConfig:
    return EvalConfig(ppl=(str(text_file),), seqlen=32, windows=2)


# ------------------------------------------------------------------ strict loading

def test_every_tiny_architecture_loads_complete(arch, tmp_path):
    """Tied heads (Llama, Gemma-3) and untied ones load without a missing or unexpected key."""
    d = tmp_path / arch
    tiny_model(arch).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    model, _ = api.load_model(str(d))
    assert model.config.num_hidden_layers == 2


def test_folder_missing_a_layer_is_refused_everywhere(tiny_dir, text_file, tmp_path, capsys):
    dropped = _rewrite_weights(tiny_dir, lambda k: ".layers.1." not in k)
    assert dropped
    with pytest.raises(CheckpointError, match=r"9 weight\(s\) missing") as e:
        api.load_model(str(tiny_dir))
    assert dropped[0] in str(e.value) and "random" in str(e.value)
    with pytest.raises(CheckpointError, match=dropped[0]):
        api.quantize_named(str(tiny_dir), QuantRecipe(), out=tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()
    with pytest.raises(CheckpointError, match=dropped[0]):
        api.evaluate(str(tiny_dir), _ev(text_file), progress=False)
    with pytest.raises(CheckpointError, match=dropped[0]):
        api.run(str(tiny_dir), QuantRecipe(), _ev(text_file), progress=False)
    from lowbit.cli import main

    assert main(["-q", "distill", str(tiny_dir), "--teacher-source", str(text_file), "--out", str(tmp_path / "d")]) == 2
    assert dropped[0] in capsys.readouterr().err


def test_wrong_shape_and_extra_tensor_are_refused(tiny_dir):
    f = tiny_dir / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(5, 5)
    tensors["model.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        api.load_model(str(tiny_dir))
    msg = str(e.value)
    assert "model.layers.0.mlp.up_proj.weight: (5, 5) in the files, (96, 64) in the model" in msg
    assert "model.extra.weight" in msg


def test_checkpoint_without_lowbit_json_is_refused(tiny_dir, text_file, tmp_path):
    model, tok = api.load_model(str(tiny_dir))
    api.quantize(model, QuantRecipe(), progress=False)
    ckpt = api.save(model, tmp_path / "ckpt", tok)
    (ckpt / "lowbit.json").unlink()
    with pytest.raises(CheckpointError, match="lowbit.json was deleted") as e:
        api.load_model(str(ckpt))
    assert "model.layers.0.mlp.down_proj.weight" in str(e.value) and "down_proj.codes" in str(e.value)
    with pytest.raises(CheckpointError, match="missing"):
        api.evaluate(str(ckpt), _ev(text_file), progress=False)


def test_truncated_shard_is_refused(tmp_path):
    d = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(d, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(d)
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt, truncated") as e:
        api.load_model(str(d))
    assert shards[-1].name in str(e.value)  # the error names the damaged shard


def test_pickle_only_folder_is_refused_without_unpickling(tiny_dir, monkeypatch):
    tensors = load_file(str(tiny_dir / "model.safetensors"))
    (tiny_dir / "model.safetensors").unlink()
    torch.save(tensors, tiny_dir / "pytorch_model.bin")

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError, match="never unpickles") as e:
        api.load_model(str(tiny_dir))
    assert "pytorch_model.bin" in str(e.value) and "save_pretrained" in str(e.value)


# ------------------------------------------------------------------ non-finite weights and results

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_refused_by_name(bad):
    model = tiny_model("llama")
    w = model.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        w[3, :2] = bad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight \(96, 64\)") as e:
        api.quantize(model, QuantRecipe(), progress=False)
    counts = "2 NaN and 0 Inf" if bad != bad else "0 NaN and 2 Inf"
    assert f"holds {counts} value(s) of 6144" in str(e.value)
    after = model.state_dict()   # refused before any layer was touched
    assert all(torch.equal(before[k], after[k]) for k in before if torch.isfinite(before[k]).all())


def test_distill_refuses_non_finite_teacher_before_any_work(tmp_path):
    from lowbit.distill.train import DistillConfig, distill, work_dir

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight \(320, 64\) holds 1 NaN"):
        distill(model, tiny_tokenizer(), FormatConfig(), DistillConfig(), tmp_path / "d", progress=False)
    assert not work_dir(tmp_path / "d").exists()


def _strict_json(path: Path) -> dict:
    def refuse(name):
        raise AssertionError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_infinite_perplexity_is_recorded_as_null_with_a_reason(tmp_path, text_file, capsys):
    from lowbit.cli import main
    from lowbit.report.pages import write_report

    d = tmp_path / "diverged"
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))   # every logit NaN: the loss is not finite
    model.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    res_dir = tmp_path / "results"
    assert main(["-q", "eval", str(d), "--ppl", str(text_file), "--seqlen", "32", "--windows", "2",
                 "--results-dir", str(res_dir), "--model-name", "tiny"]) == 0
    assert f"ppl {text_file} n/a" in capsys.readouterr().out.replace("\n", "")
    (f,) = res_dir.glob("*.json")
    rec = _strict_json(f)
    assert rec["ppl"] == {str(text_file): None}
    assert rec["nonfinite"][str(text_file)].startswith("perplexity is inf")
    write_report(res_dir)   # every page builds; the tables say n/a
    assert "| n/a |" in (tmp_path / "results.md").read_text()
    assert "| n/a |" in (tmp_path / "leaderboard.md").read_text()


def test_write_result_refuses_any_other_non_finite_number(tmp_path):
    from lowbit.eval.record import write_result

    res = {"model": "m", "method": "rtn", "tag": "", "config": {}, "bpw": {"blocks": 4.0, "all_in": float("nan")},
           "ppl": {"wiki": float("inf")}, "protocol": {}, "quant_time_s": 0.0, "peak_mem_gb": 0.1,
           "lowbit_version": "0"}
    with pytest.raises(ValueError, match=r"bpw\.all_in = nan"):
        write_result(res, tmp_path)
    res["bpw"]["all_in"] = 4.5
    rec = _strict_json(write_result(res, tmp_path))
    assert rec["ppl"] == {"wiki": None} and "inf" in rec["nonfinite"]["wiki"]


# ------------------------------------------------------------------ outputs checked before the model loads

@pytest.fixture
def no_loading(monkeypatch):
    """Any model or checkpoint load fails the test: the checks must come first."""
    def fail(*a, **k):
        raise AssertionError("a model was loaded before the output check")

    monkeypatch.setattr(api, "load_model", fail)
    monkeypatch.setattr("lowbit.io.load_checkpoint", fail)


def _refuse_writes(monkeypatch):
    """Creating a file anywhere fails from now on, as in a read-only folder (root ignores chmod, so simulated)."""
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_fails_before_loading(tiny_dir, tmp_path, no_loading):
    from lowbit.errors import OutputError

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match=f"cannot write in {ro}"):
            api.quantize_named(str(tiny_dir), QuantRecipe(), out=ro / "sub" / "q", progress=False)
    finally:
        ro.chmod(0o755)


def test_unwritable_outputs_fail_before_loading(tiny_dir, text_file, tmp_path, no_loading, monkeypatch, capsys):
    from lowbit.cli import main
    from lowbit.errors import OutputError

    model = tiny_model("llama")
    api.quantize(model, QuantRecipe(), progress=False)
    ckpt = api.save(model, tmp_path / "ckpt")
    _refuse_writes(monkeypatch)
    with pytest.raises(OutputError, match=r"--out .*q: cannot write in .*\(Permission denied\)"):
        api.quantize_named(str(tiny_dir), QuantRecipe(), out=tmp_path / "new" / "q", progress=False)
    common = ["--ppl", str(text_file), "--seqlen", "32", "--windows", "2"]
    for argv in (["run", str(tiny_dir), *common, "--results-dir", str(tmp_path / "res")],
                 ["eval", str(tiny_dir), *common, "--results-dir", str(tmp_path / "res")],
                 ["distill", str(tiny_dir), "--teacher-source", str(text_file), "--out", str(tmp_path / "d")],
                 ["export", str(ckpt), "--to", "gptq", "--out", str(tmp_path / "e")]):
        capsys.readouterr()
        assert main(["-q", *argv]) == 2, argv
        assert "cannot write in" in capsys.readouterr().err, argv


def test_too_little_disk_space_fails_before_loading(tiny_dir, tmp_path, no_loading, monkeypatch):
    import shutil
    from collections import namedtuple

    from lowbit.errors import OutputError
    from lowbit.quantize import recipe_from_options

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(OutputError, match=r"has 0.0 MiB free, and the output needs about .*MiB \(0.1M parameters "
                                          r"at int4-g128, embedding and head at float16, with the resume folder\)"):
        api.quantize_named(str(tiny_dir), recipe_from_options("gptq", {"nsamples": 4, "calib": "wiki"}),
                           out=tmp_path / "q", progress=False)


def test_checkpoint_size_estimate_is_close(tiny_dir, tmp_path):
    from lowbit.models.loading import local_weights_summary
    from lowbit.quantize import estimate_output_bytes

    n, config = local_weights_summary(str(tiny_dir))
    assert n == sum(p.numel() for p in tiny_model("llama").parameters())
    recipe = QuantRecipe()
    need, _ = estimate_output_bytes(recipe, n, config)
    out = api.quantize_named(str(tiny_dir), recipe, out=tmp_path / "q", progress=False)[0]
    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert size < need < 1.5 * size


# ------------------------------------------------------------------ resume

def _calib_ids(n=8, seqlen=32):
    return torch.randint(3, 320, (n, seqlen), generator=torch.Generator().manual_seed(0))


GPTQ = QuantRecipe(method="gptq", fmt=FormatConfig(bits=3, group_size=32))


def test_resume_folder_of_another_model_is_refused(tmp_path, text_file, caplog):
    from lowbit.errors import ConfigError
    from lowbit.quantize import recipe_from_options

    recipe = recipe_from_options("gptq", {"calib": str(text_file), "nsamples": 4, "calib_seqlen": 32})
    dirs = {}
    for name, seed in (("a", 0), ("b", 1)):
        dirs[name] = tmp_path / name
        tiny_model("llama", seed=seed).save_pretrained(dirs[name])
        tiny_tokenizer().save_pretrained(dirs[name])
    out = tmp_path / "q"
    model, tok = api.load_model(str(dirs["a"]))   # an interrupted run of model a leaves finished blocks
    api.quantize(model, recipe, api.calibration_windows(recipe, tok, model), progress=False,
                 resume_dir=tmp_path / "q.resume")
    with pytest.raises(ConfigError, match=r"holds blocks of another run \(different model\).*run without --resume"):
        api.quantize_named(str(dirs["b"]), recipe, out=out, resume=True, progress=False)
    assert (tmp_path / "q.resume" / "block0001").is_dir()   # nothing deleted
    with caplog.at_level("INFO", logger="lowbit.calib.engine"):
        api.quantize_named(str(dirs["a"]), recipe, out=out, resume=True, progress=False)
    assert "resuming after block 1" in caplog.text
    assert (out / "lowbit.json").is_file() and not (tmp_path / "q.resume").exists()


@pytest.mark.parametrize("damage, redo_from", [
    ("delete block0001", 1),                 # a gap: block 0 kept no inputs, they are recomputed
    ("delete block0003", 3),                 # the newest block: block 2's outputs are recomputed
    ("truncate block0002/block.safetensors", 2),
    ("garble block0000/block.json", 0),
])
def test_missing_or_damaged_block_is_redone_bit_exact(tmp_path, monkeypatch, caplog, damage, redo_from):
    import shutil

    import lowbit.methods.gptq as g

    ref = tiny_model("llama", layers=4)
    api.quantize(ref, GPTQ, _calib_ids(), progress=False, resume_dir=tmp_path / "r")   # uninterrupted
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [f"block000{i}" for i in range(4)]
    what, rel = damage.split()
    path = tmp_path / "r" / rel
    if what == "delete":
        shutil.rmtree(path)
    elif what == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.write_text("{not json")
    real, calls = g.gptq_quantize, {"n": 0}

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(g, "gptq_quantize", counting)
    model = tiny_model("llama", layers=4)
    with caplog.at_level("INFO", logger="lowbit.calib.engine"):
        api.quantize(model, GPTQ, _calib_ids(), progress=False, resume_dir=tmp_path / "r")
    assert calls["n"] == 7 * (4 - redo_from)    # 7 linears per block, only the blocks from the gap on
    if redo_from < 3:
        assert f"block {redo_from} is " in caplog.text and f"redoing blocks {redo_from} to 3" in caplog.text
    if redo_from > 0:   # only the newest block keeps its outputs, and it is gone or after the gap
        assert f"recomputing the inputs of block {redo_from}" in caplog.text
    want, got = ref.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


# ------------------------------------------------------------------ lowbit info

def test_info_describes_the_stored_modules_not_the_recipe(tmp_path, capsys):
    from lowbit.cli import main
    from lowbit.config import parse_format_tag

    model = tiny_model("llama")
    recipe = QuantRecipe(method="vptq", fmt=FormatConfig(bits=4, group_size=32), head=parse_format_tag("int8"),
                         method_config={"vector_len": 4, "codebook_size": 16, "kmeans_iters": 2})
    api.quantize(model, recipe, _calib_ids(4), progress=False)
    ckpt = api.save(model, tmp_path / "vq", tiny_tokenizer())
    capsys.readouterr()
    assert main(["info", str(ckpt)]) == 0
    head = capsys.readouterr().out.split("┏")[0]
    assert "int4-g32" not in head   # the recipe's scalar format, which VPTQ does not use
    assert "14 linear vq v4 k16" in head and "1 linear int8-pc: lm_head" in head


def test_gguf_missing_a_layer_is_refused(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    api.quantize(model, QuantRecipe(fmt=FormatConfig(bits=4, group_size=32, sym=True)), progress=False)
    ckpt = api.save(model, tmp_path / "ckpt", tiny_tokenizer())
    real = gguf.GGUFWriter.add_tensor

    def skip_layer_1(self, name, *a, **k):
        return None if name.startswith("blk.1.") else real(self, name, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", skip_layer_1)
    path = api.export(ckpt, "gguf", tmp_path / "t.gguf")
    with pytest.raises(CheckpointError, match=r"t\.gguf do not match.*model\.layers\.1\.input_layernorm\.weight"):
        api.load_model(str(path))
    assert not list((tmp_path / "cache").glob("models/*"))   # nothing converted into the cache
