"""The lean decode loop computes the model's own forward pass (float and quantized, every supported arch)."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from lowbit.api import quantize
from lowbit.errors import UnsupportedModelError
from lowbit.quantize import QuantRecipe
from lowbit.runtime import LeanDecoder, lean_supported


def _model(arch: str):
    cfg = tiny_config(arch)
    if arch == "gemma3":  # one sliding and one full-attention layer, window 32 < sequence
        cfg.layer_types = ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in m.parameters():  # non-trivial norms and biases too
            p.normal_(0, 0.08) if p.dim() == 2 else p.normal_(0.0 if arch == "gemma3" else 1.0, 0.1)
    return m


def _lean_logits(dec: LeanDecoder, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    dec.reset()
    rows = [dec.forward(ids[:prefill])]
    rows += [dec.forward(ids[i:i + 1]) for i in range(prefill, ids.numel())]
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("quant", [None, "int4-g32", "fp3-g32"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-ops", "torch-ops"])
def test_lean_matches_model_forward(arch, quant, fused):
    m = _model(arch)
    if quant:
        from lowbit.config import parse_format_tag

        fmt = parse_format_tag(quant, default_group=32)
        quantize(m, QuantRecipe(method="rtn", fmt=fmt, head=fmt), progress=False)
    ids = torch.randint(3, 320, (60,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(ids.unsqueeze(0)).logits[0, 19:]
    dec = LeanDecoder(m, max_len=64)
    from lowbit.kernels import load_kernels

    if fused and not load_kernels():
        pytest.skip("the CPU kernels are not built")
    assert dec.fused_ops == load_kernels()
    dec.fused_ops = fused
    if quant:

        want = "kernel" if load_kernels() else "separate"
        assert dec.layers[0].qkv.kind == want and dec.layers[0].gate_up.kind == want
    got = _lean_logits(dec, ids, prefill=20)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_sliding_window_matters():
    """The gemma3 case above checks a window that cuts in: without it the logits differ."""
    m = _model("gemma3")
    ids = torch.randint(3, 320, (60,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(ids.unsqueeze(0)).logits[0, 19:]
    dec = LeanDecoder(m, max_len=64)
    dec.layers[0].window = None
    assert (_lean_logits(dec, ids, prefill=20) - ref).abs().max() > 1e-2


def test_generate_greedy_equals_hf_generate():
    m = tiny_model("llama")
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    with torch.inference_mode():
        ref = m.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                         eos_token_id=None, top_p=None, top_k=None, temperature=None)
    out = LeanDecoder(m, max_len=32).generate(ids, 12)
    assert torch.equal(out, ref)


def test_generate_stops_at_eos_and_checks_cache():
    m = tiny_model("llama")
    dec = LeanDecoder(m, max_len=16)
    ids = torch.tensor([[1, 40, 50]])
    first = int(dec.generate(ids, 1)[0, -1])
    out = dec.generate(ids, 10, eos_token_id=first)
    assert out.shape[1] == 4 and int(out[0, -1]) == first
    with pytest.raises(ValueError, match="max_len"):
        dec.generate(ids, 20)


def test_unsupported_model_is_refused():
    m = tiny_model("opt")
    assert "lean_decode" in lean_supported(m)
    with pytest.raises(UnsupportedModelError):
        LeanDecoder(m)
