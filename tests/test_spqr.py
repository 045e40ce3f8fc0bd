"""SpQR: the codec round trip, exact itemised bpw, outliers that help and are kept exactly."""
import math

import pytest
import torch
from conftest import codec_round_trip, reload_same_logits, tiny_model

import lowbit
from lowbit.formats.spqr import dequantize_stats, quantize_stats
from lowbit.methods.spqr import SpQRConfig, spqr_solve
from lowbit.nn.bpw import item_kind
from lowbit.packing import packed_nbytes
from lowbit.quantize import QuantRecipe


def _layer(out_f=40, in_f=72, n=512, seed=0):
    """A weight with a few large entries and inputs with a few loud channels: ``(W, X, H)``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    big = torch.randint(0, out_f * in_f, (out_f * in_f // 100,), generator=g)
    w.view(-1)[big] *= 12.0
    x = torch.randn(n, in_f, generator=g)
    x[:, ::9] *= 4.0
    return w, x, 2 * x.T @ x / n


def _out_err(w, x, qw):
    return float((x @ (qw - w).T).pow(2).mean())


@pytest.mark.parametrize("out_f,in_f,cfg", [
    (40, 72, SpQRConfig()),                                            # short last group (72 = 4 x 16 + 8), R = 3
    (32, 64, SpQRConfig(spqr_bits=4, stat_bits=2, stat_group=8)),
    (24, 48, SpQRConfig(outlier_threshold=0.0)),                       # no outliers: no outlier buffers
])
def test_codec_round_trip_and_exact_bpw(out_f, in_f, cfg):
    w, x, h = _layer(out_f, in_f)
    qw, used = spqr_solve(w, h, cfg)
    assert (qw.n_outliers > 0) == (cfg.outlier_threshold > 0)
    _, rep = codec_round_trip(qw, used)   # decodes to what the solver used; every field round-trips exactly
    # bpw: every item is its buffer's stored bytes * 8, and the items are what the layout says
    n_g, n_r, n = math.ceil(in_f / cfg.spqr_group), math.ceil(out_f / cfg.stat_group), qw.n_outliers
    want = {"codes": 8 * packed_nbytes(out_f * in_f, cfg.spqr_bits),
            "scale_codes": 8 * packed_nbytes(out_f * n_g, cfg.stat_bits),
            "zero_codes": 8 * packed_nbytes(out_f * n_g, cfg.stat_bits),
            **{k: 16 * n_r * n_g for k in ("scale_step", "scale_lo", "zero_step", "zero_lo")}}
    if n:
        want.update(outlier_values=16 * n, outlier_cols=16 * n,
                    outlier_counts=8 * packed_nbytes(out_f, math.ceil(math.log2(in_f + 1))))
    assert rep["items"] == want
    assert {item_kind(k) for k in want} <= {"codes", "scales", "outliers"}


def test_stats_quantization_round_trip():
    s = torch.rand(37, 5) + 0.1
    codes, step, lo = quantize_stats(s, 3, 16)
    assert codes.shape == (37, 5) and step.shape == lo.shape == (3, 5) and int(codes.max()) <= 7
    assert torch.equal(step, step.half().float()) and torch.equal(lo, lo.half().float())
    deq = dequantize_stats(codes, step, lo, 16)
    assert (deq - s).abs().max() <= step.repeat_interleave(16, 0)[:37].max() / 2 + 1e-6


def test_constant_and_dead_groups_stay_finite():
    """A group of equal values (or of dead inputs, zeroed) keeps a zero in range: no fp16 overflow, no NaN."""
    w, x, h = _layer()
    w[:, :16] = 0.03
    w[:5, 16:32] = -0.2
    h[40:56, :] = 0.0
    h[:, 40:56] = 0.0
    qw, used = spqr_solve(w, h, SpQRConfig())
    deq = qw.dequantize()
    assert torch.isfinite(deq).all() and torch.equal(deq, used)
    assert all(torch.isfinite(getattr(qw, n)).all() for n in ("scale_step", "scale_lo", "zero_step", "zero_lo"))
    assert qw.n_outliers < 0.05 * w.numel()   # the constant group is not made of outliers
    assert torch.allclose(deq[:, :16], w[:, :16], atol=1e-3)   # dead inputs round 0 to (round(z) - z) * s: unused


def test_outliers_lower_the_output_error():
    w, x, h = _layer()
    with_out, _ = spqr_solve(w, h, SpQRConfig())
    without, _ = spqr_solve(w, h, SpQRConfig(outlier_threshold=0.0))
    assert 0 < with_out.n_outliers < 0.05 * w.numel()
    assert _out_err(w, x, with_out.dequantize()) < 0.8 * _out_err(w, x, without.dequantize())


def test_outliers_are_kept_exactly():
    w, x, h = _layer()
    # identity Hessian: no feedback between columns, so each outlier holds the original weight (as fp16)
    qw, used = spqr_solve(w, torch.eye(w.shape[1]), SpQRConfig())
    rows, cols = qw.outlier_rows(), qw.outlier_cols
    assert qw.n_outliers > 0
    deq = qw.dequantize()
    assert torch.equal(deq[rows, cols], w[rows, cols].half().float())
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[rows, cols] = True
    assert not torch.equal(deq[~mask], w[~mask])
    # with a real Hessian the feedback moved the weights; each outlier is stored at the value the feedback used
    qw, used = spqr_solve(w, h, SpQRConfig())
    assert torch.equal(qw.outlier_values, used[qw.outlier_rows(), qw.outlier_cols])
    assert torch.equal(qw.dequantize(), used)
    assert torch.equal(qw.outlier_counts, torch.bincount(qw.outlier_rows(), minlength=w.shape[0]))


def test_spqr_model_save_load(tmp_path):
    m = tiny_model("llama")
    calib = torch.randint(3, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    lowbit.quantize(m, QuantRecipe(method="spqr"), calib_ids=calib, progress=False)
    lin = m.model.layers[0].self_attn.q_proj
    assert lin.spec["codec"] == "spqr" and lin.spec["n_outliers"] > 0
    reload_same_logits(m, tmp_path / "ck")
    bpw = lowbit.nn.bpw.bpw_report(m)
    assert 3.6 < bpw["blocks"] < 4.5 and bpw["blocks_items"]["outlier_values"] > 0
