"""The library int8 GEMM: every backend exact, the per-shape choice, fallbacks; fused activation codes."""
import logging

import pytest
import torch

from lowbit.kernels import intmm
from lowbit.kernels.intmm import available_backends, dispatcher, int_mm, int_mm_backend, int_mm_reference
from lowbit.nn.w8a8 import act_codes, quantize_activations

SHAPES = [(1, 576, 1536), (1, 40, 5), (7, 40, 5), (33, 96, 19), (17, 1031, 8), (64, 33, 1), (3, 1, 2)]


@pytest.fixture(autouse=True)
def fresh_dispatch():
    dispatcher.clear()
    yield
    dispatcher.clear()


def _codes(m, k, n, seed=0, full=False):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128 if full else -127, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    return a, b, (a.long() @ b.long().T).int()


def test_both_fast_backends_here():
    # the project machine has a compiler and a torch with _int_mm; elsewhere the others take over
    assert available_backends("cpu") == ("torch", "lowbit", "reference")


@pytest.mark.parametrize("mode", ["auto", "torch", "lowbit", "reference"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int_mm_exact_every_path(monkeypatch, mode, m, k, n):
    monkeypatch.setenv("LOWBIT_INTMM", mode)
    a, b, ref = _codes(m, k, n)
    assert mode == "auto" or int_mm_backend(a, b) == mode
    assert torch.equal(int_mm(a, b), ref)
    if mode in ("torch", "reference"):           # these take the full int8 range, -128 included
        a, b, ref = _codes(m, k, n, seed=1, full=True)
        assert torch.equal(int_mm(a, b), ref)


def test_int_mm_reference_extremes():
    for k in (1, 1023, 1025, 1031, 4096):         # around the float32 exactness bound K * 128 * 128 < 2**24
        a = torch.full((2, k), -128, dtype=torch.int8)
        b = torch.full((3, k), -128, dtype=torch.int8)
        assert torch.equal(int_mm_reference(a, b), torch.full((2, 3), 16384 * k, dtype=torch.int32))


def test_auto_measures_once_per_bucket(monkeypatch):
    monkeypatch.setenv("LOWBIT_INTMM", "auto")
    calls = []
    real = dispatcher._measure
    monkeypatch.setattr(dispatcher, "_measure", lambda key, backends: calls.append(key) or real(key, backends))
    for m in (5, 6, 8, 5, 1, 1, 2000, 1024):
        a, b, ref = _codes(m, 64, 24)
        assert torch.equal(int_mm(a, b), ref)
    nt = torch.get_num_threads()
    assert calls == [("cpu", nt, 8, 64, 24), ("cpu", nt, 1, 64, 24), ("cpu", nt, intmm.MAX_TIMED_M, 64, 24)]
    best, times = dispatcher.decisions[("cpu", nt, 8, 64, 24)]
    assert set(times) == {"torch", "lowbit"} and best == min(times, key=times.get)


def test_bad_mode_is_refused(monkeypatch):
    monkeypatch.setenv("LOWBIT_INTMM", "fast")
    with pytest.raises(ValueError, match="LOWBIT_INTMM"):
        int_mm(*_codes(2, 32, 4)[:2])


def test_zero_keeps_the_cpp_kernel_off(monkeypatch):
    monkeypatch.setenv("LOWBIT_INTMM", "0")
    assert intmm.load_intmm() is None and available_backends("cpu") == ("torch", "reference")
    a, b, ref = _codes(1, 64, 8)
    assert int_mm_backend(a, b) == "torch" and torch.equal(int_mm(a, b), ref)


def _broken_int_mm(a, b):
    raise RuntimeError("_int_mm: not implemented for this CPU")


def test_missing_torch_backend_falls_back_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(torch, "_int_mm", _broken_int_mm)
    monkeypatch.setenv("LOWBIT_INTMM", "torch")
    with caplog.at_level(logging.WARNING, logger="lowbit.kernels.intmm"):
        for m in (1, 40):
            a, b, ref = _codes(m, 64, 8)
            assert int_mm_backend(a, b) == "lowbit" and torch.equal(int_mm(a, b), ref)
    lines = [r.getMessage() for r in caplog.records if "'torch' unavailable" in r.getMessage()]
    assert lines == ["int8 GEMM backend 'torch' unavailable on cpu; using 'lowbit'"]


def test_missing_both_backends_falls_back_to_reference(monkeypatch, caplog):
    monkeypatch.delattr(torch, "_int_mm")
    monkeypatch.setattr(intmm, "load_intmm", lambda: None)
    monkeypatch.setenv("LOWBIT_INTMM", "lowbit")
    with caplog.at_level(logging.WARNING, logger="lowbit.kernels.intmm"):
        a, b, ref = _codes(9, 50, 7)
        assert int_mm_backend(a, b) == "reference" and torch.equal(int_mm(a, b), ref)
        int_mm(a, b)
    msgs = sorted(r.getMessage() for r in caplog.records)
    assert msgs == ["int8 GEMM backend 'lowbit' unavailable on cpu; using 'reference'",
                    "int8 GEMM backend 'torch' unavailable on cpu; using 'reference'"]


def _plain_codes(x, bits, scale, idx, inv_k):
    """The plain-torch expression the module used before: gather, multiply, scale, round, clamp."""
    xf = x if idx is None else x[:, idx] * inv_k
    q = (1 << (bits - 1)) - 1
    s = (xf.abs().amax(-1, keepdim=True) / q).clamp_min(1e-8) if scale is None else scale
    return act_codes(xf, s, bits), s


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("flatten", [None, "pad", "flatten"])
def test_fused_activation_codes_equal_plain_torch(bits, dynamic, flatten):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 40, generator=g) * torch.linspace(0.1, 30.0, 40)   # a few wide channels
    x[5] = 0.0                                                                  # an all-zero token: scale floor
    idx = inv_k = None
    if flatten == "pad":                                                        # K 40 -> 64, padding reads 0
        idx = torch.cat([torch.arange(40), torch.zeros(24, dtype=torch.long)])
        inv_k = torch.cat([torch.ones(40), torch.zeros(24)])
    elif flatten == "flatten":                                                  # channel c split k_c times
        kc = torch.randint(1, 4, (40,), generator=g)
        idx = torch.repeat_interleave(torch.arange(40), kc)
        inv_k = 1.0 / kc[idx].float()
    q = (1 << (bits - 1)) - 1
    scale = None if dynamic else torch.tensor([float(x.abs().max()) / q / 3], dtype=torch.float16).float()
    ref, s_ref = _plain_codes(x, bits, scale, idx, inv_k)
    x0 = x.clone()
    codes, s = quantize_activations(x, bits, scale, idx, inv_k)
    assert codes.dtype == torch.int8 and torch.equal(codes, ref.to(torch.int8)) and torch.equal(s, s_ref)
    assert torch.equal(x, x0)                                                   # the input is never written
    fcodes, _ = quantize_activations(x, bits, scale, idx, inv_k, dtype=torch.float32)
    assert torch.equal(fcodes, ref)
