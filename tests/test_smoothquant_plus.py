"""SmoothQuant+: the whole-model smoothing is exact in float, the searched strength is recorded and used."""
import pytest
import torch
from conftest import reload_same_logits, tiny_model

import lowbit
from lowbit.calib.engine import float_block_stats
from lowbit.errors import ConfigError
from lowbit.methods.smoothquant_plus import smooth_model
from lowbit.models.arch import arch_for
from lowbit.nn import QuantizedLinear
from lowbit.quantize import QuantRecipe, recipe_from_options


def _calib(n=8, seqlen=32, seed=0):
    return torch.randint(3, 320, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _outlier_model(arch="llama"):
    """A tiny model with non-trivial norms (Gemma's ``1 + w`` offset matters) and a few outlier channels."""
    m = tiny_model(arch)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.normal_(0.0, 0.3)
                if "post" not in name and p.numel() == m.config.hidden_size:
                    p[[3, 17]] += 4.0
    return m


def test_smoothing_the_whole_model_is_exact_in_float(arch):
    m = _outlier_model(arch)
    spec = arch_for(m)
    ids = _calib(2, 24, seed=3)
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    stats = float_block_stats(m, spec, _calib(4), frozenset({"act_absmax"}))
    before = {n: p.clone() for n, p in m.named_parameters()}
    smooth_model(m, spec, [{g: s.absmax for g, s in st.items()} for st in stats], alpha=0.7)
    assert any(not torch.equal(before[n], p) for n, p in m.named_parameters())
    with torch.no_grad():
        out = m(input_ids=ids).logits
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_searched_alpha_is_recorded_used_and_reloaded(tmp_path):
    m = _outlier_model()
    calib = _calib()
    cfg = {"alpha_grid": 4, "alpha_windows": 2}
    summary = lowbit.quantize(m, QuantRecipe(method="smoothquant+", method_config=cfg), calib_ids=calib,
                              progress=False)
    res = summary["method_result"]
    assert set(res["losses"]) == {"0", "0.25", "0.5", "0.75", "1"}
    assert res["sqp_alpha"] == float(min(res["losses"], key=res["losses"].get))
    assert res["search_windows"] == 2 and res["unsmoothed_loss"] > 0
    assert all(isinstance(m.model.layers[0].get_submodule(n), QuantizedLinear) for n in arch_for(m).linears)
    # RTN: the quantized model is the one the search measured (up to the fp16 rounding of norms and embedding)
    ref = _outlier_model()
    with torch.no_grad():
        mse = sum(float((m(input_ids=calib[i : i + 1]).logits - ref(input_ids=calib[i : i + 1]).logits).pow(2).mean())
                  for i in range(2)) / 2
    assert mse == pytest.approx(res["losses"][f"{res['sqp_alpha']:g}"], rel=0.05)
    back = reload_same_logits(m, tmp_path / "ck")
    assert back.lowbit_summary["method_result"]["sqp_alpha"] == res["sqp_alpha"]
    assert back.lowbit_summary["recipe"]["method"] == "smoothquant+"


def test_fixed_alpha_with_gptq():
    m = _outlier_model("qwen2")
    summary = lowbit.quantize(m, QuantRecipe(method="smoothquant+", method_config={"sqp_alpha": 0.5, "sqp_gptq": True}),
                              calib_ids=_calib(), progress=False)
    assert summary["method_result"] == {"sqp_alpha": 0.5}
    assert isinstance(m.model.layers[1].mlp.down_proj, QuantizedLinear)


def test_options():
    r = recipe_from_options("smoothquant+", {"alpha_grid": 10, "group_size": 64, "nsamples": 16})
    assert r.method_config["alpha_grid"] == 10 and r.calib["nsamples"] == 16
    with pytest.raises(ConfigError, match="sqp-alpha"):
        recipe_from_options("smoothquant+", {"sqp_alpha": 1.5})
    with pytest.raises(ConfigError, match="not of --method rtn"):
        recipe_from_options("rtn", {"alpha_grid": 10})
