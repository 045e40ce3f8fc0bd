"""The layer-wise engine, GPTQ and AWQ on tiny random models."""
import pytest
import torch
from conftest import ARCHS, tiny_model

import lowbit
from lowbit.calib import CalibrationError
from lowbit.calib.engine import capture_inputs, collect_stats, run_block
from lowbit.config import FormatConfig
from lowbit.methods import get_method
from lowbit.models.arch import arch_for
from lowbit.nn import QuantizedLinear
from lowbit.quantize import QuantRecipe


def _calib(n=8, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (n, seqlen), generator=g)


def _eval_ids():
    return _calib(4, 32, seed=99)


def _logit_err(m, ref):
    with torch.no_grad():
        out = m(input_ids=_eval_ids()).logits
    return ((out - ref) ** 2).mean().item()


# AWQ, the slowest case, skips qwen2: it is the llama row's AWQ path unchanged (q/k/v biases come after the
# input-side scale and the v_proj -> o_proj fold is off under grouped-query attention in both)
@pytest.mark.parametrize("arch, method", [(a, m) for m in ("gptq", "awq") for a in ARCHS if (a, m) != ("qwen2", "awq")])
def test_engine_runs_and_logits_stay_close(arch, method):
    m = tiny_model(arch)
    with torch.no_grad():
        ref = m(input_ids=_eval_ids()).logits
    fmt = FormatConfig(bits=4, group_size=32)
    # 2048 calibration tokens: enough for a stable 64x64 Hessian
    lowbit.quantize(m, QuantRecipe(method=method, fmt=fmt), calib_ids=_calib(32, 64), progress=False)
    spec = arch_for(m)
    for block in m.get_submodule(spec.blocks):
        assert all(isinstance(block.get_submodule(n), QuantizedLinear) for n in spec.linears)
    # logits stay close: SQNR above 10 dB at 4 bits, and no worse than 1.5x RTN's error.
    # (Beating RTN is tested where it is guaranteed: per layer for GPTQ, per block for AWQ;
    # on a 2-layer random model with 2k calibration tokens the model-level ordering is noise.)
    err = _logit_err(m, ref)
    assert err < 0.1 * ref.pow(2).mean().item()
    r = tiny_model(arch)
    lowbit.quantize(r, QuantRecipe(method="rtn", fmt=fmt), progress=False)
    assert err < 1.5 * _logit_err(r, ref)


def test_hessian_shared_by_qkv_and_matches_definition():
    m = tiny_model("llama")
    arch = arch_for(m)
    inputs, kwargs = capture_inputs(m, arch, _calib(4), batch_size=2, offload=torch.device("cpu"))
    block = m.model.layers[0]
    stats = collect_stats(block, arch.groups, inputs, kwargs[0], frozenset({"hessian", "act_absmean"}),
                          torch.device("cpu"), torch.device("cpu"))
    qkv = arch.groups[0]
    # recompute by hand: the q/k/v input is input_layernorm(block input)
    x = torch.cat([block.input_layernorm(t) for t in inputs]).reshape(-1, 64).detach()
    H = 2 * x.T @ x / x.shape[0]
    assert torch.allclose(stats[qkv].hessian, H, rtol=1e-4, atol=1e-5)
    assert torch.allclose(stats[qkv].absmean, x.abs().mean(0), rtol=1e-5, atol=1e-6)


def test_awq_never_worse_than_base_on_a_block():
    m = tiny_model("llama", seed=3)
    arch = arch_for(m)
    inputs, kwargs = capture_inputs(m, arch, _calib(8), batch_size=4, offload=torch.device("cpu"))
    block_f = m.model.layers[0]
    ref = torch.cat(run_block(block_f, inputs, kwargs[0], torch.device("cpu"), torch.device("cpu")))
    fmt = FormatConfig(bits=3, group_size=32)
    errs = {}
    for method in ("rtn", "awq"):
        mm = tiny_model("llama", seed=3)
        calib = _calib(8) if method == "awq" else None
        lowbit.quantize(mm, QuantRecipe(method=method, fmt=fmt), calib_ids=calib, progress=False)
        out = torch.cat(run_block(mm.model.layers[0], inputs, kwargs[0], torch.device("cpu"), torch.device("cpu")))
        errs[method] = ((out - ref) ** 2).mean().item()
    assert errs["awq"] <= errs["rtn"]


def test_nan_in_calibration_gives_clear_error():
    # finite weights whose activations overflow (a NaN weight is refused before calibration starts)
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.layers[0].self_attn.o_proj.weight.fill_(1e38)
    with pytest.raises(CalibrationError, match="NaN/Inf in calibration activations"):
        lowbit.quantize(m, QuantRecipe(method="gptq"), calib_ids=_calib(), progress=False)


def test_calibrated_method_without_data():
    from lowbit.errors import ConfigError

    with pytest.raises(ConfigError, match="needs calibration data"):
        lowbit.quantize(tiny_model("llama"), QuantRecipe(method="gptq"), progress=False)


def test_resume_after_crash_equals_uninterrupted(tmp_path, monkeypatch):
    fmt = FormatConfig(bits=3, group_size=32)
    recipe = QuantRecipe(method="gptq", fmt=fmt)
    full = tiny_model("llama")
    lowbit.quantize(full, recipe, calib_ids=_calib(), progress=False)
    with torch.no_grad():
        want = full(input_ids=_eval_ids()).logits

    # crash while quantizing the second block
    import lowbit.methods.gptq as g

    real = g.gptq_quantize
    calls = {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] > len(get_method("gptq").name) and calls["n"] > 7:  # after block 0's 7 linears
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(g, "gptq_quantize", crashing)
    m1 = tiny_model("llama")
    with pytest.raises(KeyboardInterrupt):
        lowbit.quantize(m1, recipe, calib_ids=_calib(), progress=False, resume_dir=tmp_path / "r")
    assert (tmp_path / "r" / "block0000" / "block.json").is_file()
    assert not (tmp_path / "r" / "block0001").exists()
    monkeypatch.setattr(g, "gptq_quantize", real)

    m2 = tiny_model("llama")
    lowbit.quantize(m2, recipe, calib_ids=_calib(), progress=False, resume_dir=tmp_path / "r")
    with torch.no_grad():
        got = m2(input_ids=_eval_ids()).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("method, fmt, mcfg", [
    ("smoothquant", FormatConfig(bits=8, group_size=-1, sym=True), {}),
    ("flattenquant", FormatConfig(bits=8, group_size=-1, sym=True), {"fq_int4_budget": 0.5}),
    ("vptq", FormatConfig(bits=4, group_size=32), {"vector_len": 4, "codebook_size": 16, "kmeans_iters": 4}),
])
def test_resume_rebuilds_every_module_type(tmp_path, monkeypatch, method, fmt, mcfg):
    """Activation-quantized and vector-quantized blocks resume too, bitwise equal to an uninterrupted run."""
    import importlib

    q = importlib.import_module("lowbit.calib.engine")
    recipe = QuantRecipe(method=method, fmt=fmt, method_config=mcfg)
    full = tiny_model("llama")
    lowbit.quantize(full, recipe, calib_ids=_calib(), progress=False)
    with torch.no_grad():
        want = full(input_ids=_eval_ids()).logits

    real, calls = q.to_module, {"n": 0}

    def crashing(*a, **k):  # crash on block 1's first linear (block 0 has 7)
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(q, "to_module", crashing)
    with pytest.raises(KeyboardInterrupt):
        lowbit.quantize(tiny_model("llama"), recipe, calib_ids=_calib(), progress=False, resume_dir=tmp_path / "r")
    monkeypatch.setattr(q, "to_module", real)
    assert (tmp_path / "r" / "block0000").is_dir() and not (tmp_path / "r" / "block0001").exists()
    m2 = tiny_model("llama")
    lowbit.quantize(m2, recipe, calib_ids=_calib(), progress=False, resume_dir=tmp_path / "r")
    with torch.no_grad():
        assert torch.equal(m2(input_ids=_eval_ids()).logits, want)


def test_clear_resume_dir_deletes_only_finished_blocks(tmp_path, caplog):
    from lowbit.calib.engine import clear_resume_dir

    d = tmp_path / "out.resume"
    for name in ("block0000", "block0001", ".block0002.abc.tmp"):
        (d / name).mkdir(parents=True)
        (d / name / "block.json").write_text("{}")
    clear_resume_dir(d)
    assert not d.exists()
    (d / "block0000").mkdir(parents=True)
    (d / "notes.txt").write_text("not the engine's")
    clear_resume_dir(d)
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]
    assert "holds files that are not finished blocks" in caplog.text
    clear_resume_dir(tmp_path / "never-made")   # nothing to do


@pytest.mark.parametrize("arch", ARCHS)
def test_stats_pass_stopped_early_gives_the_same_statistics(arch):
    """Without outputs to keep, a batch stops once the last group has its input: every statistic is unchanged."""
    m = tiny_model(arch)
    spec = arch_for(m)
    cpu = torch.device("cpu")
    inputs, kwargs = capture_inputs(m, spec, _calib(4), batch_size=2, offload=cpu)
    block = m.get_submodule(spec.blocks)[0]
    needs = frozenset({"hessian", "act_absmean", "act_sqmean", "inputs"})
    full = collect_stats(block, spec.groups, inputs, kwargs[0], needs, cpu, cpu, outputs=[])
    early = collect_stats(block, spec.groups, inputs, kwargs[0], needs, cpu, cpu)
    for g in spec.groups:
        a, b = full[g], early[g]
        assert a.n == b.n > 0
        for name in ("hessian", "absmean", "absmax", "sqmean"):
            assert torch.equal(getattr(a, name), getattr(b, name))
        assert all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs))


def test_profile_records_every_stage_and_the_gemm_rate(tmp_path):
    from lowbit.calib.profile import Profile

    m = tiny_model("llama")
    prof = Profile()
    summary = lowbit.quantize(m, QuantRecipe(method="gptq", fmt=FormatConfig(bits=4, group_size=32)),
                              calib_ids=_calib(8, 32), progress=False, resume_dir=tmp_path / "r", profile=prof)
    stages = prof.totals()
    assert {"capture", "forward", "stats", "solver", "packing", "resume_save", "copies"} <= set(stages)
    assert stages["forward"]["gflop"] > 0 and stages["stats"]["gflop"] > 0 and stages["solver"]["gflop"] > 0
    blocks = {r["block"] for r in prof.to_dict()["blocks"]}
    assert blocks == {-1, 0, 1}
    assert prof.gemm["gflop_per_s_median"] > 0 and summary["profile"]["floor_s"] > 0
    js, md = prof.write(tmp_path / "p.json")
    assert js.exists() and "| forward |" in md.read_text()


def test_token_sample_and_first_tokens_are_the_rows_of_the_concatenation():
    from lowbit.calib.engine import GroupStats

    st = GroupStats(inputs=[torch.randn(n, 3) for n in (5, 7, 1, 9, 4)])
    x = torch.cat(st.inputs)
    for n in (1, 3, 4, 7, 26, 100):
        assert torch.equal(st.token_sample(n), x[:: max(1, x.shape[0] // n)][:n])
        assert torch.equal(st.first_tokens(n), x[:n])
