"""E8P, the E8 lattice codebook (``--format e8p``): the codebook's structure, its exact nearest search, the format
through RTN and GPTQ, exact bits per weight and checkpoints."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.config import FormatConfig, parse_format_tag
from lowbit.errors import ConfigError
from lowbit.formats import make_format, quantize_rtn
from lowbit.formats.e8p import abs_table, codebook, e8p_decode, e8p_nearest
from lowbit.methods.gptq import gptq_quantize
from lowbit.nn.bpw import bpw_report, codec_bits
from lowbit.nn.codecs import get_codec
from lowbit.quantize import QuantRecipe

from conftest import reload_same_logits, tiny_model


def _fmt(bits, group_size=-1):
    return make_format({"format": "e8p", "bits": bits, "group_size": group_size, "sym": True})


def test_table_and_codebook_structure():
    """256 patterns (227 of |a|^2 <= 10, 29 of |a|^2 = 12); 65,536 distinct codewords, each s*a +- 1/4 with s*a
    in D8 + 1/2 (half-integers with an even sum)."""
    a = abs_table()
    n2 = a.pow(2).sum(1)
    assert a.shape == (256, 8) and int((n2 <= 10).sum()) == 227 and int((n2 == 12).sum()) == 29
    assert len({tuple(r.tolist()) for r in a}) == 256
    cb = codebook()
    assert cb.shape == (65536, 8) and torch.unique(cb, dim=0).shape[0] == 65536
    for shift, rows in ((0.25, cb[:32768]), (-0.25, cb[32768:])):
        p = rows - shift
        assert torch.equal(p.abs().sort(1).values, a.repeat(128, 1).sort(1).values)   # codes 0..32767: abs index low
        assert torch.all((p - 0.5).frac() == 0) and torch.all(p.sum(1).remainder(2) == 0)


def test_encode_decode_every_code():
    """The search returns every codeword's own code (all 65,536), also from a scaled weighting."""
    codes = torch.arange(65536)
    assert torch.equal(e8p_nearest(e8p_decode(codes)), codes)
    w = torch.rand(65536, 8, generator=torch.Generator().manual_seed(1)) + 0.05
    assert torch.equal(e8p_nearest(codebook(), w), codes)


@pytest.mark.parametrize("weighted", [False, True])
def test_nearest_is_exact_against_brute_force(weighted):
    """On random inputs the structured search finds the minimum of the (weighted) distance over every codeword."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g) * 1.3
    x[:50] *= 3   # some far outside the codebook's shell
    w = torch.rand(400, 8, generator=g) + 0.1 if weighted else torch.ones(400, 8)
    got = e8p_nearest(x, w)
    d = ((x[:, None, :] - codebook()[None]) ** 2 * w[:, None, :]).sum(-1)     # (400, 65536)
    best = d.min(1).values
    assert torch.allclose(d.gather(1, got[:, None])[:, 0], best, rtol=1e-5, atol=1e-6)
    assert (got == d.argmin(1)).float().mean() > 0.99   # exact ties aside, the same codeword


def test_format_codes_and_refusals():
    """Codes fit ``bits``; more bits, less error; at 2 bits quantize(dequantize) is stable; bad settings are refused."""
    w = torch.randn(64, 40, generator=torch.Generator().manual_seed(3)) * 0.02
    errs = []
    for bits in (2, 3, 4):
        qw = quantize_rtn(w, _fmt(bits))
        assert int(qw.codes.min()) >= 0 and int(qw.codes.max()) < 2 ** bits
        wq = qw.dequantize()
        errs.append(float((wq - w).pow(2).sum() / w.pow(2).sum()))
        if bits == 2:   # a codeword is its own nearest (a greedy residual stage need not be)
            assert torch.equal(qw.fmt.quantize(wq, {"scale": qw.params["scale"]}), qw.codes)
    assert errs[0] > errs[1] > errs[2] and errs[0] < 0.12
    with pytest.raises(ConfigError, match="bits 2 .* 3 .* 4"):
        _fmt(5)
    with pytest.raises(ConfigError, match="add --sym"):
        make_format({"format": "e8p", "bits": 2, "group_size": -1, "sym": False})
    with pytest.raises(ConfigError, match="multiple of 8"):
        quantize_rtn(torch.randn(12, 16), _fmt(2))
    assert parse_format_tag("e8p2-sym-pc") == FormatConfig("e8p", 2, -1, True)
    assert FormatConfig("e8p", 4, 64, True).tag() == "e8p4-sym-g64"


def test_gptq_loop_uses_it_and_beats_rtn():
    """GPTQ's column loop quantizes whole 8-row vectors with error feedback: lower output error than RTN."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 48, generator=g) @ (torch.randn(48, 48, generator=g) * 0.3 + torch.eye(48))
    h = 2 * x.T @ x / 1024
    w = torch.randn(40, 48, generator=g) * 0.05
    for bits in (2, 3, 4):
        fmt = _fmt(bits, 16)

        def out_err(qw):
            d = qw.dequantize() - w
            return float(torch.trace(d @ h @ d.T))
        assert out_err(gptq_quantize(w, h, fmt)) < 0.8 * out_err(quantize_rtn(w, fmt))


@pytest.mark.parametrize("bits, group_size", [(2, -1), (3, 32), (4, -1)])
def test_exact_bits_per_weight_and_codec(bits, group_size):
    """``bits`` per weight of codes plus one fp16 scale per (row, group), nothing else; the codec round-trips."""
    fmt = _fmt(bits, group_size)
    spec = {"codec": "scalar", "format": fmt.spec(), "out_features": 24, "in_features": 96}
    n_groups = 1 if group_size == -1 else 96 // group_size
    assert sum(codec_bits("scalar", spec).values()) == 24 * 96 * bits + 24 * n_groups * 16
    qw = quantize_rtn(torch.randn(24, 96, generator=torch.Generator().manual_seed(2)), fmt)
    buffers = get_codec("scalar").encode(qw, spec)
    assert torch.equal(get_codec("scalar").decode(buffers, spec), qw.dequantize())


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_model_saves_and_loads(tmp_path, method):
    """A tiny model quantized with e8p reloads to identical logits; blocks' bpw is 2 + 16 / in per layer exactly."""
    m = tiny_model("llama")
    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    fmt = FormatConfig("e8p", 2, -1, True)
    lowbit.quantize(m, QuantRecipe(method=method, fmt=fmt), calib_ids=calib if method == "gptq" else None,
                    progress=False)
    assert m.model.layers[0].self_attn.q_proj.spec["format"] == fmt.make().spec()
    back = reload_same_logits(m, tmp_path / "ck")
    rep = bpw_report(back)
    want = 0
    for name, v in rep["layers"].items():
        if name.startswith("model.layers"):
            spec = back.get_submodule(name).spec
            want += spec["out_features"] * spec["in_features"] * 2 + spec["out_features"] * 16   # codes + scales
    assert rep["blocks_bits"] == want and rep["blocks"] == want / rep["blocks_weights"]
