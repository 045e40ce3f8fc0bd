"""CLI smoke tests on a tiny local model and text (no downloads)."""
import json
import os
import re

import pytest

from lowbit.cli import main


def test_quantize_info_eval_generate(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["-q", "quantize", str(tiny_dir), "--method", "rtn", "--bits", "3", "--group-size", "32",
                 "--out", str(out)]) == 0
    assert (out / "lowbit.json").is_file()
    assert main(["info", str(out)]) == 0
    assert "bpw blocks" in capsys.readouterr().out
    res = tmp_path / "results"
    assert main(["-q", "eval", str(out), "--ppl", str(text_file), "--seqlen", "32", "--windows", "4",
                 "--results-dir", str(res), "--model-name", "tiny"]) == 0
    files = list(res.glob("*.json"))
    assert len(files) == 1
    r = json.loads(files[0].read_text())
    assert r["model"] == "tiny" and r["method"] == "rtn"
    assert r["bpw"]["blocks"] == pytest.approx(3 + 19 / 32)
    items, weights = r["bpw_detail"]["blocks_items"], r["bpw_detail"]["blocks_weights"]
    assert set(items) == {"codes", "scale", "zero"} and items["codes"] == 3 * weights
    assert sum(items.values()) == r["bpw_detail"]["blocks_bits"]
    assert r["protocol"][str(text_file)]["n_windows"] == 4
    # the index names the folder it was built from (relative to the folder above its own)
    assert f"Generated from `{tmp_path.name}/results/*.json`" in (tmp_path / "results.md").read_text()
    capsys.readouterr()
    texts = []
    for loop in ("lean", "hf"):  # both decode loops give the same greedy text
        assert main(["-q", "generate", str(out), "the truth", "--max-new-tokens", "6", "--loop", loop]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()


def test_run_fp32_and_rtn(tiny_dir, text_file, tmp_path):
    res = tmp_path / "r"
    for extra in (["--method", "fp32"], ["--method", "rtn", "--bits", "4", "--head", "int8"]):
        assert main(["-q", "run", str(tiny_dir), *extra, "--ppl", str(text_file), "--seqlen", "32",
                     "--windows", "2", "--results-dir", str(res), "--model-name", "tiny"]) == 0
    rows = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in res.glob("*.json")}
    assert set(rows) == {"fp32", "rtn"}
    assert rows["fp32"]["bpw"]["blocks"] == 32
    assert rows["rtn"]["bpw"]["all_in"] < rows["fp32"]["bpw"]["all_in"]


@pytest.mark.parametrize("argv, msg", [
    (["--group-size", "0"], "positive number of columns or -1"),
    (["--bits", "12"], "2..8 bits"),
    (["--method", "nope"], "unknown method"),
    (["--method", "rtn", "--act-order"], "--act-order is a setting of gptq"),
    (["--method", "rtn", "--nsamples", "64"], "--nsamples sets calibration data, but --method rtn uses none"),
    (["--method", "awq", "--vector-len", "4"], "--vector-len is a setting of vptq, not of --method awq"),
])
def test_bad_flags_give_clear_errors(tiny_dir, tmp_path, capsys, argv, msg):
    rc = main(["-q", "quantize", str(tiny_dir), *argv, "--out", str(tmp_path / "x")])
    assert rc == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_fp32_takes_no_quantization_settings(tiny_dir, tmp_path, capsys):
    assert main(["-q", "run", str(tiny_dir), "--method", "fp32", "--bits", "3", "--results-dir", str(tmp_path)]) == 2
    assert "--method fp32 is the float reference and takes no quantization settings; drop --bits" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


def test_cli_and_library_share_recipe_defaults():
    """A flag left out takes its dataclass default: the CLI's recipe equals the library's."""
    from lowbit.cli import build_parser
    from lowbit.cli.main import recipe_from_args
    from lowbit.config import CalibConfig
    from lowbit.quantize import QuantRecipe, recipe_from_options

    args = build_parser().parse_args(["run", "m", "--method", "gptq"])
    r = recipe_from_args(args)
    assert r == recipe_from_options("gptq", {})
    assert r.calib == {"source": "wiki-train", "nsamples": 128, "seqlen": 512, "seed": 0} == vars(CalibConfig())
    assert QuantRecipe.from_dict(r.to_dict()) == r
    assert recipe_from_args(build_parser().parse_args(["run", "m", "--method", "rtn"])).calib is None


def test_missing_model_and_empty_text(tmp_path, tiny_dir, capsys):
    assert main(["-q", "eval", str(tmp_path / "missing-model")]) == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["-q", "eval", str(tiny_dir), "--ppl", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "empty" in err.lower()


def test_bad_out_or_text_fails_before_loading_and_keeps_files(tiny_dir, text_file, tmp_path, capsys, monkeypatch):
    """A save replaces its whole folder: --out may not be a file or a folder of other files. Checked, like
    the text sources, before the model is loaded, so a bad flag costs no quantization time."""
    import lowbit.api

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the bad flag was caught")

    monkeypatch.setattr(lowbit.api, "load_model", no_load)
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    work = tmp_path / "work"
    work.mkdir()
    (work / "draft.py").write_text("keep me too")
    q = ["-q", "quantize", str(tiny_dir), "--method", "rtn", "--out"]
    assert main(q + [str(afile)]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert main(q + [str(work)]) == 2
    assert "holds other files and no lowbit.json" in capsys.readouterr().err
    assert afile.read_text() == "keep me" and (work / "draft.py").read_text() == "keep me too"
    for argv in (["run", str(tiny_dir), "--method", "rtn", "--ppl", "no-such-text"],
                 ["run", str(tiny_dir), "--method", "gptq", "--calib", "hf:onlyname"],
                 ["eval", str(tiny_dir), "--ppl", str(text_file), "no-such-text"],
                 ["distill", str(tiny_dir), "--teacher-source", "no-such-text", "--out", str(tmp_path / "d")]):
        assert main(["-q", *argv]) == 2
        err = capsys.readouterr().err
        assert "no-such-text' is not a zoo text" in err or "bad dataset reference 'hf:onlyname'" in err


@pytest.mark.parametrize("argv, words", [
    (["eval", "M", "--seqlen", "0"], "argument --seqlen: must be at least 2, got 0"),
    (["eval", "M", "--windows", "0"], "argument --windows: must be at least 1, got 0; or 'all'"),
    (["eval", "M", "--windows", "al"], "argument --windows: expected an integer, got 'al'"),
    (["run", "M", "--method", "gptq", "--nsamples", "0"], "argument --nsamples: must be at least 1"),
    (["generate", "M", "hi", "--max-new-tokens", "-3"], "argument --max-new-tokens: must be at least 1, got -3"),
    (["generate", "M", "hi", "--temperature", "-1"], "argument --temperature: must be at least 0.0, got -1"),
    (["bench", "r.yaml", "--jobs", "0"], "argument --jobs: must be at least 1, got 0"),
])
def test_counts_are_checked_when_parsed(capsys, argv, words):
    with pytest.raises(SystemExit):
        main(argv)
    assert words in capsys.readouterr().err


def test_windows_longer_than_the_context_fail_before_quantizing(tiny_dir, text_file, tmp_path, capsys, monkeypatch):
    """The tiny model's context is 256 tokens: longer windows or generations are refused up front."""
    import lowbit.api

    def no_quantize(*a, **kw):
        raise AssertionError("quantized before the bad length was caught")

    monkeypatch.setattr(lowbit.api, "quantize", no_quantize)
    run = ["-q", "run", str(tiny_dir), "--method", "gptq", "--ppl", str(text_file), "--device", "cpu"]
    assert main(run + ["--seqlen", "257"]) == 2
    assert "--seqlen 257 is longer than the model's context of 256 tokens" in capsys.readouterr().err
    assert main(run + ["--seqlen", "32", "--calib", str(text_file), "--calib-seqlen", "300"]) == 2
    assert "--calib-seqlen 300 is longer than the model's context of 256" in capsys.readouterr().err
    gen = ["-q", "generate", str(tiny_dir), "--device", "cpu"]
    assert main(gen + ["the", "--max-new-tokens", "300"]) == 2
    m = re.search(r"the prompt \((\d+) tokens\) plus .* use --max-new-tokens (\d+) or less", capsys.readouterr().err)
    assert m and int(m[1]) + int(m[2]) == 256
    assert main(gen + ["", "--max-new-tokens", "3"]) == 2
    assert "the prompt is empty after tokenization" in capsys.readouterr().err
    assert main(gen + ["the", "--max-new-tokens", "3"]) == 0


def test_save_goes_to_a_new_empty_or_checkpoint_folder(tiny_dir, tmp_path):
    import lowbit
    from lowbit.errors import CheckpointError

    model, tok = lowbit.load_model(str(tiny_dir))
    out = tmp_path / "ck"
    lowbit.save(model, out, tok)                 # new
    lowbit.save(model, out, tok)                 # an earlier checkpoint: replaced
    (tmp_path / "empty").mkdir()
    lowbit.save(model, tmp_path / "empty", tok)  # empty
    with pytest.raises(CheckpointError, match="holds other files"):
        lowbit.save(model, tiny_dir, tok)        # an HF folder without lowbit.json
    assert (tiny_dir / "config.json").is_file() and not (tiny_dir / "lowbit.json").exists()


def test_device_flag(tiny_dir, text_file, tmp_path, capsys):
    import torch

    res = tmp_path / "r"
    assert main(["-q", "run", str(tiny_dir), "--method", "rtn", "--ppl", str(text_file), "--seqlen", "32",
                 "--windows", "2", "--results-dir", str(res), "--device", "cpu"]) == 0
    (r,) = [json.loads(p.read_text()) for p in res.glob("*.json")]
    assert r["env"]["device"] == "cpu"
    import transformers

    assert r["env"]["transformers"] == transformers.__version__
    if hasattr(os, "getloadavg"):  # the machine's load is recorded beside the run's own threads
        assert r["env"]["cpus"] == os.cpu_count() and r["env"]["load_avg_15m"] >= 0
    assert main(["-q", "run", str(tiny_dir), "--device", "tpu:7"]) == 2
    assert "is not a device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["-q", "run", str(tiny_dir), "--device", "cuda"]) == 2
        assert "sees no CUDA GPU; use --device cpu" in capsys.readouterr().err


def test_run_records_activation_precision_mix(tiny_dir, text_file, tmp_path):
    res = tmp_path / "r"
    assert main(["-q", "run", str(tiny_dir), "--method", "w8a8", "--format", "int", "--bits", "8", "--sym",
                 "--group-size", "-1", "--ppl", str(text_file), "--seqlen", "32", "--windows", "2",
                 "--results-dir", str(res), "--device", "cpu"]) == 0
    (r,) = [json.loads(p.read_text()) for p in res.glob("*.json")]
    act = r["act_linears"]
    assert act["int4_share"] == 0.0 and act["flatten_overhead"] == 0.0
    assert act["macs_per_token"] == {"W8A8": 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 96)}  # q,o + k,v + MLP, 2 layers


@pytest.mark.parametrize("cmd, flag, words", [
    (["distill", "--help"], "--init", "student init"),
    (["run", "--help"], "--ft-steps", "fine-tuning"),
    (["quantize", "--help"], "--format", "int | fp | nf"),
])
def test_generated_flags_carry_their_config_comment_as_help(capsys, cmd, flag, words):
    with pytest.raises(SystemExit):
        main(cmd)
    out = " ".join(capsys.readouterr().out.split())   # argparse wraps help lines
    options = out.split("options:", 1)[1]
    assert flag in options and words in options.split(flag, 1)[1][:300]


def test_every_config_flag_has_a_description():
    from lowbit.cli.args import field_docs
    from lowbit.config import BlockTuneConfig, FormatConfig
    from lowbit.distill.train import DistillConfig
    from lowbit.methods.vptq import VPTQConfig
    from lowbit.methods import get_method, method_names
    from dataclasses import fields, is_dataclass
    method_cfgs = [get_method(n).config for n in method_names() if is_dataclass(get_method(n).config)]
    for cls in (FormatConfig, BlockTuneConfig, DistillConfig, VPTQConfig, *method_cfgs):
        undocumented = [f.name for f in fields(cls) if f.init and f.name not in field_docs(cls)]
        assert undocumented == [], f"{cls.__name__}: add a trailing comment to {undocumented}"


def test_readme_commands_parse():
    """Every `lowbit ...` line of the README's command list is accepted by the CLI parser as written."""
    import shlex
    from pathlib import Path

    from lowbit.cli import build_parser

    readme = Path(__file__).resolve().parents[1] / "README.md"
    lines = [l.strip() for l in readme.read_text().splitlines() if l.startswith("    lowbit ")]
    assert len(lines) >= 15
    parser = build_parser()
    for line in lines:
        argv = shlex.split(line, comments=True)[1:]
        args = parser.parse_args(argv)  # argparse exits (SystemExit) on an unknown flag or subcommand
        assert callable(args.fn), line


def test_generate_kernel_act_q8(tiny_dir, tmp_path, capsys, monkeypatch):
    """``--kernel-act q8`` runs the int8-input kernels for the command only."""
    import os

    import lowbit.kernels.ops as kops

    if not kops.kernels_active("gemm_q8"):
        pytest.skip("lowbit C++ kernels not built")
    out = tmp_path / "q4"
    assert main(["-q", "quantize", str(tiny_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--out", str(out)]) == 0
    seen = []
    real = kops.kernel_activations
    monkeypatch.setattr(kops, "kernel_activations", lambda: seen.append(real()) or seen[-1])
    monkeypatch.delenv("LOWBIT_KERNEL_ACT", raising=False)
    capsys.readouterr()
    assert main(["-q", "generate", str(out), "the truth", "--max-new-tokens", "4", "--kernel-act", "q8",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()
    assert seen and set(seen) == {"q8"}
    assert "LOWBIT_KERNEL_ACT" not in os.environ


def test_bench_kernels_shapes_and_gemv_only(tmp_path, capsys):
    """--shapes picks the layers, --batches with no values skips the GEMM columns; a bad shape is a usage error."""
    js, md = tmp_path / "k.json", tmp_path / "k.md"
    assert main(["-q", "bench-kernels", "--formats", "int4-g128", "--shapes", "64x96", "40X32", "--batches",
                 "--repeats", "2", "--json", str(js), "--md", str(md)]) == 0
    rows = json.loads(js.read_text())[0]["rows"]
    assert [(r["out"], r["in"], r["gemm"]) for r in rows] == [(64, 96, {}), (40, 32, {})]
    assert "| int4-g128 | 64x96 |" in md.read_text() and "b16 GFLOP/s" not in md.read_text()
    with pytest.raises(SystemExit):
        main(["bench-kernels", "--shapes", "64by96"])
    assert "expected OUTxIN" in capsys.readouterr().err


def test_quiet_silences_transformers_progress_bars_too(tiny_dir, text_file):
    """-q promises no progress bars; transformers' own ("Loading weights") read their switch at import,
    so this runs in a fresh process."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "lowbit", "eval", str(tiny_dir), "--ppl", str(text_file), "--seqlen", "32",
            "--windows", "2", "--no-record", "--device", "cpu"]
    # earlier in-process `main(["-q", ...])` calls leave these set in this process's environment
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    loud = subprocess.run(argv, capture_output=True, text=True, check=True, env=env)
    quiet = subprocess.run(argv[:3] + ["-q"] + argv[3:], capture_output=True, text=True, check=True, env=env)
    bar = f"ppl {text_file}: 100%"
    assert "Loading weights" in loud.stderr and bar in loud.stderr     # the bars the flag removes
    assert "Loading weights" not in quiet.stderr and bar not in quiet.stderr
    assert "ppl" in quiet.stdout and f"{text_file} " in quiet.stdout   # the result still prints (rich wraps it)
