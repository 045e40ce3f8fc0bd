"""Block-wise reconstruction (--block-tune): exact start, never a worse block, same storage, clear refusals."""
import pytest
import torch
import torch.nn.functional as F
from conftest import reload_same_logits, tiny_model

from lowbit.calib.blocktune import TunableLinear, block_mse
from lowbit.calib.engine import capture_inputs, run_block
from lowbit.config import BlockTuneConfig, FormatConfig
from lowbit.errors import ConfigError
from lowbit.formats import quantize_rtn
from lowbit.methods.gptq import gptq_quantize
from lowbit.models.arch import arch_for, get_module
from lowbit.nn import QuantizedLinear, scalar_spec
from lowbit.quantize import QuantRecipe, quantize_model, recipe_from_options

FORMATS = [FormatConfig("int", 3, 32), FormatConfig("int", 4, 32, sym=True), FormatConfig("nf", 3, 32),
           FormatConfig("fp", 4, -1, sym=True), FormatConfig("fp", 4, 24)]   # 24: a short last group of 16


def _ids(n=8, t=48):
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(0))


def _layer(seed=0, rows=24, cols=64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.05
    X = torch.randn(512, cols, generator=g) * torch.linspace(0.2, 3, cols)
    return W, X, 2 * X.T @ X / X.shape[0]


@pytest.mark.parametrize("solver", ["rtn", "gptq"])
@pytest.mark.parametrize("fc", FORMATS, ids=lambda f: f.tag())
@pytest.mark.parametrize("mode", ["lwc", "lwc+scale", "ap"])
def test_tuning_starts_exactly_at_the_solver(solver, fc, mode):
    """Before any step the tunable layer stores and computes what the solver stored, bit for bit, also where
    GPTQ's codes are not the float weight's rounding."""
    W, X, H = _layer()
    fmt = fc.make()
    qw = quantize_rtn(W, fmt) if solver == "rtn" else gptq_quantize(W, H, fmt, block_size=16)
    bias = torch.randn(W.shape[0]) * 0.1
    q = QuantizedLinear.from_quantized(qw, scalar_spec(qw.fmt, *W.shape), bias)
    t = TunableLinear(W, qw, bias, mode)
    assert t.exact
    back = t.to_quantized()
    assert all(torch.equal(back.get_buffer(k), q.get_buffer(k)) for k in q.codec.buffer_shapes(q.spec))
    with torch.no_grad():
        assert torch.equal(t(X), q(X))
        assert torch.equal(t(X), F.linear(X, qw.dequantize(), bias))


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("mode", ["lwc", "lwc+scale", "ap"])
def test_block_output_error_never_rises(method, mode):
    """Every block's recorded output MSE after the stage is at most the solver's; block 0 (same inputs in both
    runs) is checked independently against the float block."""
    ids, fc = _ids(), FormatConfig("int", 3, 32)
    ref = tiny_model("llama")
    arch = arch_for(ref)
    inputs, kwargs = capture_inputs(ref, arch, ids, 8, torch.device("cpu"))
    float_out = run_block(get_module(ref, arch.blocks)[0], inputs, kwargs[0], "cpu", "cpu")
    errs = {}
    for tune in (BlockTuneConfig(), BlockTuneConfig(mode, block_tune_epochs=2)):
        m = tiny_model("llama")
        s = quantize_model(m, QuantRecipe(method=method, fmt=fc, block_tune=tune), ids, progress=False)
        errs[tune.block_tune] = block_mse(get_module(m, arch.blocks)[0], inputs, float_out, kwargs[0], "cpu")
        if tune.enabled:
            recs = s["block_tune"]
            assert [r["block"] for r in recs] == [0, 1]
            for r in recs:
                assert r["kept"] in ("tuned", "solver")
                assert r["kept"] == "solver" or r["mse_after"] < r["mse_before"]
            # approx: the pipeline rounds the float norms to the storage dtype after the engine (AWQ folds into them)
            assert errs[mode] == pytest.approx(min(recs[0]["mse_before"], recs[0]["mse_after"]), rel=1e-3)
    assert errs[mode] <= errs["none"]


def test_tuned_model_saves_and_loads_with_identical_logits(tmp_path):
    ids = _ids()
    m = tiny_model("qwen2")   # biases on q/k/v
    recipe = QuantRecipe(method="rtn", fmt=FormatConfig("int", 3, 32),
                         block_tune=BlockTuneConfig("lwc+scale", block_tune_epochs=3))
    s = quantize_model(m, recipe, ids, progress=False)
    assert any(r["kept"] == "tuned" for r in s["block_tune"])
    reload_same_logits(m, tmp_path / "ckpt")


@pytest.mark.parametrize("method, options, match", [
    ("rtn", {"block_tune_epochs": 3}, "add --block-tune"),
    ("rtn", {"block_tune": "lwc", "block_tune_weight_lr": 1e-4}, "not used by --block-tune lwc"),
    ("rtn", {"block_tune": "ap", "block_tune_lr": 1e-3}, "not used by --block-tune ap"),
    ("rtn", {"block_tune": "omni"}, "must be one of"),
    ("rtn", {"block_tune": "lwc", "format": "q4_k"}, "int, fp and nf"),
    ("rtn", {"block_tune": "lwc", "format": "mxfp4"}, "int, fp and nf"),
    ("vptq", {"block_tune": "lwc"}, "own storage"),
    ("rtn", {"nsamples": 16}, "uses none"),
])
def test_flag_misuse_is_a_clear_error(method, options, match):
    with pytest.raises(ConfigError, match=match):
        recipe_from_options(method, options)


def test_flags_reach_the_recipe_and_a_data_free_method_gets_calibration():
    r = recipe_from_options("rtn", {"block_tune": "lwc", "block_tune_epochs": 1, "nsamples": 16, "bits": 3})
    assert r.block_tune == BlockTuneConfig("lwc", block_tune_epochs=1)
    assert r.calib["nsamples"] == 16
    assert "block_tune=lwc" in r.tag() and "block_tune_epochs=1" in r.tag()
    assert QuantRecipe.from_dict(r.to_dict()) == r
    assert "block_tune" not in recipe_from_options("rtn", {}).to_dict()   # older results files keep their recipe


def test_a_batch_larger_than_the_engine_batch_is_refused_before_any_block():
    recipe = QuantRecipe(method="rtn", block_tune=BlockTuneConfig("lwc", block_tune_batch=16))
    with pytest.raises(ConfigError, match="engine's batch of 8"):
        quantize_model(tiny_model("llama"), recipe, _ids(), progress=False)


def test_a_method_with_its_own_modules_is_refused_at_the_first_block():
    m = tiny_model("llama")
    recipe = QuantRecipe(method="smoothquant", fmt=FormatConfig("int", 8, -1, sym=True),
                         block_tune=BlockTuneConfig("lwc"))
    with pytest.raises(ConfigError, match="scalar-format layers"):
        quantize_model(m, recipe, _ids(), progress=False)


def test_resume_restores_the_tuned_blocks_and_their_records(tmp_path):
    ids, fc = _ids(), FormatConfig("int", 3, 32)
    recipe = QuantRecipe(method="rtn", fmt=fc, block_tune=BlockTuneConfig("lwc+scale", block_tune_epochs=2))
    first = tiny_model("llama")
    want = quantize_model(first, recipe, ids, progress=False, resume_dir=tmp_path / "r")
    again = tiny_model("llama")   # every block restored from the folder: no tuning runs, same records and weights
    got = quantize_model(again, recipe, ids, progress=False, resume_dir=tmp_path / "r")
    assert got["block_tune"] == want["block_tune"]
    with torch.no_grad():
        assert torch.equal(again(ids[:1]).logits, first(ids[:1]).logits)
