import json

import pytest
import torch

import lowbit
from lowbit.config import FormatConfig
from lowbit.errors import CheckpointError, UnsupportedModelError
from lowbit.models.arch import arch_for
from lowbit.nn import QuantizedEmbedding, QuantizedLinear
from lowbit.nn.bpw import bpw_report, layer_bits
from lowbit.quantize import QuantRecipe

from conftest import tiny_model, tiny_tokenizer


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids():
    return torch.tensor([[1, 5, 9, 33, 100, 7, 250, 3, 44, 45, 46, 12]])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_swaps_every_block_linear(arch, bits):
    m = tiny_model(arch)
    ref = _logits(m, _ids())
    lowbit.quantize(m, QuantRecipe(fmt=FormatConfig(bits=bits, group_size=32)), progress=False)
    a = arch_for(m)
    for block in m.get_submodule(a.blocks):
        for name in a.linears:
            assert isinstance(block.get_submodule(name), QuantizedLinear)
    out = _logits(m, _ids())
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    # more bits, closer logits; 8-bit is nearly exact
    assert rel < {2: 1.0, 3: 0.6, 4: 0.3, 8: 0.02}[bits]


def test_save_load_identical_logits(arch, tmp_path):
    m = tiny_model(arch)
    recipe = QuantRecipe(fmt=FormatConfig(bits=3, group_size=24), head=FormatConfig(bits=8, group_size=-1),
                         embed=FormatConfig(bits=4, group_size=32))
    lowbit.quantize(m, recipe, progress=False)
    before = _logits(m, _ids())
    lowbit.save(m, tmp_path / "ckpt", tiny_tokenizer())
    m2 = lowbit.load(tmp_path / "ckpt")
    assert isinstance(m2.get_input_embeddings(), QuantizedEmbedding)
    assert isinstance(m2.get_output_embeddings(), QuantizedLinear)
    assert torch.equal(before, _logits(m2, _ids()))
    # generate works on the reloaded model
    out = m2.generate(input_ids=_ids(), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == _ids().shape[1] + 3


def test_save_load_tied_untouched_head(tmp_path):
    m = tiny_model("llama")  # ties head and embedding
    lowbit.quantize(m, QuantRecipe(fmt=FormatConfig(bits=4, group_size=32)), progress=False)
    before = _logits(m, _ids())
    lowbit.save(m, tmp_path / "c")
    m2 = lowbit.load(tmp_path / "c")
    assert m2.get_output_embeddings().weight is m2.get_input_embeddings().weight
    assert torch.equal(before, _logits(m2, _ids()))


def test_bpw_by_hand():
    """A 16x100 layer, int3 asym, groups of 32 -> 4 groups (32, 32, 32, 4)."""
    from lowbit.formats import IntFormat, quantize_rtn
    from lowbit.nn import to_module

    lin = torch.nn.Linear(100, 16, bias=True)
    q = to_module(lin, quantize_rtn(lin.weight, IntFormat(bits=3, group_size=32)))
    rep = layer_bits(q, "float16")
    codes = 16 * 100 * 3          # 4800 bits = 600 bytes exactly
    scales = 16 * 4 * 16          # fp16 scale per group
    zeros = 16 * 4 * 3            # 3-bit zero per group = 192 bits = 24 bytes
    bias = 16 * 16
    assert rep["items"] == {"codes": codes, "scale": scales, "zero": zeros, "bias": bias}
    assert rep["bpw"] == pytest.approx((codes + scales + zeros + bias) / 1600)


def test_bpw_report_blocks_and_all_in():
    m = tiny_model("llama")
    n = sum(p.numel() for p in m.parameters())
    lowbit.quantize(m, QuantRecipe(fmt=FormatConfig(bits=4, group_size=32, sym=True)), progress=False)
    rep = bpw_report(m, "float16")
    # 64-wide inputs: 2 groups of 32 -> 4 + 16/32; 96-wide (down_proj): 3 groups -> same
    assert rep["blocks"] == pytest.approx(4.5)
    assert rep["n_params"] == n
    assert rep["blocks"] < rep["all_in"] < 16
    # itemised: every block buffer counted once, the items sum to the blocks total
    assert set(rep["blocks_items"]) == {"codes", "scale"}
    assert sum(rep["blocks_items"].values()) == rep["blocks_bits"]
    assert rep["blocks_items"]["codes"] == 4 * rep["blocks_weights"]


def test_codec_bits_match_stored_buffers():
    """Bits from a codec's buffer shapes alone equal the bits a quantized layer stores."""
    from lowbit.formats import quantize_rtn
    from lowbit.nn.bpw import codec_bits, item_kind
    from lowbit.nn.qlinear import scalar_spec
    from lowbit.nn import to_module

    lin = torch.nn.Linear(100, 24, bias=False)
    for fc in (FormatConfig(bits=3, group_size=32), FormatConfig(format="fp", bits=4, group_size=64, sym=False),
               FormatConfig(format="nf", bits=3, group_size=-1, sym=True)):
        fmt = fc.make()
        q = to_module(lin, quantize_rtn(lin.weight, fmt))
        assert codec_bits("scalar", scalar_spec(fmt, 24, 100)) == layer_bits(q, "float16")["items"]
    assert [item_kind(n) for n in ("codes", "scale_neg", "zero", "col_bias", "bias")] == \
        ["codes", "scales", "scales", "norms", "other"]


def test_unknown_architecture():
    class Fake(torch.nn.Module):
        class config:
            model_type = "mamba"

    with pytest.raises(UnsupportedModelError, match="no adapter for model_type 'mamba'"):
        arch_for(Fake())


def _saved(tmp_path):
    m = tiny_model("llama")
    lowbit.quantize(m, QuantRecipe(fmt=FormatConfig(bits=4, group_size=32)), progress=False)
    return lowbit.save(m, tmp_path / "ckpt", tiny_tokenizer())


def test_truncated_safetensors(tmp_path):
    d = _saved(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        lowbit.load(d)


def test_garbage_safetensors(tmp_path):
    d = _saved(tmp_path)
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        lowbit.load(d)


def test_json_does_not_match_tensors(tmp_path):
    d = _saved(tmp_path)
    meta = json.loads((d / "lowbit.json").read_text())
    name = next(iter(meta["modules"]))
    meta["modules"][name]["spec"]["format"]["bits"] = 3
    (d / "lowbit.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match the tensors"):
        lowbit.load(d)


def test_missing_files(tmp_path):
    d = _saved(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        lowbit.load(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        lowbit.load(tmp_path / "nope")
    (d / "lowbit.json").unlink()
    with pytest.raises(CheckpointError, match="lowbit.json is missing"):
        lowbit.load(d)


def test_save_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves neither a partial checkpoint nor temp folders."""
    import lowbit.io.checkpoint as ck

    m = tiny_model("llama")
    lowbit.quantize(m, QuantRecipe(), progress=False)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        lowbit.save(m, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_quantizing_a_checkpoint_again_is_a_clear_error(tmp_path):
    from lowbit.errors import ConfigError

    m = lowbit.load(_saved(tmp_path))
    with pytest.raises(ConfigError, match="already quantized .*lowbit info CKPT"):
        lowbit.quantize(m, QuantRecipe(fmt=FormatConfig(bits=2, group_size=32)), progress=False)


@pytest.mark.parametrize("head", [None, "int4-g32"])
def test_decode_bench_checkpoint_head(tmp_path, head):
    """bench-decode's ckpt= rows RTN-quantize a float head on request, leaving the blocks as saved."""
    from lowbit.bench.decode import _checkpoint_model

    m = tiny_model("llama")
    lowbit.quantize(m, QuantRecipe(fmt=FormatConfig(bits=4, group_size=32)), progress=False)
    d = lowbit.save(m, tmp_path / "ckpt", tiny_tokenizer(), source_model="tiny-llama")
    assert _checkpoint_model(str(d), "other-model", head) == (None, None)
    got, added = _checkpoint_model(str(d), "tiny-llama", head)
    blocks = arch_for(got).blocks
    assert torch.equal(got.get_submodule(blocks)[0].mlp.down_proj.dequantize_weight(),
                       m.get_submodule(blocks)[0].mlp.down_proj.dequantize_weight())
    if head is None:
        assert added is None and isinstance(got.lm_head, torch.nn.Linear)
    else:
        assert added == "int4-g32" and isinstance(got.lm_head, QuantizedLinear)
        again, added2 = _checkpoint_model(str(d), "tiny-llama", head)  # same head every time
        assert added2 == added and torch.equal(again.lm_head.dequantize_weight(), got.lm_head.dequantize_weight())
