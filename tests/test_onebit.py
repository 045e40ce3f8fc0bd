"""OneBit: SVID recovers a sign matrix times a positive rank-1 matrix, the codec round trip with exact bpw, the
factored forward, save/load of a tiny model."""
import pytest
import torch
import torch.nn.functional as F
from conftest import codec_round_trip, reload_same_logits, tiny_model

import lowbit
from lowbit.formats.binary import OneBitWeight, pm_one
from lowbit.methods.onebit import OneBitConfig, onebit_quantize, svid
from lowbit.packing import packed_nbytes
from lowbit.quantize import QuantRecipe


def _rank1_times_signs(out_f=37, in_f=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(out_f, generator=g) + 0.2, torch.rand(in_f, generator=g) * 3 + 0.1
    s = torch.where(torch.rand(out_f, in_f, generator=g) < 0.5, -1.0, 1.0)
    return a, b, s, a[:, None] * s * b[None, :]


@pytest.mark.parametrize("seed", range(3))
def test_svid_recovers_rank1_times_signs(seed):
    a, b, s, w = _rank1_times_signs(seed=seed)
    g, h = svid(w.abs())
    assert torch.allclose(g[:, None] * h[None, :], a[:, None] * b[None, :], rtol=1e-5, atol=0)
    assert (g > 0).all() and (h > 0).all() and torch.allclose(g.norm(), h.norm())
    qw = onebit_quantize(w)
    assert torch.equal(pm_one(qw.signs), s)
    # exact but for the fp16 rounding of the two stored vectors
    assert torch.allclose(qw.dequantize(), w, rtol=2e-3, atol=0)
    assert torch.equal(qw.dequantize(), qw.out_scale[:, None] * s * qw.in_scale[None, :])


def test_svid_is_the_best_rank1_fit():
    m = torch.randn(40, 70, generator=torch.Generator().manual_seed(1)).abs()
    g, h = svid(m)
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    best = sv[0] * u[:, :1] @ vh[:1]
    assert torch.allclose(g[:, None] * h[None, :], best.abs(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("out_f,in_f", [(37, 53), (64, 96), (1, 9)])
def test_codec_round_trip_and_exact_bpw(out_f, in_f):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(out_f)) * 0.05
    qw = onebit_quantize(w, OneBitConfig())
    _, rep = codec_round_trip(qw, qw.dequantize())   # signs exactly, g and h as their fp16 values
    assert rep["items"] == {"signs": 8 * packed_nbytes(out_f * in_f, 1), "out_scale": 16 * out_f, "in_scale": 16 * in_f}


def test_factored_forward_equals_dequantized():
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(2))
    qw = onebit_quantize(w)
    x, bias = torch.randn(5, 80), torch.randn(48)
    assert torch.allclose(qw.linear(x, bias), F.linear(x, qw.dequantize(), bias), rtol=1e-5, atol=1e-5)
    assert isinstance(qw, OneBitWeight)


def test_onebit_model_save_load(tmp_path):
    m = tiny_model("llama")
    lowbit.quantize(m, QuantRecipe(method="onebit"), progress=False)
    lin = m.model.layers[0].mlp.down_proj
    assert lin.spec["codec"] == "onebit"
    reload_same_logits(m, tmp_path / "ck")
    bpw = lowbit.nn.bpw.bpw_report(m)
    assert bpw["blocks_bits"] == sum(bpw["blocks_items"].values())
    assert 1.0 < bpw["blocks"] < 1.6   # hidden 64: (out + in) * 16 bits of vectors per 64 x 96 weights
