"""The importance-weighted int scale search (formats/scale_search.py), rtn-imatrix and AWQ's --awq-scale-search."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.config import FormatConfig
from lowbit.errors import ConfigError
from lowbit.formats import IntFormat, quantize_rtn
from lowbit.formats.scale_search import search_int_scales
from lowbit.models.arch import arch_for, get_module
from lowbit.quantize import QuantRecipe, recipe_from_options

from conftest import reload_same_logits, tiny_model


def _group_err(q, w, imp, gs):
    e = (q.dequantize() - w) ** 2 * imp                        # (out, in)
    cols = w.shape[1]
    pad = (-cols) % gs
    e = torch.cat([e, e.new_zeros(e.shape[0], pad)], 1)
    return e.view(e.shape[0], -1, gs).sum(-1)                   # (out, G)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gs, cols", [(32, 96), (32, 80), (-1, 48)])
def test_every_group_error_at_most_rtn(bits, sym, gs, cols):
    g = torch.Generator().manual_seed(bits * 7 + cols)
    w = torch.randn(24, cols, generator=g) * torch.rand(24, 1, generator=g)
    imp = torch.rand(cols, generator=g) ** 4 * 10                 # skewed importances
    fmt = IntFormat(bits, gs, sym)
    q = search_int_scales(w, fmt, imp)
    r = quantize_rtn(w, fmt)
    g_eff = cols if gs == -1 else gs
    ours, base = _group_err(q, w, imp, g_eff), _group_err(r, w, imp, g_eff)
    assert (ours <= base * (1 + 1e-5) + 1e-12).all()
    assert ours.sum() < base.sum()                                # and it finds something on random weights
    assert set(q.params) == set(fmt.param_specs()) and q.codes.min() >= 0 and q.codes.max() <= fmt.maxq
    assert q.params["scale"].dtype == torch.float32
    assert torch.equal(q.params["scale"], q.params["scale"].half().float())   # stored as fp16 exactly


def test_unweighted_search_lowers_the_plain_error():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    for sym in (True, False):
        fmt = IntFormat(4, 32, sym)
        ours = (search_int_scales(w, fmt).dequantize() - w).pow(2).sum()
        assert ours < (quantize_rtn(w, fmt).dequantize() - w).pow(2).sum()


def test_sym_peak_and_level_invariants():
    """Symmetric: the scale's sign is opposite to the group's extreme, whose level is then negative and at most one
    step from -2**(b-1); zero groups stay representable (RTN's tiny scale), the zero point is never stored."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=g)
    w[0, :32] = 0                                                 # an all-zero group
    w[1, :32] = w[1, :32].abs()                                   # a positive-peak group
    imp = torch.rand(64, generator=g)
    fmt = IntFormat(4, 32, True)
    q = search_int_scales(w, fmt, imp)
    assert set(q.params) == {"scale"}
    s = q.params["scale"]                                         # (16, 2)
    wg = w.view(16, 2, 32)
    peak = wg.gather(-1, wg.abs().argmax(-1, keepdim=True)).squeeze(-1)
    nz = peak != 0
    assert (torch.sign(s[nz]) == -torch.sign(peak[nz])).all()
    level = q.codes.view(16, 2, 32).gather(-1, wg.abs().argmax(-1, keepdim=True)).squeeze(-1) - 8
    assert ((level[nz] == -8) | (level[nz] == -7)).all()
    assert s[0, 0] == quantize_rtn(w, fmt).params["scale"][0, 0] and (q.dequantize()[0, :32] == 0).all()


def test_uniform_importance_equals_none_and_bad_inputs_refused():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    fmt = IntFormat(4, 32, False)
    a, b = search_int_scales(w, fmt, torch.full((64,), 3.0)), search_int_scales(w, fmt)
    assert torch.equal(a.codes, b.codes)
    with pytest.raises(ConfigError, match="one value per input column"):
        search_int_scales(w, fmt, torch.ones(63))
    with pytest.raises(ConfigError, match="int format"):
        from lowbit.formats import NFFormat
        search_int_scales(w, NFFormat(4, 32))


def _layer_imp(float_model, ids, name):
    lin = get_module(get_module(float_model, arch_for(float_model).blocks)[0], name)
    seen = []
    h = lin.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        float_model(ids)
    h.remove()
    return lin.weight.detach(), torch.cat(seen).pow(2).mean(0)


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_imatrix_through_the_engine(sym, tmp_path):
    """Block 0's layers (inputs from the float model): weighted error at most RTN's; save -> load same logits."""
    ids = torch.randint(3, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    fmt = FormatConfig(bits=3, group_size=32, sym=sym)
    models = {m: tiny_model("llama") for m in ("rtn", "rtn-imatrix")}
    for method, m in models.items():
        lowbit.quantize(m, QuantRecipe(method=method, fmt=fmt), calib_ids=ids, progress=False)
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        w, imp = _layer_imp(tiny_model("llama"), ids, name)

        def err(method):
            q = get_module(models[method].model.layers[0], name).dequantize_weight()
            return float(((q - w) ** 2 * imp).sum())

        assert err("rtn-imatrix") < err("rtn")
    reload_same_logits(models["rtn-imatrix"], tmp_path / "ck")
    assert recipe_from_options("rtn-imatrix", {"isearch_grid": 9}).method_config["isearch_grid"] == 9


def test_awq_scale_search_option(tmp_path):
    ids = torch.randint(3, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    fmt = FormatConfig(bits=3, group_size=32, sym=True)
    outs = {}
    for on in (False, True):
        m = tiny_model("llama")
        cfg = {"awq_scale_search": on, "search_windows": 2, "clip_tokens": 64}
        lowbit.quantize(m, QuantRecipe(method="awq", fmt=fmt, method_config=cfg), calib_ids=ids, progress=False)
        outs[on] = m.model.layers[0].mlp.down_proj.dequantize_weight()
        if on:
            reload_same_logits(m, tmp_path / "ck")
    assert not torch.equal(outs[False], outs[True])
    assert recipe_from_options("awq", {"awq_scale_search": True}).method_config["awq_scale_search"] is True


def test_rtn_imatrix_cli(tiny_dir, text_file, tmp_path):
    from lowbit.cli import main

    out = tmp_path / "q"
    assert main(["-q", "quantize", str(tiny_dir), "--method", "rtn-imatrix", "--bits", "4", "--group-size", "32",
                 "--sym", "--calib", str(text_file), "--nsamples", "4", "--calib-seqlen", "32",
                 "--isearch-grid", "6", "--out", str(out)]) == 0
    assert (out / "lowbit.json").is_file()
    assert main(["-q", "eval", str(out), "--ppl", str(text_file), "--seqlen", "32", "--windows", "2",
                 "--results-dir", str(tmp_path / "res")]) == 0
