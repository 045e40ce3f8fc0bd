"""Bench recipes (clear errors, cache reuse), Pareto front, leaderboard and plots from synthetic results."""
import json
from pathlib import Path

import pytest

from lowbit.bench.grid import load_recipe, parse_recipe, run_argv, run_bench
from lowbit.errors import ConfigError, LowbitError
from lowbit.eval.ppl import PROTOCOL_VERSION
from lowbit.report.pages import render_leaderboard, write_report
from lowbit.report.plots import pareto_front
from lowbit.eval.record import write_result

GOOD = {"models": ["m"], "methods": ["fp32", "rtn"], "configs": [{"bits": 4, "group_size": 128}, {"bits": 3}],
        "eval": {"ppl": ["wiki"], "windows": 4, "tasks": "piqa", "limit": 10}}


def test_recipe_grid_and_argv():
    r = parse_recipe(GOOD)
    assert [x.label() for x in r.runs] == ["m fp32", "m rtn bits=4 group_size=128", "m rtn bits=3"]
    argv = run_argv(r.runs[1], r.eval, "out")
    assert argv[:4] == ["run", "m", "--method", "rtn"]
    assert "--group-size" in argv and argv[argv.index("--limit") + 1] == "10"
    per_method = parse_recipe({"models": "m", "methods": {"rtn": [{"bits": 2, "sym": True}]}})
    assert per_method.runs[0].config == (("bits", 2), ("sym", True))
    assert "--sym" in run_argv(per_method.runs[0], {}, "out")


@pytest.mark.parametrize("patch, msg", [
    ({"model": ["m"]}, "unknown key 'model'; a recipe has: models"),
    ({"models": None}, "missing `models`"),
    ({"models": [3]}, "`models` must be a list of model names"),
    ({"methods": ["rtm"]}, "unknown method 'rtm'"),
    ({"configs": [{"bitz": 4}]}, "configs[0]: unknown key 'bitz'"),
    ({"configs": [{"bits": "4b"}]}, "configs[0].bits: expected an integer, got '4b' (str); write it like `bits: 4`"),
    ({"configs": [{"sym": "yes"}]}, "configs[0].sym: expected true or false"),
    ({"configs": [{"windows": 4}]}, "unknown key 'windows' (set it under `eval:`)"),
    ({"eval": {"tasks": "socialiqa"}}, "eval.tasks: unknown zero-shot task"),
    ({"eval": {"seqlen": "long"}}, "eval.seqlen: expected an integer"),
    ({"eval": {"limit": 0}}, "eval.limit: limit must be a positive number"),
    ({"eval": {"ppl": "wiki", "lr": 1}}, "eval: unknown key 'lr'"),
    ({"configs": [{"act_order": True}]}, "methods.rtn {act_order=True}: --act-order is a setting of gptq"),
])
def test_recipe_errors_name_the_key_and_the_fix(patch, msg):
    data = {**GOOD, **patch}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(LowbitError) as e:
        parse_recipe(data, "r.yaml")
    assert msg in str(e.value) and str(e.value).startswith("r.yaml")


def test_recipe_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [m\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_example_recipe_parses():
    r = load_recipe("recipes/rtn_grid.yaml")
    assert r.runs[0].method == "fp32" and len(r.runs) > 2


def test_bench_runs_then_reuses_cache(tiny_dir, text_file, tmp_path, capsys):
    from lowbit.cli import main

    res = tmp_path / "docs" / "results"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: ['{tiny_dir}']\nmethods: {{fp32: , rtn: [{{bits: 4, group_size: 32}}]}}\n"
                      f"eval: {{ppl: ['{text_file}'], seqlen: 32, windows: 2}}\nresults_dir: '{res}'\n")
    assert main(["-q", "bench", str(recipe)]) == 0
    files = sorted(p.name for p in res.glob("*.json"))
    assert files == ["tiny-llama__fp32.json", "tiny-llama__rtn__int4-g32.json"]
    assert (tmp_path / "docs" / "leaderboard.md").is_file()
    assert (tmp_path / "docs" / "plots" / "pareto_tiny-llama.png").is_file()
    stamp = {p.name: p.stat().st_mtime_ns for p in res.glob("*.json")}
    plan = run_bench(load_recipe(recipe), quiet=True)
    assert [p["status"] for p in plan] == ["cached", "cached"]
    assert {p.name: p.stat().st_mtime_ns for p in res.glob("*.json")} == stamp
    plan = run_bench(load_recipe(recipe), force=True, dry_run=True)
    assert [p["status"] for p in plan] == ["planned"] * 2
    # a dry run estimates each point from the earlier results of its model and method on this kind of device
    for p, name in zip(plan, files):
        r = json.loads((res / name).read_text())
        assert p["est_n"] == 1 and p["est_s"] == pytest.approx(r["quant_time_s"] + r["eval_time_s"])
    recipe.write_text(recipe.read_text().replace("rtn:", "gptq:"))
    plan = run_bench(load_recipe(recipe), dry_run=True)
    assert [(p["status"], p.get("est_n")) for p in plan] == [("cached", None), ("planned", 0)]
    assert plan[1]["est_s"] is None
    capsys.readouterr()
    assert main(["-q", "bench", str(recipe), "--dry-run", "--force"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith("planned  lowbit -q run") and "# ~" in out.splitlines()[0]
    assert "2 of 2 points planned; about" in err and "(1 point(s) with no earlier run to go by)" in err


def test_bench_parallel_jobs_match_serial(tiny_dir, text_file, tmp_path):
    """--jobs 2 runs each point in its own process; the files equal a serial run's (same config, same ppl)."""
    out = {}
    for jobs in (1, 2):
        res = tmp_path / f"j{jobs}" / "results"
        recipe = tmp_path / f"r{jobs}.yaml"
        recipe.write_text(f"models: ['{tiny_dir}']\nmethods: {{rtn: [{{bits: 4, group_size: 32}}, {{bits: 3, group_size: 32}}]}}\n"
                          f"eval: {{ppl: ['{text_file}'], seqlen: 32, windows: 2}}\nresults_dir: '{res}'\n")
        plan = run_bench(load_recipe(recipe), quiet=True, jobs=jobs, device="cpu", log_dir=tmp_path / f"logs{jobs}")
        assert [p["status"] for p in plan] == ["done", "done"]
        assert all(p["argv"][-2:] == ["--device", "cpu"] for p in plan)
        out[jobs] = {p.name: json.loads(p.read_text()) for p in res.glob("*.json")}
    assert sorted(out[1]) == sorted(out[2]) == ["tiny-llama__rtn__int3-g32.json", "tiny-llama__rtn__int4-g32.json"]
    for name in out[1]:
        assert out[1][name]["ppl"] == out[2][name]["ppl"]
        assert out[2][name]["env"]["device"] == "cpu"
    assert len(list((tmp_path / "logs2").glob("*.log"))) == 2


def test_parallel_cpu_jobs_split_the_cores(monkeypatch):
    import os

    from lowbit.bench.grid import job_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert (job_threads(2, "cpu"), job_threads(3, "cpu"), job_threads(16, "cpu"), job_threads(1, "cpu")) == (4, 2, 1, None)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert job_threads(2, "cpu") is None   # the user's setting wins


def test_bench_parallel_reports_a_failed_point(tiny_dir, text_file, tmp_path, caplog):
    recipe, missing, res = tmp_path / "r.yaml", tmp_path / "no-such-model", tmp_path / "res"
    recipe.write_text(f"models: ['{tiny_dir}', '{missing}']\nmethods: [rtn]\n"
                      f"eval: {{ppl: ['{text_file}'], seqlen: 32, windows: 2}}\nresults_dir: '{res}'\n")
    plan = run_bench(load_recipe(recipe), quiet=True, jobs=2, log_dir=tmp_path / "logs")
    assert sorted(p["status"] for p in plan) == ["done", "failed"]
    assert "1 of 2 grid points failed" in caplog.text


# ------------------------------------------------------------------ reports from synthetic JSON files

def fake(method, tag, blocks, all_in, ppl, zs=None):
    r = {"model": "toy-1m", "method": method, "tag": tag, "config": {}, "bpw": {"blocks": blocks, "all_in": all_in},
         "ppl": {"wiki": ppl}, "protocol": {"wiki": {"seqlen": 512, "n_windows": 40, "bos": False}},
         "quant_time_s": 1.0, "peak_mem_gb": None, "lowbit_version": "0", "protocol_version": PROTOCOL_VERSION}
    if zs is not None:
        r["zeroshot"] = {"piqa": {"acc": zs, "acc_norm": zs, "n": 10, "chance": 0.5}}
        r["zeroshot_avg"] = {"acc": zs, "acc_norm": zs, "chance": 0.5, "n_tasks": 1}
        r["zeroshot_protocol"] = {"limit": 10, "seed": 1234}
    return r


SYNTH = [fake("fp32", "", 32, 32, 20.0, 0.6), fake("rtn", "int4-g128", 4.25, 6.7, 24.0, 0.55),
         fake("rtn", "int3-g128", 3.25, 5.9, 60.0), fake("gptq", "int3-g128", 3.25, 5.9, 35.0, 0.52),
         fake("rtn", "int4-g32", 5.0, 7.5, 26.0)]   # dominated by int4-g128


def test_pareto_front():
    pts = [(r["bpw"]["all_in"], r["ppl"]["wiki"]) for r in SYNTH]
    assert pareto_front(pts) == [3, 1, 0]
    assert pareto_front([(1, float("inf")), (2, 5.0), (2, 5.0)]) == [1, 2]   # ties both kept; inf never


def test_leaderboard_ranks_by_all_in_bpw_beside_blocks_bpw():
    """A budget that quantizes the embedding (mix=...-all-in) has more block bits but fewer bits in all than int3."""
    rows = [fake("rtn", "int3-g128", 3.25, 5.9, 60.0), fake("rtn", "mix=4bpw-all-in", 4.4, 4.0, 40.0)]
    lb = render_leaderboard(rows)
    assert "| method | config | bpw (blocks) | bpw (all-in) |" in lb
    lines = [line for line in lb.splitlines() if line.startswith("| rtn |")]
    assert lines == ["| rtn | int3-g128 | 3.250 | 5.900 | 60.00 | - |  |",
                     "| rtn | mix=4bpw-all-in | 4.400 | 4.000 | 40.00 | - | yes |"]


def test_report_plot_and_leaderboard_are_reproducible(tmp_path):
    res = tmp_path / "docs" / "results"
    for r in SYNTH:
        write_result(r, res)
    out = write_report(res)
    png = tmp_path / "docs" / "plots" / "pareto_toy-1m.png"
    assert out["plot:toy-1m"] == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lb = (tmp_path / "docs" / "leaderboard.md").read_text()
    assert "![toy-1m: perplexity vs bpw](plots/pareto_toy-1m.png)" in lb
    row = next(line for line in lb.splitlines() if "int4-g32" in line)
    assert row.endswith("|  |")   # dominated: not on the front
    assert "| gptq | int3-g128 | 3.250 | 5.900 | 35.00 | 0.520 (1) | yes |" in lb
    assert "| chance | - | 0.500 |" in lb
    assert "zero-shot acc (tasks)" in (tmp_path / "docs" / "results.md").read_text()
    for index in ("results.md", "leaderboard.md", "comparisons.md"):   # each names the folder it was built from
        assert "Generated from `docs/results/*.json`" in (tmp_path / "docs" / index).read_text()
    first = {p: p.read_bytes() for p in (png, tmp_path / "docs" / "leaderboard.md", tmp_path / "docs" / "results.md")}
    write_report(res)
    assert all(p.read_bytes() == b for p, b in first.items())
    assert render_leaderboard([]) .startswith("# Leaderboard")


def test_comparisons_pivot_methods_by_format():
    from lowbit.report.pages import render_comparisons

    def run(method, fmt, ppl, tag=None):
        from lowbit.config import FormatConfig

        r = fake(method, tag or FormatConfig(**fmt).tag(), 4.0, 6.0, ppl)
        r["config"] = {"fmt": fmt}
        return r

    int3 = {"format": "int", "bits": 3, "group_size": 128, "sym": False}
    fp3 = {"format": "fp", "bits": 3, "group_size": 64, "sym": True}
    md = render_comparisons([run("rtn", int3, 120.0), run("gptq", int3, 70.0), run("awq", int3, 60.0),
                             run("rtn", fp3, 130.0), run("gptq", int3, 10.0, tag="int3-g128-act_order=True"),
                             fake("fp32", "", 32, 32, 20.0)])
    lines = md.splitlines()
    assert "| format | bits | group | scales | bpw (blocks) | rtn | gptq | awq | best |" in lines
    assert "| INT | 3 | 128 | asym | 4.000 | 120.00 | 70.00 | 60.00 | awq |" in lines   # non-default gptq run left out
    assert "| FP | 3 | 64 | sym | 4.000 | 130.00 | - | - | - |" in lines
    assert lines.index("| INT | 3 | 128 | asym | 4.000 | 120.00 | 70.00 | 60.00 | awq |") < lines.index(
        "| FP | 3 | 64 | sym | 4.000 | 130.00 | - | - | - |")


def test_afpq_table_formats_side_by_side():
    from lowbit.config import FormatConfig
    from lowbit.report.pages import render_afpq

    def run(method, fmt, sym, bits, group, ppl, bpw):
        f = {"format": fmt, "bits": bits, "group_size": group, "sym": sym}
        r = fake(method, FormatConfig(**f).tag(), bpw, bpw + 2, ppl)
        r["config"] = {"fmt": f}
        return r

    res = [run("rtn", "int", False, 3, 128, 100.0, 3.16), run("rtn", "fp", True, 3, 128, 200.0, 3.13),
           run("rtn", "fp", False, 3, 128, 120.0, 3.27), run("rtn", "nf", True, 3, 128, 110.0, 3.13),
           run("rtn", "nf", False, 3, 128, 80.0, 3.27),
           run("rtn", "fp", True, 3, 64, 110.0, 3.25), run("rtn", "nf", True, 3, 64, 70.0, 3.25),
           run("gptq", "nf", False, 4, 64, 27.0, 4.5), fake("fp32", "", 32, 32, 20.0)]
    lines = render_afpq(res)
    assert "### toy-1m (ppl wiki; fp32 20.00; 8 of 90 cells run)" in lines
    assert ("| rtn | 3 | 128 | 100.00 (3.160) | 200.00 (3.130) | 120.00 (3.270) | 110.00 (3.130) | "
            "**80.00 (3.270)** |") in lines
    assert "| rtn | 3 | 64 | - | 110.00 (3.250) | - | **70.00 (3.250)** | - |" in lines
    assert "| gptq | 4 | 64 | - | - | - | - | 27.00 (4.500) |" in lines   # a lone cell is not marked best
    summary = lines[-2]
    # two scales beat one at g128 for FP (120 < 200) and NF (80 < 110); at equal bpw (two-scale g128 vs
    # one-scale g64) FP loses (120 > 110) and NF loses (80 > 70); the one complete row's best is NF-asym
    assert "FP 1 of 1, NF 1 of 1 (solver, bits, group) points" in summary
    assert "At equal bpw (two scales at group g against one scale at g/2): FP 0 of 1, NF 0 of 1." in summary
    assert "two-scale format in 1 of 1 rows" in summary
    assert render_afpq([run("rtn", "int", False, 3, 128, 100.0, 3.16)]) == []   # no FP/NF run: no section
    bare = render_afpq(res, {"toy-1m": "plots/afpq_toy-1m.png"}, header=False)
    assert bare[0].startswith("### toy-1m") and bare[-2] == "![toy-1m: AFPQ grid, perplexity vs bpw](plots/afpq_toy-1m.png)"


def test_report_writes_afpq_plot_and_the_marked_part_of_formats_md(tmp_path):
    from lowbit.config import FormatConfig

    res = tmp_path / "docs" / "results"
    for method, fmt, sym, ppl in (("rtn", "int", False, 100.0), ("rtn", "fp", True, 200.0), ("gptq", "nf", False, 60.0)):
        f = {"format": fmt, "bits": 3, "group_size": 128, "sym": sym}
        r = fake(method, FormatConfig(**f).tag(), 3.2, 5.2, ppl)
        r["config"] = {"fmt": f}
        write_result(r, res)
    formats = tmp_path / "docs" / "formats.md"
    formats.write_text("# Formats\n\nprose before\n\n<!-- afpq:begin -->\nold table\n<!-- afpq:end -->\n\nprose after\n")
    out = write_report(res)
    png = tmp_path / "docs" / "plots" / "afpq_toy-1m.png"
    assert out["afpq:toy-1m"] == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = formats.read_text()
    assert "old table" not in text and text.startswith("# Formats\n\nprose before\n\n<!-- afpq:begin -->\n### toy-1m")
    assert "| gptq | 3 | 128 | - | - | - | - | 60.00 (3.200) |" in text and text.endswith("<!-- afpq:end -->\n\nprose after\n")
    assert "![toy-1m: AFPQ grid, perplexity vs bpw](plots/afpq_toy-1m.png)" in (tmp_path / "docs" / "comparisons.md").read_text()
    formats.write_text("no markers\n")
    assert "formats" not in write_report(res) and formats.read_text() == "no markers\n"   # never appended


def test_cli_report(tmp_path, capsys):
    from lowbit.cli import main

    res = tmp_path / "docs" / "results"
    write_result(SYNTH[0], res)
    (tmp_path / "docs" / "plots").mkdir(parents=True)
    (tmp_path / "docs" / "plots" / "pareto_gone.png").write_bytes(b"old")
    assert main(["report", "--results-dir", str(res)]) == 0
    assert "leaderboard.md" in capsys.readouterr().out
    assert not (tmp_path / "docs" / "plots" / "pareto_gone.png").exists()   # stale plots removed
    assert json.loads((res / "toy-1m__fp32.json").read_text())["model"] == "toy-1m"


def test_cli_report_errors_write_nothing(tmp_path, capsys):
    from lowbit.cli import main

    res = tmp_path / "docs" / "results"
    assert main(["report", "--results-dir", str(res)]) == 2
    assert f"results folder {res} does not exist" in capsys.readouterr().err
    res.mkdir(parents=True)
    assert main(["report", "--results-dir", str(res)]) == 2
    assert "holds no results JSON" in capsys.readouterr().err
    write_result(SYNTH[0], res)
    (res / "broken.json").write_text('{"model": ')
    assert main(["report", "--results-dir", str(res)]) == 2
    assert f"results file {res / 'broken.json'} cannot be read" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["results"]   # no empty or partial reports


def test_report_plots_distillation_loss_curves(tmp_path):
    res = tmp_path / "docs" / "results"
    (res / "loss").mkdir(parents=True)
    for name in ("toy-1m__bitdistiller__int2-cakld", "toy-1m__bitdistiller__int2-ce"):
        (res / "loss" / f"{name}.csv").write_text("step,loss,lr\n1,5.0,1e-5\n2,4.0,1e-5\n3,3.5,1e-5\n")
    write_result(fake("fp32", "", 32, 32, 20.0), res)
    out = write_report(res)
    png = tmp_path / "docs" / "plots" / "loss_toy-1m.png"
    assert out["loss:toy-1m"] == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_curves_one_panel_per_format_and_group():
    from lowbit.report.plots import loss_panels
    names = ["m__bitdistiller__int2-g128-cakld-30steps", "m__bitdistiller__int2-g128-gptq-cakld-30steps",
             "m__bitdistiller__nf3-g128-ce-30steps", "m__bitdistiller__odd"]
    panels = loss_panels([Path(f"/x/{n}.csv") for n in names])
    assert list(panels) == ["", "int2-g128", "nf3-g128"]
    assert [lab for lab, _ in panels["int2-g128"]] == ["cakld-30steps", "gptq-cakld-30steps"]
    assert [lab for lab, _ in panels["nf3-g128"]] == ["ce-30steps"]
    assert panels[""][0][0] == "m__bitdistiller__odd"


def test_distillation_table_compares_students_with_their_init():
    from lowbit.report.pages import render_distillation

    fmt = {"format": "int", "bits": 2, "group_size": 128, "sym": False}
    small = {"nsamples": 16, "seqlen": 256, "seed": 0, "source": "wiki-train"}

    def run(method, tag, ppl, calib, mc=None):
        r = fake(method, tag, 2.15, 5.0, ppl)
        r["config"] = {"fmt": fmt, "calib": calib, "method_config": mc or {}}
        return r

    md = render_distillation([
        fake("fp32", "", 32, 32, 20.0),
        run("clip", "int2-g128", 2000.0, small),
        run("gptq", "int2-g128", 5000.0, {**small, "nsamples": 128, "seqlen": 512}),
        run("bitdistiller", "int2-g128-x", 200.0, small, {"init": "clip", "loss": "cakld", "steps": 30, "seqlen": 128}),
        run("bitdistiller", "int2-g128-y", 300.0, small, {"init": "gptq", "loss": "cakld", "steps": 30, "seqlen": 128}),
        {**run("bitdistiller", "int2-g128-z", 100.0, small, {"init": "clip", "loss": "ce", "steps": 150, "seqlen": 128}),
         "distill": {"batch_size": 4, "grad_accum": 2, "teacher_samples": 256}},
    ])
    lines = [l for l in md if l.startswith("| ")]
    # log-gap closed: 1 - log(200/20) / log(2000/20) = 50%
    assert "| distilled | clip | cakld | 30 steps, seqlen 128 | 16 x 256 | 2.150 | 200.00 | 50% | - |" in lines
    # the gptq init run used other calibration than the student: no gap claimed
    assert "| distilled | gptq | cakld | 30 steps, seqlen 128 | 16 x 256 | 2.150 | 300.00 | - | - |" in lines
    # the run's recorded training budget: steps x (batch x accumulation) x window, teacher sequences
    assert "| distilled | clip | ce | 150 x 8 x 128, 256 teacher seqs | 16 x 256 | 2.150 | 100.00 | 65% | - |" in lines
    assert lines.index("| PTQ clip | - | - | - | 16 x 256 | 2.150 | 2000.00 | - | - |") < lines.index(
        "| PTQ gptq | - | - | - | 128 x 512 | 2.150 | 5000.00 | - | - |")
    assert render_distillation([fake("fp32", "", 32, 32, 20.0)]) == []


def test_vector_quantization_table_itemises_bpw():
    from lowbit.report.pages import render_vector_quantization

    def run(method, tag, blocks, ppl, items=None):
        r = fake(method, tag, blocks, 5.0, ppl)
        r["quant_time_s"] = 12.4
        if items is not None:
            r["bpw_detail"] = {"blocks_weights": 1000, "blocks_bits": sum(items.values()), "blocks_items": items}
        return r

    vq = {"idx": 1500, "res_idx": 500, "codebook": 90, "res_codebook": 10, "out_idx": 40, "out_codebook": 10,
          "outlier_cols": 1, "col_scale": 20, "col_bias": 20}
    md = render_vector_quantization([
        fake("fp32", "", 32, 32, 20.0),
        run("vptq", "vptq_preset=2.0", 2.191, 100.0, vq),
        run("gptq", "int2-g64", 2.281, 7000.0, {"codes": 2000, "scale": 250, "zero": 31}),
        run("gptq", "int4-g128", 4.152, 30.0, {"codes": 4000, "scale": 125, "zero": 27}),   # not beside VPTQ
        run("awq", "int3-g128", 3.161, 60.0),                                               # recorded before items
    ])
    lines = [l for l in md if l.startswith("| ")]
    assert lines[0] == ("| method | config | codes | codebooks | scales | outliers | norms | bpw (blocks) | ppl | "
                        "zero-shot acc | quant time (s) |")
    # kinds: codes = idx + res_idx, codebooks = main + residual, outliers = indices + codebook + column list
    assert lines[1] == "| vptq | vptq_preset=2.0 | 2.000 | 0.100 | 0.000 | 0.051 | 0.040 | 2.191 | 100.00 | - | 12 |"
    assert lines[2] == "| gptq | int2-g64 | 2.000 | 0.000 | 0.281 | 0.000 | 0.000 | 2.281 | 7000.00 | - | 12 |"
    assert lines[3] == "| awq | int3-g128 | - | - | - | - | - | 3.161 | 60.00 | - | 12 |"
    assert len(lines) == 4
    assert render_vector_quantization([run("gptq", "int2-g64", 2.281, 7000.0)]) == []


def test_reports_read_only_the_current_protocol_version(tmp_path, caplog):
    """v1 results (other texts and tasks) stay on disk but never share a table with v2 ones."""
    from lowbit.eval.record import load_results

    res = tmp_path / "results"
    old = fake("rtn", "int4-g128", 4.25, 6.7, 24.0)
    old.pop("protocol_version")            # v1 files carry no version field
    write_result(old, res)
    write_result(fake("fp32", "", 32, 32, 20.0), res)
    assert [r["method"] for r in load_results(res)] == ["fp32"]
    assert "skipped 1 results of an older protocol version" in caplog.text
    assert sorted(r["method"] for r in load_results(res, any_version=True)) == ["fp32", "rtn"]


def test_cache_survives_a_method_option_added_at_its_default():
    from lowbit.bench.grid import same_config

    cur = {"method": "awq", "fmt": {"bits": 4}, "calib": {"nsamples": 128},
           "method_config": {"n_grid": 20, "awq_scale_search": False}}
    old = {"method": "awq", "fmt": {"bits": 4}, "calib": {"nsamples": 128}, "method_config": {"n_grid": 20}}
    assert same_config(old, cur)
    # the new option away from its default, a changed option, a dropped option, a changed format: not cached
    assert not same_config(old, {**cur, "method_config": {"n_grid": 20, "awq_scale_search": True}})
    assert not same_config(old, {**cur, "method_config": {"n_grid": 10, "awq_scale_search": False}})
    assert not same_config({**old, "method_config": {"n_grid": 20, "gone": 1}}, cur)
    assert not same_config(old, {**cur, "fmt": {"bits": 3}})
    assert not same_config(None, cur)
