import pytest
import torch

from lowbit.config import FormatConfig
from lowbit.errors import ConfigError
from lowbit.formats import IntFormat, group_layout, quantize_rtn


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [32, 64, -1])
def test_rtn_error_bound(bits, sym, gs):
    """Each weight is within half a step of its group's grid (range contains the group)."""
    torch.manual_seed(0)
    w = torch.randn(16, 100)
    fmt = IntFormat(bits=bits, group_size=gs, sym=sym)
    qw = quantize_rtn(w, fmt)
    lay = group_layout(100, gs)
    step = qw.params["scale"][:, lay.column_group()].abs()  # (16, 100); a symmetric scale is signed
    err = (qw.dequantize() - w).abs()
    # the fitted scale is rounded to fp16 (relative error <= 2**-11), which moves the level q
    # by up to |q - z| * step * 2**-11 with |q - z| <= 2**bits
    slack = (2 ** bits) * step * 2.0 ** -11 + 1e-6
    if sym:
        # the grid spans (q - z) * s for q in [0, 2**b): the group's peak sits on its far level -2**(b-1);
        # a weight beyond the other end is clipped to it, every other weight is within half a step
        s = qw.params["scale"][:, lay.column_group()]
        ends = torch.stack([-(2 ** (bits - 1)) * s, (2 ** (bits - 1) - 1) * s])
        lo, hi = ends.amin(0), ends.amax(0)
        outside = (w - w.clamp(lo, hi)).abs()
        assert torch.all(err <= torch.maximum(0.5 * step, outside) + slack)
        col_group = lay.column_group()
        for g in col_group.unique().tolist():
            cols = (col_group == g).nonzero().flatten()
            peak = cols[w[:, cols].abs().argmax(1)]            # (16,) the column of each row's peak
            rows = torch.arange(16)
            assert torch.all(err[rows, peak] <= slack[rows, peak])
    else:
        assert torch.all(err <= 0.5 * step + slack)
    assert qw.codes.min() >= 0 and qw.codes.max() < 2 ** bits


def test_more_bits_less_error():
    torch.manual_seed(1)
    w = torch.randn(32, 256)
    errs = [(quantize_rtn(w, IntFormat(bits=b, group_size=64)).dequantize() - w).pow(2).mean() for b in (2, 3, 4, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_short_last_group_576_by_128():
    """576 = 4.5 x 128: the last group has 64 columns and its own parameters."""
    lay = group_layout(576, 128)
    assert (lay.n_groups, lay.tail) == (5, 64)
    w = torch.randn(4, 576)
    w[:, 512:] *= 10  # the short group has a much larger range
    qw = quantize_rtn(w, IntFormat(bits=4, group_size=128))
    assert qw.params["scale"].shape == (4, 5)
    assert torch.all(qw.params["scale"][:, 4] > 3 * qw.params["scale"][:, :4].max(dim=1).values)


def test_clip_search_never_worse():
    torch.manual_seed(2)
    w = torch.randn(64, 128) ** 3  # heavy tails: clipping helps
    fmt = IntFormat(bits=3, group_size=64)
    plain = (quantize_rtn(w, fmt).dequantize() - w).pow(2).sum()
    clipped = (quantize_rtn(w, fmt, clip_grid=(1.0, 0.9, 0.8, 0.7)).dequantize() - w).pow(2).sum()
    assert clipped < plain


@pytest.mark.parametrize("gs", [0, -2, -128])
def test_bad_group_size(gs):
    with pytest.raises(ConfigError, match="positive number of columns or -1"):
        FormatConfig(group_size=gs)


@pytest.mark.parametrize("bits", [0, 1, 9, 17])
def test_bad_bits(bits):
    with pytest.raises(ConfigError):
        FormatConfig(bits=bits).make()
