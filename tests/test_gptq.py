"""GPTQ solver on synthetic layers: no model needed."""
import pytest
import torch

from lowbit.formats import IntFormat, quantize_rtn
from lowbit.methods.feedback import inverse_hessian_factor
from lowbit.methods.gptq import gptq_quantize


def _layer(seed=0, rows=48, cols=96):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    # correlated inputs with uneven channel scales: a non-trivial Hessian
    X = torch.randn(4096, cols, generator=g) @ (torch.randn(cols, cols, generator=g) * 0.3) \
        + torch.randn(4096, cols, generator=g) * torch.linspace(0.2, 3, cols)
    return W, X, 2 * X.T @ X / X.shape[0]


def _out_err(X, W, Wq):
    return ((X @ (Wq - W).T) ** 2).mean().item()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("gs", [32, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(bits, gs, act_order):
    W, X, H = _layer()
    fmt = IntFormat(bits=bits, group_size=gs)
    q = gptq_quantize(W, H, fmt, act_order=act_order, block_size=32)
    r = quantize_rtn(W, fmt)
    assert _out_err(X, W, q.dequantize()) < 0.9 * _out_err(X, W, r.dequantize())


@pytest.mark.parametrize("gs", [16, 40, -1])
def test_identity_hessian_equals_rtn(gs):
    W, _, _ = _layer(1, cols=100)
    fmt = IntFormat(bits=3, group_size=gs)
    q = gptq_quantize(W, torch.eye(100), fmt, block_size=32)
    r = quantize_rtn(W, fmt)
    assert torch.equal(q.codes, r.codes)
    assert all(torch.equal(q.params[k], r.params[k]) for k in r.params)


def test_act_order_groups_are_original_columns():
    """With act-order each column keeps its original group's parameters (no index map)."""
    W, X, H = _layer(2, cols=64)
    fmt = IntFormat(bits=3, group_size=16)
    q = gptq_quantize(W, H, fmt, act_order=True, block_size=8)
    assert q.params["scale"].shape == (48, 4)
    # the stored codes and parameters reproduce the solver's weights through the canonical layout
    deq = q.dequantize()
    assert torch.isfinite(deq).all()
    # every code fits its own group's grid: requantizing the dequantized weight is a fixed point
    r = quantize_rtn(deq, fmt)
    # (a group's range may shrink after quantization, so compare via the stored parameters instead)
    from lowbit.formats import group_layout

    lay = group_layout(64, 16)
    p = {k: v.unsqueeze(-1) for k, v in q.params.items()}
    again = lay.from_groups(fmt.quantize(lay.to_groups(deq), p))
    assert torch.equal(again, q.codes)
    assert r.codes.shape == q.codes.shape
    # and act-order still beats RTN
    assert _out_err(X, W, deq) < _out_err(X, W, quantize_rtn(W, fmt).dequantize())


def test_dead_inputs_and_damping_retry():
    W, X, H = _layer(3, cols=32)
    H[5, :] = 0
    H[:, 5] = 0  # input 5 is always zero
    q = gptq_quantize(W, H, IntFormat(bits=4, group_size=16))
    assert torch.isfinite(q.dequantize()).all()
    # a rank-deficient Hessian with no damping needs the automatic retry
    x = torch.randn(4, 32)
    U, used = inverse_hessian_factor(x.T @ x, damp=0.0)
    assert used > 0 and torch.isfinite(U).all()


@pytest.mark.parametrize("fmt_name", ["fp", "nf", "int"])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_beats_rtn_with_every_format(fmt_name, bits, sym):
    """The solver only sees the format object: FP/NF tables, one or two scales, gain as INT does."""
    from lowbit.config import FormatConfig

    W, X, H = _layer(3)
    fmt = FormatConfig(format=fmt_name, bits=bits, group_size=32, sym=sym).make()
    q = gptq_quantize(W, H, fmt, block_size=32)
    r = quantize_rtn(W, fmt)
    assert _out_err(X, W, q.dequantize()) < 0.9 * _out_err(X, W, r.dequantize())


@pytest.mark.parametrize("gs,sym", [(32, True), (24, False)])
def test_scale_search_with_a_diagonal_hessian_is_the_weighted_search(gs, sym):
    """With a diagonal H nothing feeds back between columns, so GPTQ with --gptq-scale-search must equal the
    diag(H)-weighted int scale search on the original weights (codes and parameters), ragged last group included."""
    from lowbit.formats.scale_search import search_int_scales

    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 70, generator=g)
    d = torch.rand(70, generator=g) * 4 + 0.1
    fmt = IntFormat(bits=4, group_size=gs, sym=sym)
    got = gptq_quantize(w, torch.diag(d), fmt, damp=0.0, scale_search=True)
    ref = search_int_scales(w, fmt, d)
    assert torch.equal(got.codes, ref.codes)
    assert got.params.keys() == ref.params.keys()
    for k in ref.params:
        assert torch.equal(got.params[k], ref.params[k]), k


def test_scale_search_refusals():
    from lowbit.errors import ConfigError
    from lowbit.formats import make_format
    from lowbit.methods.gptq import GPTQConfig

    with pytest.raises(ConfigError, match="--format int"):
        gptq_quantize(torch.randn(4, 32), torch.eye(32), make_format({"format": "nf", "bits": 4, "group_size": 32}),
                      scale_search=True)
    with pytest.raises(ConfigError, match="pick one"):
        GPTQConfig(clip=True, gptq_scale_search=True)
    with pytest.raises(ConfigError, match=">= 0"):
        GPTQConfig(first_position_weight=-1.0)


def test_first_position_weight_in_the_hessian():
    """GroupStats(first_weight=w) accumulates H as if each window's first row were sqrt(w) times larger; the
    other statistics are unchanged."""
    from lowbit.calib.engine import GroupStats

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    needs = frozenset({"hessian", "act_sqmean"})
    st, plain = GroupStats(first_weight=9.0), GroupStats()
    for x in xs:
        st.add(x, needs)
        plain.add(x, needs)
    ref = torch.cat([x.clone() for x in xs])
    ref[:, 0] *= 3.0
    ref = ref.reshape(-1, 8)
    torch.testing.assert_close(st.hessian, 2 * ref.T @ ref / ref.shape[0])
    assert torch.equal(st.sqmean, plain.sqmean)
