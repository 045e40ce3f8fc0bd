"""BiLLM: residual binarization never loses to plain binarization, the codec round trip with exact itemised bpw,
dequantize equals what the solver chose, save/load of a tiny model."""
import math

import pytest
import torch
from conftest import codec_round_trip, reload_same_logits, tiny_model

import lowbit
from lowbit.formats.binary import pm_one, residual_binarize, sign_bits, weighted_scale
from lowbit.methods.billm import BiLLMConfig, billm_solve
from lowbit.nn.bpw import item_kind
from lowbit.packing import packed_nbytes
from lowbit.quantize import QuantRecipe


def _layer(out_f=40, in_f=200, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    x = torch.randn(n, in_f, generator=g)
    x[:, ::7] *= 4.0
    return w, x, 2 * x.T @ x / n


def _weights(kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(48, 96, generator=g)
    # heavy tails: Student-t with 2 degrees of freedom
    return torch.randn(48, 96, generator=g) / torch.sqrt(torch.distributions.Chi2(2.0).sample((48, 96)) / 2)


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("seed", range(4))
def test_residual_never_worse_than_plain(kind, seed):
    torch.manual_seed(seed)
    w = _weights(kind, seed)
    mask = torch.rand(w.shape) < 0.7
    for c in (torch.ones(w.shape[1]), torch.rand(w.shape[1]) + 0.1):
        plain = weighted_scale(w, mask, c) * pm_one(sign_bits(w))
        _, _, resid = residual_binarize(w, mask, c)
        err = lambda q: float((((w - q) * mask).square() * c).sum())  # noqa: E731
        assert err(resid) <= err(plain) * (1 + 1e-6)
        assert err(resid) < err(plain)   # and on these weights strictly better


@pytest.mark.parametrize("out_f,in_f,cfg", [
    (40, 200, BiLLMConfig()),                               # short last block (200 = 128 + 72)
    (24, 64, BiLLMConfig(block_size=32, split_grid=9)),
    (16, 48, BiLLMConfig(max_salient=0)),                   # no salient columns: no res_signs buffer
])
def test_codec_round_trip_and_exact_bpw(out_f, in_f, cfg):
    w, x, h = _layer(out_f, in_f)
    qw, used = billm_solve(w, h, cfg)
    assert (qw.n_salient > 0) == (cfg.max_salient > 0)
    _, rep = codec_round_trip(qw, used)   # decodes to what the solver used; every field round-trips exactly
    # the items are what the layout says: signs, second signs and split bits, the column bitmap, four fp16 scales
    n, n_b = qw.n_salient, math.ceil(in_f / cfg.block_size)
    want = {"signs": 8 * packed_nbytes(out_f * in_f, 1), "split": 8 * packed_nbytes(out_f * (in_f - n), 1),
            "salient_cols": 8 * packed_nbytes(in_f, 1),
            **{k: 16 * out_f * n_b for k in ("scale_sal1", "scale_sal2", "scale_dense", "scale_sparse")}}
    if n:
        want["res_signs"] = 8 * packed_nbytes(out_f * n, 1)
    assert rep["items"] == want
    assert {item_kind(k) for k in want} <= {"codes", "scales", "outliers"}


def test_salient_columns_take_two_signs_and_the_rest_one_scale_each():
    w, x, h = _layer()
    qw, used = billm_solve(w, h, BiLLMConfig())
    sal = qw.salient_cols.bool()
    assert 0 < qw.n_salient < w.shape[1]
    # per row and block, the non-salient weights take exactly two magnitudes (dense, sparse), salient ones up to two
    blk = used[:, :128]
    rest = blk[:, ~sal[:128]].abs()
    for r in range(0, w.shape[0], 7):
        vals = set(rest[r].tolist())
        assert vals <= {float(qw.scale_dense[r, 0]), float(qw.scale_sparse[r, 0])}
    # the split bit marks the larger-magnitude group wherever the two scales differ
    dense, sparse = qw.scale_dense[:, :1], qw.scale_sparse[:, :1]
    assert bool(((sparse > dense) | (sparse == 0)).float().mean() > 0.9)


def test_billm_beats_plain_binarization_on_outputs():
    w, x, h = _layer(48, 256)
    qw, used = billm_solve(w, h, BiLLMConfig())
    plain = w.abs().mean(1, keepdim=True) * pm_one(sign_bits(w))
    err = lambda q: float((x @ (q - w).T).square().mean())  # noqa: E731
    assert err(used) < 0.5 * err(plain)


def test_dead_inputs_stay_finite():
    w, x, h = _layer()
    h[10:30, :] = 0.0
    h[:, 10:30] = 0.0
    qw, used = billm_solve(w, h, BiLLMConfig())
    assert torch.isfinite(used).all() and torch.equal(qw.dequantize(), used)


def test_billm_model_save_load(tmp_path):
    m = tiny_model("llama")
    calib = torch.randint(3, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    lowbit.quantize(m, QuantRecipe(method="billm", method_config={"block_size": 32}), calib_ids=calib,
                    progress=False)
    lin = m.model.layers[0].self_attn.q_proj
    assert lin.spec["codec"] == "billm" and lin.spec["n_salient"] > 0
    reload_same_logits(m, tmp_path / "ck")
    bpw = lowbit.nn.bpw.bpw_report(m)
    assert bpw["blocks"] == bpw["blocks_bits"] / bpw["blocks_weights"]
    assert bpw["blocks_bits"] == sum(bpw["blocks_items"].values())
    assert 2.0 < bpw["blocks"] < 4.2   # 2 bits of signs and split/second signs + 64/32 bits of fp16 scales
