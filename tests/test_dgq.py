"""DGQ A8W4: dual-grained int4 scales, the int8 GEMM layer, the method, checkpoints and bpw."""
import pytest
import torch
from conftest import tiny_model

import lowbit
from lowbit.config import FormatConfig
from lowbit.errors import CheckpointError, ConfigError
from lowbit.formats import IntFormat, quantize_rtn
from lowbit.formats.dual_grained import K_MAX, K_MIN, SCALE_SEARCH_ALPHAS, fit_dual_grained
from lowbit.kernels.intmm import int_mm_reference, rescale_reference
from lowbit.methods.dgq import dgq_quantize
from lowbit.models.arch import arch_for
from lowbit.nn.bpw import bpw_report, layer_bits
from lowbit.nn.dgq import QuantizedDGQLinear, from_dual_grained
from lowbit.nn.w8a8 import act_linear_summary, padded_k
from lowbit.quantize import QuantRecipe

W4G = FormatConfig(bits=4, group_size=16, sym=True)


def _w(out, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=g) * 0.05
    w[:, :: max(k // 5, 1)] *= 6.0                                         # groups with different ranges
    return w


def _x(m, k, seed=1, outlier=30.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 1] *= outlier                                                      # an outlier channel
    return x


@pytest.mark.parametrize("out,k,gs", [(24, 40, 16), (7, 100, 32), (5, 576, 128), (3, 17, 128), (9, 33, 8)])
def test_dual_grained_ranges_and_int8_product(out, k, gs):
    dg = fit_dual_grained(_w(out, k), gs, alphas=SCALE_SEARCH_ALPHAS)
    assert dg.codes.dtype == torch.int8 and dg.codes.min() >= -8 and dg.codes.max() <= 7
    kk = dg.group_int
    assert kk.shape == (out, -(-k // gs)) and bool(((kk >= K_MIN) & (kk <= K_MAX) & (kk != 0)).all())
    # the channel scale is an fp16 value, so the effective group scales are exact in float32
    assert torch.equal(dg.channel_scale.half().float(), dg.channel_scale)
    prod = dg.codes.long() * kk.long().repeat_interleave(gs, dim=1)[:, :k]
    assert prod.min() >= -128 and prod.max() <= 127 and torch.equal(dg.int8_weight().long(), prod)


def test_dual_grained_close_to_group_rtn_and_search_helps():
    w = _w(64, 256)
    fine = quantize_rtn(w, IntFormat(4, 32, sym=True)).dequantize()
    err = lambda d: float((d.dequantize() - w).pow(2).sum() / w.pow(2).sum())   # noqa: E731
    plain, searched = fit_dual_grained(w, 32), fit_dual_grained(w, 32, alphas=SCALE_SEARCH_ALPHAS)
    fine_err = float((fine - w).pow(2).sum() / w.pow(2).sum())
    per_channel = quantize_rtn(w, IntFormat(4, -1, sym=True)).dequantize()
    pc_err = float((per_channel - w).pow(2).sum() / w.pow(2).sum())
    assert err(searched) <= err(plain) + 1e-12
    assert err(searched) < 1.5 * fine_err and err(searched) < pc_err   # near fine-grained, better than per channel


def test_gptq_codes_beat_rtn_on_output_error():
    w, x = _w(32, 128), _x(512, 128)
    h = 2 * x.T @ x / x.shape[0]
    out_err = lambda dg: float((x @ (dg.dequantize() - w).T).pow(2).sum())   # noqa: E731
    g = dgq_quantize(w, 32, h)
    r = dgq_quantize(w, 32, None)
    assert out_err(g) < out_err(r)
    # GPTQ keeps the scales it fitted (with diag(H) as importance) and only picks the codes
    assert g.codes.min() >= -8 and g.codes.max() <= 7


@pytest.mark.parametrize("out,k,gs,m", [(24, 40, 16, 1), (24, 40, 16, 37), (7, 100, 32, 5), (19, 576, 128, 64),
                                        (5, 17, 128, 3)])
def test_int8_path_equals_dequantized_reference_exactly(out, k, gs, m):
    w, x = _w(out, k), _x(m, k, outlier=4.0)
    dg = fit_dual_grained(w, gs, alphas=SCALE_SEARCH_ALPHAS)
    mod = from_dual_grained(dg)
    w8 = mod.int_weight()
    assert w8.shape == (out, padded_k(k)) and w8.dtype == torch.int8 and not w8[:, k:].any()
    assert torch.equal(w8[:, :k], dg.int8_weight())
    # the layer's float weight is c * k * s, the DualGrained's dequantization, bit for bit
    assert torch.equal(mod.dequantize_weight(), dg.dequantize())
    # integer accumulation: exactly the product of the activation codes with c * k
    acc, s = mod.int_accumulate(x)
    qa, s2 = mod.quantize_input(x)
    assert torch.equal(s, s2) and s.shape == (m, 1)
    assert torch.equal(acc, int_mm_reference(qa.to(torch.int8), w8))
    assert torch.equal(acc, (qa.double() @ w8.double().T).to(torch.int32))
    # the int forward is that accumulation times (activation scale outer channel scale), bit for bit
    y = mod(x)
    assert torch.equal(y, rescale_reference(acc, s, mod.w_scale.float()))
    # and the simulated path (dequantized weights, float matmul) agrees up to float32 rounding
    mod.mode = "fake"
    y_fake = mod(x)
    assert (y - y_fake).abs().max() <= 1e-5 * y_fake.abs().max()
    ref = x @ w.T   # int4 weights of groups with one 6x column each: a few % weight error, like group-wise RTN's
    assert ((y - ref).pow(2).sum() / ref.pow(2).sum()) < 0.06


def test_batched_input_matches_rows():
    w = _w(24, 40)
    mod = from_dual_grained(fit_dual_grained(w, 16))
    x = _x(2 * 7, 40).view(2, 7, 40)
    y = mod(x)
    assert y.shape == (2, 7, 24)
    # per-token scales: each token's output does not depend on the batch it is in
    assert torch.equal(y[1, 3], mod(x[1, 3:4])[0])


def test_bpw_is_exact():
    mod = from_dual_grained(fit_dual_grained(_w(48, 576), 128))
    rep = layer_bits(mod)
    assert rep["items"] == {"qweight": 48 * 576 * 4, "group_scale": 48 * 5 * 8, "w_scale": 48 * 16}
    assert rep["bpw"] == pytest.approx(4 + 5 * 8 / 576 + 16 / 576)
    ragged = from_dual_grained(fit_dual_grained(_w(3, 100), 32))   # codes padded to 128 columns, stored as such
    assert layer_bits(ragged)["items"] == {"qweight": 3 * 128 * 4, "group_scale": 3 * 4 * 8, "w_scale": 3 * 16}


def test_corrupt_group_scales_refused():
    mod = from_dual_grained(fit_dual_grained(_w(4, 64), 16))
    mod.group_scale[0, 0] = -16                                            # -8 * -16 = 128 overflows int8
    mod._drop_caches()
    with pytest.raises(CheckpointError, match="group scales"):
        mod(_x(2, 64))


@pytest.mark.parametrize("cfg", [{}, {"dgq_weight_method": "rtn", "dgq_scale_search": True},
                                 {"dgq_clip": True, "int8_head": True}])
def test_method_save_load_identical_logits(tmp_path, cfg):
    m = tiny_model("llama")
    ids = torch.randint(3, 320, (2, 32), generator=torch.Generator().manual_seed(5))
    calib = torch.randint(3, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    lowbit.quantize(m, QuantRecipe(method="dgq", fmt=W4G, method_config=cfg), calib_ids=calib, progress=False)
    arch = arch_for(m)
    assert all(isinstance(m.model.layers[0].get_submodule(n), QuantizedDGQLinear) for n in arch.linears)
    assert set(act_linear_summary(m)["macs_per_token"]) >= {"W4A8"}
    with torch.no_grad():
        out = m(input_ids=ids).logits
        one = m(input_ids=ids[:1, :1]).logits                             # a single token
    assert one.shape[1] == 1
    assert ((out - ref).pow(2).mean() / ref.pow(2).mean()) < 0.5
    # bpw: int4 codes + int8 group scales + fp16 channel scales, every block linear counted as stored
    rep = bpw_report(m)
    want = sum(o * padded_k(i) * 4 + o * -(-i // 16) * 8 + o * 16 for o, i in
               ((mod.out_features, mod.in_features) for blk in m.model.layers for mod in
                (blk.get_submodule(n) for n in arch.linears)))
    assert rep["blocks_bits"] == want
    back = lowbit.load(lowbit.save(m, tmp_path / "ck"))
    assert isinstance(back.model.layers[1].mlp.down_proj, QuantizedDGQLinear)
    sd, sd2 = m.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, out)
        assert torch.equal(back(input_ids=ids[:1, :1]).logits, one)


@pytest.mark.parametrize("fmt,match", [
    (FormatConfig(bits=4, group_size=16, sym=False), "--sym"),
    (FormatConfig(bits=8, group_size=16, sym=True), "--bits 4"),
    (FormatConfig(bits=4, group_size=-1, sym=True), "G > 0"),
    (FormatConfig(format="nf", bits=4, group_size=16), "--format int"),
])
def test_unsupported_formats_refused(fmt, match):
    with pytest.raises(ConfigError, match=match):
        lowbit.quantize(tiny_model("llama"), QuantRecipe(method="dgq", fmt=fmt, method_config={"dgq_weight_method": "rtn"}),
                        calib_ids=torch.randint(3, 320, (2, 16)), progress=False)


def test_unknown_weight_method_and_other_flags_refused():
    from lowbit.quantize import recipe_from_options

    with pytest.raises(ConfigError, match="dgq-weight-method"):
        recipe_from_options("dgq", {"dgq_weight_method": "awq"})
    with pytest.raises(ConfigError):
        recipe_from_options("dgq", {"fq_int4_budget": 0.1})                # another method's setting


def test_export_refuses_integer_targets_and_dequantizes(tmp_path):
    from conftest import tiny_tokenizer
    from safetensors.torch import load_file

    from lowbit.api import export
    from lowbit.errors import ExportError

    m = tiny_model("llama")
    lowbit.quantize(m, QuantRecipe(method="dgq", fmt=W4G, method_config={"dgq_weight_method": "rtn"}),
                    calib_ids=torch.randint(3, 320, (2, 16)), progress=False)
    ck = lowbit.save(m, tmp_path / "ck", tiny_tokenizer())
    for to in ("gptq", "compressed-tensors"):
        with pytest.raises(ExportError, match=r"q_proj\.weight.*DGQ A8W4 g16"):
            export(ck, to, tmp_path / to)
    out = export(ck, "f16", tmp_path / "f16")
    w = load_file(str(out / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(w, m.model.layers[0].self_attn.q_proj.dequantize_weight().half())


def test_percentile_smoothing_keeps_the_float_block_and_runs():
    from lowbit.calib.engine import capture_inputs, collect_stats, run_block
    from lowbit.calib.engine import BlockData
    from lowbit.methods.dgq import DGQConfig, _dgq_prepare, percentile_smooth_scales

    s = percentile_smooth_scales(torch.tensor([1.0, 2.0, 3.0, 10.0, 40.0]), 50.0)   # T = 3
    assert torch.allclose(s, torch.tensor([1.0, 1.0, 1.0, 10 / 3, 40 / 3]))
    m = tiny_model("llama")
    arch = arch_for(m)
    cpu = torch.device("cpu")
    inputs, kwargs = capture_inputs(m, arch, torch.randint(3, 320, (4, 32)), batch_size=2, offload=cpu)
    block = m.get_submodule(arch.blocks)[0]
    stats = collect_stats(block, arch.groups, inputs, kwargs[0], frozenset({"act_absmax", "hessian"}), cpu, cpu)
    ref = torch.cat(run_block(block, inputs, kwargs[0], cpu, cpu))
    h0 = {g: st.hessian.clone() for g, st in stats.items()}
    _dgq_prepare(BlockData(block, 0, inputs, kwargs[0], cpu), arch, stats, W4G.make(), DGQConfig(dgq_smooth_pct=90.0))
    torch.testing.assert_close(torch.cat(run_block(block, inputs, kwargs[0], cpu, cpu)), ref, rtol=1e-4, atol=1e-4)
    assert any(not torch.equal(h0[g], st.hessian) for g, st in stats.items())   # the Hessians follow x / s
    # and the whole method runs with it, saving and reloading like the rest
    m2 = tiny_model("llama")
    lowbit.quantize(m2, QuantRecipe(method="dgq", fmt=W4G, method_config={"dgq_smooth_pct": 90.0}),
                    calib_ids=torch.randint(3, 320, (4, 32)), progress=False)
    assert isinstance(m2.model.layers[0].self_attn.q_proj, QuantizedDGQLinear)
