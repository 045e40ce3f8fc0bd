"""Weight+activation quantization: flattening, integer GEMM, SmoothQuant folding, checkpoints."""
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import lowbit
from lowbit.calib.engine import capture_inputs, collect_stats, run_block
from lowbit.config import FormatConfig
from lowbit.formats import IntFormat, quantize_rtn
from lowbit.kernels.intmm import (
    act_quant,
    act_quant_reference,
    epilogue_kernels,
    int_mm,
    int_mm_reference,
    load_intmm,
    rescale,
    rescale_reference,
)
from lowbit.methods.flattenquant import _plan, act_quant_error, choose_threshold, flatten_map
from lowbit.calib.fold import smooth_block
from lowbit.models.arch import arch_for
from lowbit.nn.bpw import stored_bits
from lowbit.nn.w8a8 import (
    QuantizedActLinear,
    act_linear_summary,
    act_spec,
    from_quantized_weight,
    pack_int4,
    quantize_activations,
    unpack_int4,
)
from lowbit.quantize import QuantRecipe

CPU = torch.device("cpu")
W8 = FormatConfig(bits=8, group_size=-1, sym=True)


def _outlier_acts(n=512, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, [3, 17, 30]] *= torch.tensor([60.0, 25.0, 12.0])   # a few outlier channels, as in LLM activations
    w = torch.randn(48, k, generator=g) * 0.1
    return x, w


def _calib(n=8, seqlen=32, seed=0):
    return torch.randint(3, 320, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_flattening_is_exact_in_float():
    x, w = _outlier_acts()
    idx, k = flatten_map(x.abs().amax(0), threshold=4.0)
    assert idx.numel() > x.shape[1] and (x[:, idx] / k).abs().max() <= 4.0 + 1e-6
    y = (x[:, idx] / k) @ w[:, idx].T
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-4)


def test_flattening_lowers_per_tensor_quant_error():
    x, w = _outlier_acts()
    m = x.abs().amax(0)
    for bits in (8, 4):
        plain = _plan(m, float(m.max()), bits)                 # T = max: no channel split
        base = act_quant_error(x, w, plain, bits)
        flat = choose_threshold(m, x, w, bits)                  # default cap: at most +50% channels
        assert flat.idx.numel() > x.shape[1] and act_quant_error(x, w, flat, bits) < 0.8 * base
        wide = choose_threshold(m, x, w, bits, max_expand=2.0)
        assert act_quant_error(x, w, wide, bits) < 0.5 * base


def test_int4_pack_roundtrip():
    q = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)


@pytest.mark.parametrize("m,k,n", [(7, 40, 5), (33, 96, 19)])
def test_int_mm_exact(m, k, n):
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    ref = (a.long() @ b.long().T).int()
    assert torch.equal(int_mm(a, b), ref)
    assert torch.equal(int_mm_reference(a, b), ref)


def _act_linear(w_bits, a_bits, dynamic, flatten, k=40, seed=0):
    x, _ = _outlier_acts(64, k, seed)
    w = torch.randn(24, k, generator=torch.Generator().manual_seed(seed)) * 0.1
    m = x.abs().amax(0)
    plan = _plan(m, float(torch.quantile(m, 0.9)) if flatten else float(m.max()), a_bits)
    wf = w[:, plan.idx] if flatten else w
    qw = quantize_rtn(wf, IntFormat(w_bits, -1, sym=True))
    spec = act_spec(k, 24, w_bits, a_bits, dynamic, plan.idx.numel() if flatten else None)
    mod = from_quantized_weight(qw, spec, None if dynamic else plan.act_scale,
                                plan.idx if flatten else None, plan.k if flatten else None)
    return mod, x, w


@pytest.mark.parametrize("w_bits,a_bits,dynamic,flatten",
                         [(8, 8, False, True), (8, 8, True, False), (4, 4, False, True), (4, 8, False, False)])
def test_integer_path_equals_fake_quant(w_bits, a_bits, dynamic, flatten):
    mod, x, w = _act_linear(w_bits, a_bits, dynamic, flatten)
    # the int32 accumulation is exact: bitwise equal to the codes' product in float64
    acc, s = mod.int_accumulate(x)
    qa, s2 = mod.quantize_input(x)
    assert torch.equal(acc, (qa.double() @ mod.int_weight().double().T).to(torch.int32))
    assert torch.equal(s, s2)
    # float outputs differ only by float32 rounding (fake: matmul of dequantized values; int: one rescale)
    y_int = mod(x)
    mod.mode = "fake"
    y_fake = mod(x)
    err = (y_int - y_fake).abs().max() / y_fake.abs().max()
    assert err < 1e-5
    # and the quantized layer still approximates the float one
    ref = x @ w.T
    assert ((y_int - ref).pow(2).sum() / ref.pow(2).sum()) < (0.05 if a_bits == 8 else 0.5)


def test_smoothquant_folding_keeps_float_output(arch):
    m = tiny_model(arch)
    spec = arch_for(m)
    with torch.no_grad():  # Gemma's (1 + w) norms: give them non-trivial weights so the offset matters
        for name, p in m.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    inputs, kwargs = capture_inputs(m, spec, _calib(4), batch_size=2, offload=CPU)
    block = m.get_submodule(spec.blocks)[0]
    stats = collect_stats(block, spec.groups, inputs, kwargs[0], frozenset({"act_absmax"}), CPU, CPU)
    ref = torch.cat(run_block(block, inputs, kwargs[0], CPU, CPU))
    before = {n: p.clone() for n, p in block.named_parameters()}
    smooth_block(block, spec, stats, alpha=0.5)
    changed = {n for n, p in block.named_parameters() if not torch.equal(before[n], p)}
    assert changed
    # scales went into the norms the row names; a post-norm block's norms also feed the residual and take none
    assert any("norm" in n for n in changed) == any(g.prev and g.prev_kind == "norm" for g in spec.groups)
    out = torch.cat(run_block(block, inputs, kwargs[0], CPU, CPU))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,cfg", [
    ("w8a8", {}),                                                           # data-free, dynamic activations
    ("w8a8", {"int8_head": True}),                                          # + the tied head W8A8
    ("smoothquant", {}),
    ("flattenquant", {"fq_weight_method": "rtn", "fq_search_tokens": 256}),
    ("flattenquant", {"fq_int4_budget": 1.0, "fq_search_tokens": 256}),   # every layer passes: all W4A4
])
def test_save_load_identical_logits(tmp_path, method, cfg):
    m = tiny_model("llama")
    ids = _calib(2, 32, seed=5)
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    lowbit.quantize(m, QuantRecipe(method=method, fmt=W8, method_config=cfg), calib_ids=_calib(8), progress=False)
    assert all(isinstance(m.model.layers[0].get_submodule(n), QuantizedActLinear) for n in arch_for(m).linears)
    if cfg.get("fq_int4_budget"):
        assert act_linear_summary(m)["int4_share"] == 1.0
    with torch.no_grad():
        out = m(input_ids=ids).logits
    assert ((out - ref).pow(2).mean() / ref.pow(2).mean()) < 0.5
    lowbit.save(m, tmp_path / "ck")
    m2 = lowbit.load(tmp_path / "ck")
    assert isinstance(m2.model.layers[1].mlp.down_proj, QuantizedActLinear)
    sd, sd2 = m.state_dict(), m2.state_dict()   # every tensor back with its dtype and bits (fp16 scales stay fp16)
    assert sd.keys() == sd2.keys() and all(sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(m2(input_ids=ids).logits, out)


def test_w8a8_dynamic_is_data_free_and_close():
    m = tiny_model("llama")
    ids = _calib(2, 32, seed=5)
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    lowbit.quantize(m, QuantRecipe(method="w8a8", fmt=W8), progress=False)
    with torch.no_grad():
        out = m(input_ids=ids).logits
    assert ((out - ref).pow(2).mean() / ref.pow(2).mean()) < 0.01


def test_act_methods_reject_grouped_formats():
    from lowbit.errors import ConfigError

    with pytest.raises(ConfigError, match="per output"):
        lowbit.quantize(tiny_model("llama"), QuantRecipe(method="w8a8", fmt=FormatConfig(bits=8, group_size=32)),
                        progress=False)


def test_cpp_kernel_built():
    assert load_intmm() is not None  # the machine has a compiler; elsewhere the float reference takes over


@pytest.mark.parametrize("w_bits", [8, 4])
def test_module_keeps_no_float_weight(w_bits):
    mod, x, _ = _act_linear(w_bits, 8, False, True)
    y = mod(x)
    assert torch.equal(mod(x), y)
    op = mod.int_weight()
    assert op.dtype == torch.int8 and op.is_contiguous() and op is mod.int_weight()   # made once, reused
    if w_bits == 8:
        assert op.data_ptr() == mod.qweight.data_ptr()                                 # the buffer itself
    held = [t for t in list(mod.buffers()) + [v for v in vars(mod).values() if isinstance(v, torch.Tensor)]]
    big = [t for t in held if t.is_floating_point() and t.numel() >= mod.out_features * mod.in_features]
    assert not big and mod._wcache is None
    # new buffers drop what was derived from the old ones
    mod.set_packed({"qweight": mod.qweight.clone()})
    assert mod._w8 is None and mod._gather is None


@pytest.mark.parametrize("m,k,kp", [(1024, 576, 576), (7, 100, 128), (1, 640, 640), (33, 17, 32)])
def test_act_quant_matches_reference(m, k, kp):
    g = torch.Generator().manual_seed(m + k)
    x = torch.randn(m, k, generator=g) * 3
    x[0] = 0                                         # a zero row: the scale's 1e-8 floor
    x[-1, :5] = torch.tensor([0.5, 1.5, -2.5, 127.0, -127.0]) * (x[-1].abs().max() / 127)   # ties to even
    for scale in (None, torch.tensor([0.05])):
        q, s = act_quant(x, kp, 8, scale)
        q_ref, s_ref = act_quant_reference(x, kp, 8, scale)
        assert q.dtype == torch.int8 and q.shape == (m, kp) and torch.equal(q, q_ref) and torch.equal(s, s_ref)
    # with the flattening gather (padding columns read channel 0 times 0)
    idx = torch.cat([torch.randint(0, k, (kp - 3,), generator=g), torch.zeros(3, dtype=torch.long)])
    inv_k = torch.cat([1.0 / torch.randint(1, 4, (kp - 3,), generator=g).float(), torch.zeros(3)])
    for scale in (None, torch.tensor([0.05])):
        q, s = act_quant(x, kp, 8, scale, idx, inv_k)
        q_ref, s_ref = act_quant_reference(x, kp, 8, scale, idx, inv_k)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref) and not q[:, -3:].any()
        q_mod, s_mod = quantize_activations(x, 8, scale, idx, inv_k)
        assert torch.equal(q, q_mod) and torch.equal(s, s_mod)               # the fake path's codes, bit for bit
    # and the reference is the module doc's formula
    q_ref, s_ref = act_quant_reference(x, kp, 8)
    assert torch.equal(q_ref[:, :k].float(), torch.round(x / s_ref).clamp(-127, 127)) and not q_ref[:, k:].any()


@pytest.mark.parametrize("n", [576, 19])
def test_rescale_matches_reference(n):
    g = torch.Generator().manual_seed(n)
    acc = torch.randint(-2 ** 20, 2 ** 20, (37, n), dtype=torch.int32, generator=g)
    ws, bias = torch.rand(n, generator=g), torch.randn(n, generator=g)
    for s in (torch.rand(37, 1, generator=g), torch.tensor([0.03])):
        for b in (None, bias):
            ref = rescale_reference(acc, s, ws, b)
            assert torch.equal(rescale(acc.clone(), s, ws, b), ref)     # same products, same order: bit for bit
            out = torch.full((37, n + 5), float("nan"))
            rescale(acc, s, ws, b, out=out[:, 2:n + 2])                   # into a column block of a wider output
            assert torch.equal(out[:, 2:n + 2], ref) and out[:, :2].isnan().all() and out[:, n + 2:].isnan().all()


def test_int_linear_column_blocks(monkeypatch):
    import lowbit.kernels.intmm as im

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (9, 64), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (50, 64), dtype=torch.int8, generator=g)
    s, ws, bias = torch.rand(9, 1, generator=g), torch.rand(50, generator=g), torch.randn(50, generator=g)
    ref = rescale_reference(int_mm_reference(a, b), s, ws, bias)
    assert torch.equal(im.int_linear(a, b, s, ws, bias), ref)
    monkeypatch.setattr(im, "N_BLOCK", 16)                        # 50 columns: blocks of 16, 16, 16 and 2
    assert torch.equal(im.int_linear(a, b, s, ws, bias), ref)


def test_onednn_path_is_exact(monkeypatch):
    import lowbit.kernels.intmm as im

    if not im.onednn_works():
        pytest.skip("no oneDNN quantized linear in this torch build")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (40, 1536), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (24, 1536), dtype=torch.int8, generator=g)
    a[:3], b[:2] = 127, -128                                     # products past 2**24: the float conversion rounds
    assert torch.equal(im.onednn_linear_mm(a, im.onednn_prepack(b, 40), 24), int_mm_reference(a, b).float())
    s, ws, bias = torch.rand(40, 1, generator=g), torch.rand(24, generator=g), torch.randn(24, generator=g)
    ref = rescale_reference(int_mm_reference(a, b), s, ws, bias)
    monkeypatch.setenv("LOWBIT_INTMM", "auto")
    assert im.dispatcher.choose_linear(40, 1536, 24) in ("onednn", "int_mm")     # measured (int_mm inside: no deadlock)
    assert (torch.get_num_threads(), 64, 1536, 24) in im.dispatcher.linear_decisions
    monkeypatch.setattr(im.dispatcher, "choose_linear", lambda *args: "onednn")
    assert torch.equal(im.int_linear(a, b, s, ws, bias, packed=lambda: im.onednn_prepack(b, 40)), ref)
    # a module takes whichever path its shape measured faster, with the same output
    mod, x, _ = _act_linear(8, 8, True, False)
    y = mod(x)
    monkeypatch.setattr(im.dispatcher, "choose_linear", lambda *args: "int_mm")
    assert torch.equal(mod(x), y)


def test_epilogue_kernels_used_where_avx512():
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    if " avx512bw" in flags and " avx512vl" in flags and load_intmm() is not None:
        assert epilogue_kernels() is not None


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_int8_head_equals_integer_reference(arch):
    m = tiny_model(arch)
    spec = arch_for(m)
    emb_w = m.get_input_embeddings().weight.detach().clone()
    ids = _calib(2, 16, seed=3)
    lowbit.quantize(m, QuantRecipe(method="w8a8", fmt=W8, method_config={"int8_head": True}), progress=False)
    head = m.get_submodule(spec.head)
    assert isinstance(head, QuantizedActLinear) and head.spec["w_bits"] == head.spec["a_bits"] == 8
    assert head.spec["dynamic"] and not m.config.get_text_config().tie_word_embeddings
    emb = m.get_input_embeddings()
    assert emb.weight.is_floating_point() and torch.equal(emb.weight, emb_w.half().float())   # the lookup stays float
    # the head's output is the exact integer product of its codes, rescaled by the plain-torch reference
    h = torch.randn(2, 16, head.in_features, generator=torch.Generator().manual_seed(1))
    qa, s = act_quant_reference(h.reshape(-1, head.in_features), head.int_weight().shape[1], 8)
    acc = int_mm_reference(qa, head.int_weight())
    ref = rescale_reference(acc, s, head.w_scale.float()).reshape(2, 16, -1)
    with torch.no_grad():
        assert torch.equal(head(h), ref)
        assert torch.isfinite(m(input_ids=ids).logits).all()
    # the head's int8 copy is counted: stored bits grow by 8 per head weight over the float-head recipe
    m0 = tiny_model(arch)
    lowbit.quantize(m0, QuantRecipe(method="w8a8", fmt=W8), progress=False)
    extra = stored_bits(m, "float16") - stored_bits(m0, "float16")
    out_f, in_f = head.out_features, head.in_features
    assert extra == out_f * head.int_weight().shape[1] * 8 + out_f * 16


def test_int8_head_refuses_a_head_format_too():
    from lowbit.errors import ConfigError

    with pytest.raises(ConfigError, match="int8_head"):
        lowbit.quantize(tiny_model("llama"), QuantRecipe(method="w8a8", fmt=W8, method_config={"int8_head": True},
                                                         head=FormatConfig(bits=8)), progress=False)
