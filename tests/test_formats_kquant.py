"""K-quant formats: ggml's super-block grids as lowbit formats, their codec, fallback, tags and the search."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.config import FormatConfig, parse_format_tag
from lowbit.errors import ConfigError
from lowbit.formats import IntFormat, KQuantFormat, quantize_rtn
from lowbit.formats.kquant import KTYPES, search_kquant
from lowbit.formats.quantize import DEFAULT_CLIP_GRID
from lowbit.methods.gptq import gptq_quantize
from lowbit.nn import QuantizedLinear, scalar_spec
from lowbit.nn.bpw import codec_bits
from lowbit.quantize import QuantRecipe, recipe_from_options

from conftest import reload_same_logits, tiny_model

BPW = {2: 2.625, 3: 3.4375, 4: 4.5, 5: 5.5, 6: 6.5625}   # ggml's block sizes in bits per weight
ALL = [KQuantFormat(b, kt.sub, kt.sym) for b, kt in KTYPES.items()]
IDS = [f"q{f.bits}_k" for f in ALL]


def _weight(rows=16, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[:, 7] *= 10                    # an outlier column
    w[1] = w[1].abs()                # a row without negative weights
    w[2, :256] = 0                   # an all-zero super-block
    return w


def _super_consistent(qw):
    """Every super-block parameter is one value per super-block (the codec refuses anything else)."""
    n = qw.fmt.fit_span
    for k, v in qw.params.items():
        if k.startswith("super"):
            assert torch.equal(v, v[:, ::n].repeat_interleave(n, dim=1)), k


@pytest.mark.parametrize("fmt", ALL, ids=IDS)
def test_codec_round_trip_and_exact_bpw(fmt):
    """Save buffers -> rebuild gives the same weight bit for bit; the buffers take ggml's bits per weight exactly."""
    w = _weight()
    qw = quantize_rtn(w, fmt)
    assert qw.fmt is fmt and qw.codes.min() >= 0 and qw.codes.max() <= fmt.maxq
    _super_consistent(qw)
    spec = scalar_spec(fmt, *w.shape)
    m = QuantizedLinear.from_quantized(qw, spec)
    assert torch.equal(m.dequantize_weight(), qw.dequantize())
    bits = codec_bits("scalar", spec)
    assert sum(bits.values()) / w.numel() == BPW[fmt.bits]
    assert bits["super_scale"] == 16 * w.numel() // 256
    rebuilt = m.codec.to_quantized_weight(m.packed_buffers(), spec)
    assert torch.equal(rebuilt.codes, qw.codes)
    assert all(torch.equal(rebuilt.params[k], qw.params[k]) for k in qw.params)


def test_codec_refuses_super_params_that_vary_inside_a_super_block():
    fmt = KQuantFormat(4, 32, False)
    qw = quantize_rtn(_weight(), fmt)
    qw.params["super_scale"][0, 1] += 1e-3
    with pytest.raises(ValueError, match="equal over each run of 8 groups"):
        QuantizedLinear.from_quantized(qw, scalar_spec(fmt, 16, 512))


@pytest.mark.parametrize("fmt", ALL, ids=IDS)
def test_rtn_error_floor(fmt):
    """A sanity floor per type: relative weight error falls with the bits."""
    w = _weight()
    err = float(((quantize_rtn(w, fmt).dequantize() - w) ** 2).sum() / (w ** 2).sum())
    assert err < {2: 0.2, 3: 0.05, 4: 0.012, 5: 0.003, 6: 0.001}[fmt.bits]


@pytest.mark.parametrize("fmt", ALL, ids=IDS)
def test_search_beats_rtn_per_super_block(fmt):
    """The search never loses to RTN on any super-block and wins overall; with an importance vector, on the
    weighted error."""
    w = _weight()
    imp = torch.rand(512, generator=torch.Generator().manual_seed(1)) ** 4
    for importance in (None, imp):
        om = torch.ones(512) if importance is None else importance / importance.mean() + 1e-6

        def err(qw):
            return ((qw.dequantize() - w) ** 2 * om).view(16, 2, 256).sum(-1)   # (rows, super-blocks)

        rtn, found = err(quantize_rtn(w, fmt)), search_kquant(w, fmt, importance)
        _super_consistent(found)
        e = err(found)
        assert (e <= rtn * (1 + 1e-6) + 1e-12).all()
        assert e.sum() < 0.97 * rtn.sum()


def test_fit_needs_whole_super_blocks():
    fmt = KQuantFormat(6, 16, True)
    with pytest.raises(ConfigError, match="super-block"):
        fmt.fit(torch.randn(4, 1, 16))
    with pytest.raises(ConfigError, match="whole super-blocks"):
        search_kquant(torch.randn(4, 576), fmt)


@pytest.mark.parametrize("fmt", ALL, ids=IDS)
def test_other_widths_take_the_stated_int_fallback(fmt):
    """576 columns are not whole super-blocks: the layer is quantized (and its spec written) in the fallback."""
    fb = fmt.for_width(576)
    assert isinstance(fb, IntFormat) and fb.group_size == 32 and (fb.bits, fb.sym) == KTYPES[fmt.bits].fallback
    assert fmt.for_width(1536) is fmt
    qw = quantize_rtn(torch.randn(8, 576), fmt)
    assert qw.fmt == fb


def test_tags_and_flags():
    assert parse_format_tag("q4_k") == FormatConfig("kquant", 4, 32, False)
    assert parse_format_tag("Q6_K") == FormatConfig("kquant", 6, 16, True)
    assert parse_format_tag("q3_k").tag() == "q3_k"
    assert recipe_from_options("rtn", {"format": "q2_k"}).fmt == FormatConfig("kquant", 2, 16, False)
    assert recipe_from_options("rtn", {"format": "kquant", "bits": 5}).tag() == "q5_k"
    assert recipe_from_options("ksearch", {"format": "q4_k", "ks_iters": 2}).method_config["ks_iters"] == 2
    with pytest.raises(ConfigError, match="q6_k fixes --bits to 6"):
        recipe_from_options("rtn", {"format": "q6_k", "bits": 4})
    with pytest.raises(ConfigError, match="needs --bits"):
        recipe_from_options("rtn", {"format": "kquant"})
    with pytest.raises(ConfigError, match="there is no q7_k"):
        parse_format_tag("q7_k")
    with pytest.raises(ConfigError, match="sub-blocks of 32 columns"):
        FormatConfig("kquant", 4, 128, False).make()
    with pytest.raises(ConfigError, match="needs a K-quant format"):
        recipe = QuantRecipe(method="ksearch", fmt=FormatConfig(bits=4, group_size=32))
        lowbit.quantize(tiny_model("llama"), recipe, progress=False)


def test_clip_search_chooses_per_super_block():
    """RTN's clipping grid with a K-quant picks one candidate per super-block (a mix would not be storable) and
    is no worse than plain RTN."""
    w = _weight()
    fmt = KQuantFormat(4, 32, False)
    clipped = quantize_rtn(w, fmt, DEFAULT_CLIP_GRID)
    _super_consistent(clipped)
    assert ((clipped.dequantize() - w) ** 2).sum() <= ((quantize_rtn(w, fmt).dequantize() - w) ** 2).sum()


@pytest.mark.parametrize("fmt", [ALL[2], ALL[4]], ids=["q4_k", "q6_k"])
def test_gptq_fits_whole_super_blocks(fmt):
    """GPTQ fits a super-block's parameters when it reaches its first column; it beats RTN on the output error."""
    g = torch.Generator().manual_seed(0)
    w = _weight(rows=16, cols=512)
    x = torch.randn(2048, 512, generator=g) * (torch.rand(512, generator=g) * 2)
    x = x + 0.5 * x.roll(1, dims=1)                     # correlated inputs
    h = 2 * x.T @ x / x.shape[0]
    for act_order in (False, True):
        qw = gptq_quantize(w, h, fmt, act_order=act_order)
        _super_consistent(qw)
        QuantizedLinear.from_quantized(qw, scalar_spec(fmt, 16, 512))

        def out_err(q):
            d = q.dequantize() - w
            return float(torch.trace(d @ h @ d.T))

        assert out_err(qw) < out_err(quantize_rtn(w, fmt))


def test_checkpoint_with_kquant_and_fallback_layers(tmp_path):
    """A recipe q4_k on a model with 256- and 96-wide rows: K-quant and fallback layers save and load, logits equal."""
    m = tiny_model("llama", hidden=256, intermediate=96)
    lowbit.quantize(m, QuantRecipe(fmt=parse_format_tag("q4_k"), embed=parse_format_tag("q6_k")), progress=False)
    layer = m.model.layers[0]
    assert layer.self_attn.q_proj.spec["format"]["format"] == "kquant"
    assert layer.mlp.down_proj.spec["format"] == IntFormat(4, 32, False).spec()     # 96 columns: Q4_1's grid
    reload_same_logits(m, tmp_path / "ck")


def test_ksearch_imatrix_weighs_by_the_calibration_inputs():
    """Through the engine: each K layer's error, weighted by its inputs' mean square (collected as act_sqmean),
    is at most RTN's; the data-free search minimises the plain weight error instead, so the results differ."""
    from lowbit.models.arch import arch_for, get_module

    ids = torch.randint(3, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    float_model = tiny_model("llama", hidden=256, intermediate=512)
    models = {m: tiny_model("llama", hidden=256, intermediate=512) for m in ("rtn", "ksearch", "ksearch-imatrix")}
    for method, m in models.items():
        lowbit.quantize(m, QuantRecipe(method=method, fmt=parse_format_tag("q3_k")), calib_ids=ids, progress=False)
    name = "mlp.down_proj"                                   # block 0's inputs are the float model's
    lin = get_module(get_module(float_model, arch_for(float_model).blocks)[0], name)
    seen = []
    lin.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        float_model(ids)
    imp = torch.cat(seen).pow(2).mean(0)

    def weighted_err(method):
        q = get_module(models[method].model.layers[0], name).dequantize_weight()
        return float(((q - lin.weight.detach()) ** 2 * imp).sum())

    assert weighted_err("ksearch-imatrix") <= weighted_err("rtn")
    assert weighted_err("ksearch-imatrix") != weighted_err("ksearch")
