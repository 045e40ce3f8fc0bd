"""Size budgets: per-tensor sensitivity scores, the knapsack allocator, per-layer formats in the pipeline."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import reload_same_logits, tiny_model


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))


def _ids(n: int = 4, t: int = 32) -> torch.Tensor:
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(0))


def test_linear_damage_is_the_mean_squared_output_error():
    from lowbit.calib.sensitivity import linear_damage
    from lowbit.config import parse_format_tag
    from lowbit.formats import quantize_rtn

    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(8, 64, generator=g), torch.randn(100, 64, generator=g)
    fmt = parse_format_tag("int3-g32").make()
    damage, energy = linear_damage(w, 2 * x.T @ x / 100, {"int3-g32": fmt})
    d = w - quantize_rtn(w, fmt).dequantize()
    assert damage["int3-g32"] == pytest.approx(float(((x @ d.T) ** 2).sum(1).mean()), rel=1e-4)
    assert energy == pytest.approx(float(((x @ w.T) ** 2).sum(1).mean()), rel=1e-4)


def test_sensitivity_pass_scores_every_tensor_and_more_bits_do_less_damage():
    from lowbit.calib.sensitivity import sensitivity_pass
    from lowbit.config import parse_format_tag
    from lowbit.models.arch import arch_for

    m = tiny_model("llama")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    arch = arch_for(m)
    fmts = {t: parse_format_tag(t).make() for t in ("int2-g32", "int4-g32", "int8-g32")}
    s = sensitivity_pass(m, arch, fmts, _ids(), embed_head=True, progress=False)
    assert len(s["damage"]) == 2 * len(arch.linears) + 2 and {arch.embed, arch.head} <= set(s["damage"])
    for name, d in s["damage"].items():
        assert d["int2-g32"] > d["int4-g32"] > d["int8-g32"] > 0, name
        assert s["energy"][name] > d["int2-g32"]
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())   # the model is left float


def test_knapsack_is_optimal_feasible_and_monotone():
    from lowbit.mixed import solve_mckp

    g = torch.Generator().manual_seed(3)
    costs = [sorted(int(c) for c in torch.randint(1, 40, (3,), generator=g)) for _ in range(5)]
    damages = [sorted((float(d) for d in torch.rand(3, generator=g)), reverse=True) for _ in range(5)]
    last = float("inf")
    for budget in range(sum(min(c) for c in costs), sum(max(c) for c in costs) + 2):
        picks, damage = solve_mckp(costs, damages, budget)
        assert sum(c[p] for c, p in zip(costs, picks)) <= budget
        brute = min(sum(d[p] for d, p in zip(damages, ps)) for ps in itertools.product(range(3), repeat=5)
                    if sum(c[p] for c, p in zip(costs, ps)) <= budget)
        assert damage == pytest.approx(brute) and damage <= last
        last = damage
    assert solve_mckp(costs, damages, sum(min(c) for c in costs) - 1) is None


def _quantized(recipe, arch="llama", ids=None):
    import lowbit

    m = tiny_model(arch)
    summary = lowbit.quantize(m, recipe, _ids() if ids is None else ids, progress=False)
    return m, summary


@pytest.mark.parametrize("arch,options,key", [
    ("llama", {"target_bpw": 3.3}, "blocks"),
    ("llama", {"target_bpw": 3.6, "all_in": True}, "all_in"),    # tied embedding and head
    ("qwen2", {"target_bpw": 4.1, "all_in": True}, "all_in"),    # untied
    ("qwen2", {"target_mb": 0.05}, "total_bits"),
])
def test_plan_meets_the_budget_in_the_saved_checkpoint(arch, options, key, tmp_path):
    from lowbit.io import read_meta
    from lowbit.nn.bpw import bpw_report
    from lowbit.quantize import recipe_from_options

    m, summary = _quantized(recipe_from_options("rtn", {**options, "mix_candidates": "int2-g32,int3-g64,int4-g32,int8-g64"}),
                            arch)
    plan = summary["mix_plan"]
    back = reload_same_logits(m, tmp_path / "ck")
    rep = bpw_report(back, n_params=read_meta(tmp_path / "ck")["n_params"])
    measured = rep["blocks_bits"] if key == "blocks" else rep["total_bits"]
    assert measured == plan["bits"] <= plan["budget_bits"]          # predicted bits are exact
    if key == "total_bits":
        assert rep["total_bits"] / 8e6 <= options["target_mb"]
    else:
        assert rep[key] <= options["target_bpw"]
    assert len(set(plan["tensors_per_format"])) > 1                  # a real mix at these budgets
    meta = read_meta(tmp_path / "ck")
    assert meta["summary"]["recipe"]["mix"]["candidates"] and meta["summary"]["mix_plan"]["achieved"] == plan["achieved"]


def test_larger_budget_never_predicts_more_damage():
    from lowbit.calib.sensitivity import sensitivity_scores
    from lowbit.config import MixConfig, StorageConfig
    from lowbit.mixed import plan_budget
    from lowbit.models.arch import arch_for

    m = tiny_model("qwen2")
    arch = arch_for(m)
    for all_in in (False, True):
        mix = MixConfig(target_bpw=3.0, all_in=all_in)
        scores = sensitivity_scores(m, arch, {t: f.make() for t, f in mix.formats().items()}, _ids(),
                                    embed_head=all_in, progress=False)
        last = float("inf")
        for target in [2.3 + 0.1 * i for i in range(60)]:
            try:
                plan = plan_budget(m, arch, MixConfig(target_bpw=target, all_in=all_in), scores, StorageConfig())
            except Exception:
                continue
            assert plan.bits <= plan.budget_bits and plan.damage <= last
            last = plan.damage


def test_one_format_everywhere_equals_the_plain_recipe_bit_for_bit():
    from lowbit.config import FormatConfig
    from lowbit.models.arch import arch_for
    from lowbit.quantize import QuantRecipe, recipe_from_options

    fmt = FormatConfig(bits=3, group_size=32)
    plain, _ = _quantized(QuantRecipe(fmt=fmt, embed=fmt))
    m0 = tiny_model("llama")
    arch = arch_for(m0)
    layers = {f"{arch.blocks}.{i}.{n}": fmt for i in range(2) for n in arch.linears}
    by_hand, _ = _quantized(QuantRecipe(fmt=FormatConfig(bits=8), layers={**layers, arch.embed: fmt}))
    planned, s = _quantized(recipe_from_options("rtn", {"target_bpw": 9.0, "mix_candidates": "int3-g32",
                                                        "embed": "int3-g32"}))
    want = plain.state_dict()
    for got in (by_hand.state_dict(), planned.state_dict()):
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert s["mix_plan"]["tensors_per_format"] == {"int3-g32": 14}


def test_scores_are_cached_per_candidate(monkeypatch):
    import lowbit.calib.sensitivity as sens
    from lowbit.config import parse_format_tag
    from lowbit.models.arch import arch_for

    m = tiny_model("llama")
    arch = arch_for(m)
    ran = []
    real = sens.sensitivity_pass
    monkeypatch.setattr(sens, "sensitivity_pass", lambda *a, **kw: ran.append(sorted(a[2])) or real(*a, **kw))
    fmts = {t: parse_format_tag(t).make() for t in ("int2-g32", "int4-g32")}
    first = sens.sensitivity_scores(m, arch, fmts, _ids(), progress=False)
    again = sens.sensitivity_scores(m, arch, fmts, _ids(), progress=False)
    assert ran == [["int2-g32", "int4-g32"]] and again["damage"] == first["damage"]
    sens.sensitivity_scores(m, arch, {**fmts, "int3-g32": parse_format_tag("int3-g32").make()}, _ids(), progress=False)
    assert ran[1:] == [["int3-g32"]]                                  # only the new candidate is scored
    sens.sensitivity_scores(m, arch, fmts, _ids(n=3), progress=False)   # other calibration windows: a new pass
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight.mul_(1.01)
    sens.sensitivity_scores(m, arch, fmts, _ids(), progress=False)      # other weights: a new pass
    assert len(ran) == 4


def test_infeasible_budget_names_the_smallest_feasible_target():
    import re

    from lowbit.errors import ConfigError
    from lowbit.quantize import recipe_from_options

    opts = {"mix_candidates": "int2-g32,int4-g32"}
    with pytest.raises(ConfigError, match=r"--target-bpw 1\.5 cannot be met.*takes (\d+\.\d+) bpw") as e:
        _quantized(recipe_from_options("rtn", {"target_bpw": 1.5, **opts}))
    least = float(re.search(r"takes (\d+\.\d+) bpw", str(e.value))[1])
    _, s = _quantized(recipe_from_options("rtn", {"target_bpw": least, **opts}))
    assert s["mix_plan"]["tensors_per_format"] == {"int2-g32": 14}
    with pytest.raises(ConfigError, match="--target-mb 0.001 cannot be met"):
        _quantized(recipe_from_options("rtn", {"target_mb": 0.001, **opts}))


def test_budget_options_and_recipe_round_trip():
    from lowbit.errors import ConfigError
    from lowbit.quantize import QuantRecipe, recipe_from_options

    r = recipe_from_options("rtn", {"target_bpw": 3.5, "nsamples": 8})
    assert r.tag() == "mix=3.5bpw" and r.calib["nsamples"] == 8 and r.mix.damage == "relative"
    assert recipe_from_options("rtn", {"target_bpw": 3.5, "mix_damage": "absolute"}).tag() == "mix=3.5bpw-abs"
    assert QuantRecipe.from_dict(r.to_dict()) == r
    assert "mix" not in recipe_from_options("rtn", {}).to_dict()         # plain recipes keep their dict
    assert recipe_from_options("gptq", {"target_mb": 40, "mix_candidates": "int3-g128,int4-g128"}).tag() == \
        "mix=40mb-int3-g128+int4-g128"
    for bad, msg in ((("rtn", {"nsamples": 8}), "uses none"), (("rtn", {"all_in": True}), "either --target-bpw"),
                     (("rtn", {"target_bpw": 3, "target_mb": 4}), "not both"),
                     (("rtn", {"target_bpw": 3, "mix_candidates": "int9x"}), "cannot read format"),
                     (("vptq", {"target_bpw": 3}), "has none"),
                     (("rtn", {"target_bpw": 3, "mix_damage": "loss"}), "relative or absolute"), (("rtn", {"target_bpw": -1}), "positive")):
        with pytest.raises(ConfigError, match=msg):
            recipe_from_options(*bad)


def test_calibrated_method_takes_the_plan_and_resumes(tmp_path):
    from lowbit.quantize import recipe_from_options

    r = recipe_from_options("gptq", {"target_bpw": 3.3, "mix_candidates": "int2-g32,int4-g32"})
    m, s = _quantized(r)
    specs = {n: mod.spec["format"]["bits"] for n, mod in m.named_modules() if hasattr(mod, "spec")}
    assert sorted(set(specs.values())) == [2, 4]
    assert {f"{n}" for n in s["recipe"]["layers"]} == set(specs)


def test_cli_quantize_with_a_budget_prints_the_plan(tiny_dir, text_file, tmp_path, caplog):
    import logging

    from lowbit.cli.main import main

    out = tmp_path / "ck"
    with caplog.at_level(logging.INFO):
        assert main(["-q", "quantize", str(tiny_dir), "--target-bpw", "3.3", "--calib", str(text_file),
                     "--nsamples", "2", "--calib-seqlen", "32", "--mix-candidates", "int2-g32,int4-g32",
                     "--device", "cpu", "--out", str(out)]) == 0
    assert "mix=3.3bpw-int2-g32+int4-g32: 3." in caplog.text and "mlp.down_proj" in caplog.text
    assert main(["info", str(out)]) == 0
