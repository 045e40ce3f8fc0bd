"""GGUF export: lowbit's codes and scales land on llama.cpp's block grids unchanged.

Block packing is checked against gguf-py's own dequantizers; a whole tiny model is exported, read back with
``gguf.GGUFReader`` and every tensor compared with lowbit's weight. With llama-cpp-python installed, llama.cpp
itself runs the exported tiny model and its logits are compared with lowbit's.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lowbit
from lowbit.config import FormatConfig, parse_format_tag
from lowbit.errors import ConfigError
from lowbit.formats import IntFormat, KQuantFormat, QuantizedWeight
from lowbit.formats.kquant import KTYPES
from lowbit.io.checkpoint import load_checkpoint, read_meta
from lowbit.models.arch import arch_for

from conftest import TINY_TEXT, tiny_model, tiny_tokenizer

gguf = pytest.importorskip("gguf")
from lowbit.export.gguf import (  # noqa: E402
    block_params, export, pack_blocks, qk_permutation, read_tokenizer, tokenizer_metadata,
)
from lowbit.export.gguf_kquants import KBLOCK_BYTES, pack_kblocks  # noqa: E402
from lowbit.quantize import QuantRecipe  # noqa: E402

FORMATS = {  # ggml type: (bits, sym)
    "Q4_0": (4, True), "Q4_1": (4, False), "Q5_0": (5, True), "Q5_1": (5, False), "Q8_0": (8, True),
}


def _random_qw(bits: int, sym: bool, group_size: int, rows: int = 5, cols: int = 128, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    fmt = IntFormat(bits=bits, group_size=group_size, sym=sym)
    n_groups = -(-cols // group_size) if group_size != -1 else 1
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g)
    params = {"scale": (torch.rand(rows, n_groups, generator=g) * 0.1 + 1e-3).half().float()}
    if not sym:
        params["zero"] = torch.randint(0, 1 << bits, (rows, n_groups), generator=g).float()
    return QuantizedWeight(fmt, codes, params)


def _dequant(data: np.ndarray, qtype: str, rows: int) -> np.ndarray:
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).reshape(rows, -1)


@pytest.mark.parametrize("qtype", list(FORMATS))
@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_blocks_round_trip_through_gguf_dequantize(qtype, group_size):
    """Packed blocks dequantize (gguf-py) to lowbit's weight: bit for bit for the symmetric types, and for the
    asymmetric ones exactly to ``d*q + fp16(-z*s)``, within half an fp16 ulp of the offset of lowbit's value."""
    bits, sym = FORMATS[qtype]
    qw = _random_qw(bits, sym, group_size)
    codes, scale, zero = block_params(qw.codes, qw.params, qw.fmt)
    packed = pack_blocks(qtype, codes, scale, zero)
    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
    assert packed.shape == (5, 128 // 32 * block_bytes)
    got = _dequant(packed, qtype, 5)
    want = qw.dequantize().numpy()
    if sym:
        np.testing.assert_array_equal(got, want)
        return
    s = scale.repeat_interleave(32, dim=1).numpy().astype(np.float32)
    z = zero.repeat_interleave(32, dim=1).numpy().astype(np.float32)
    m16 = (-z * s).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got, s * codes.numpy().astype(np.float32) + m16)
    assert np.all(np.abs(got - want) <= np.abs(z * s) * 2.0 ** -11 + 1e-7)


@pytest.mark.parametrize("bits", sorted(KTYPES))
def test_kblocks_round_trip_through_gguf_dequantize(bits):
    """K-quant super-blocks with codes, sub-scales and mins over their whole ranges dequantize (gguf-py) to lowbit's
    weight bit for bit."""
    kt = KTYPES[bits]
    fmt = KQuantFormat(bits, kt.sub, kt.sym)
    g = torch.Generator().manual_seed(bits)
    rows, cols = 3, 512
    n_groups, n = cols // kt.sub, fmt.fit_span
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g)
    params = {k: torch.randint(0, 1 << kt.scale_bits, (rows, n_groups), generator=g).float()
              for k in fmt.param_specs() if k.startswith("sub")}
    params["sub_scale"][0, :n] = (1 << kt.scale_bits) - 1    # the top sub-scale
    for k in fmt.param_specs():
        if k.startswith("super"):
            d = (torch.randn(rows, n_groups // n, generator=g) * 1e-3).half().float()
            params[k] = d.repeat_interleave(n, dim=1)
    qw = QuantizedWeight(fmt, codes, params)
    packed = pack_kblocks(fmt, codes, params)
    assert packed.shape == (rows, cols // 256 * KBLOCK_BYTES[kt.ggml])
    assert KBLOCK_BYTES[kt.ggml] == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kt.ggml]][1]
    np.testing.assert_array_equal(_dequant(packed, kt.ggml, rows), qw.dequantize().numpy())


def test_qk_permutation_is_llama_cpp_rotary_layout():
    """Per head, HF's rotary pairs (i, i + d/2) become adjacent rows (2i, 2i + 1)."""
    perm = qk_permutation(8, 2).tolist()  # 2 heads of 4 rows
    assert perm == [0, 2, 1, 3, 4, 6, 5, 7]


def _checkpoint(tmp_path, arch: str, recipe: QuantRecipe, **model_kw):
    m = tiny_model(arch, **model_kw)
    if arch == "gemma3":
        m.config.query_pre_attn_scalar = m.config.head_dim   # llama.cpp scales attention by 1/sqrt(head_dim)
    lowbit.quantize(m, recipe, progress=False)
    path = lowbit.save(m, tmp_path / f"ckpt-{arch}", tiny_tokenizer())
    return path, load_checkpoint(path), read_meta(path)


def _gguf_weights(path) -> dict[str, tuple[str, np.ndarray]]:
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = [int(x) for x in reversed(t.shape)]  # GGUF lists the row width first
        out[t.name] = (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape))
    return out


WIDE = {"hidden": 256, "intermediate": 512}   # every linear whole K-quant super-blocks
MIXED = {"hidden": 256, "intermediate": 96}   # down_proj's rows are 96 wide: the K type's int fallback


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("fmt, embed, expect, widths", [
    (FormatConfig(bits=4, group_size=32, sym=True), None, {"": "Q4_0"}, {}),
    (FormatConfig(bits=4, group_size=64, sym=False), FormatConfig(bits=8, group_size=32, sym=True),
     {"": "Q4_1", "model.embed": "Q8_0"}, {}),
    (FormatConfig(bits=8, group_size=-1, sym=True), None, {"": "Q8_0"}, {}),
    (parse_format_tag("q4_k"), parse_format_tag("q6_k"), {"": "Q4_K", "model.embed": "Q6_K"}, WIDE),
    (parse_format_tag("q2_k"), None, {"": "Q2_K"}, WIDE),
    (parse_format_tag("q3_k"), parse_format_tag("q5_k"), {"": "Q3_K", "model.embed": "Q5_K"}, WIDE),
    (parse_format_tag("q6_k"), None, {"": "Q6_K", "mlp.down_proj": "Q8_0"}, MIXED),
    (parse_format_tag("mxfp4"), parse_format_tag("mxfp4"), {"": "MXFP4"}, {}),
], ids=["q4_0", "q4_1", "q8_0", "q4_k", "q2_k", "q3_k", "q6_k-mixed", "mxfp4"])
def test_tiny_model_round_trips_every_tensor(tmp_path, arch, fmt, embed, expect, widths):
    """Every GGUF tensor dequantizes (gguf-py) to lowbit's weight, q/k permutation undone and norm offset removed:
    bit for bit, but for Q4_1's fp16 offset. ``expect``: the block type by key prefix or part ("" for the rest)."""
    path, model, meta = _checkpoint(tmp_path, arch, QuantRecipe(fmt=fmt, embed=embed), **widths)
    out = export(model, meta, tmp_path / "m.gguf", tokenizer=path)
    got = _gguf_weights(out)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.config.num_hidden_layers)
    offset = arch_for(model).norm_offset
    cfg = model.config
    expected = {}
    for name, mod in model.named_modules():
        w = mod.dequantize_weight() if hasattr(mod, "spec") else getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and name:
            expected[f"{name}.weight"] = (hasattr(mod, "spec"), w.detach().float())
        if isinstance(getattr(mod, "bias", None), torch.Tensor):
            expected[f"{name}.bias"] = (False, mod.bias.detach().float())
    tied = cfg.tie_word_embeddings and embed is None
    seen = set()
    for key, (quantized, want) in expected.items():
        if tied and key == "lm_head.weight":
            continue
        gname = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        qtype, w = got[gname]
        seen.add(gname)
        w = torch.from_numpy(np.array(w)).reshape(want.shape)
        if arch == "llama" and (".q_proj." in key or ".k_proj." in key):
            heads = cfg.num_attention_heads if ".q_proj." in key else cfg.num_key_value_heads
            w = w[torch.argsort(qk_permutation(w.shape[0], heads))]
        if "norm" in key:
            assert qtype == "F32"
            w = w - offset
        if quantized:
            assert qtype == next((t for part, t in expect.items() if part and part in key), expect[""]), key
            if qtype in ("Q4_1", "Q5_1"):
                torch.testing.assert_close(w, want, rtol=0, atol=float(want.abs().max()) * 2.0 ** -10)
                continue
        torch.testing.assert_close(w, want, rtol=0, atol=0)
    assert seen == set(got), f"unexpected tensors {set(got) - seen}"


def test_metadata_and_vocabulary(tmp_path):
    """Architecture keys, the byte-level BPE vocabulary with its merges, and special tokens as llama.cpp reads them."""
    path, model, meta = _checkpoint(tmp_path, "llama", QuantRecipe(fmt=FormatConfig(bits=4, group_size=32, sym=True)))
    out = export(model, meta, tmp_path / "m.gguf", tokenizer=path)
    f = gguf.GGUFReader(out).fields
    assert f["general.architecture"].contents() == "llama"
    assert f["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    assert f["llama.block_count"].contents() == 2
    assert f["llama.attention.head_count_kv"].contents() == 2
    assert f["llama.rope.dimension_count"].contents() == 16
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    assert f["tokenizer.ggml.pre"].contents() == "gpt-2"
    tok = tiny_tokenizer()
    vocab = {i: t for t, i in tok.get_vocab().items()}
    assert f["tokenizer.ggml.tokens"].contents() == [vocab[i] for i in range(320)]
    assert len(f["tokenizer.ggml.merges"].contents()) == len(
        json.loads(tok.backend_tokenizer.to_str())["model"]["merges"])
    assert f["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id
    assert f["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    types = f["tokenizer.ggml.token_type"].contents()
    assert [types[i] for i in tok.all_special_ids] == [gguf.TokenType.CONTROL] * len(tok.all_special_ids)


def test_sentencepiece_style_vocabulary(tmp_path):
    """A byte-fallback BPE writing spaces as '▁' (Gemma's) becomes llama.cpp's 'llama' tokenizer: byte tokens
    typed BYTE, scores falling with the id (the merge order), unused ids padded."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", "a", "b", "\u2581a", "ab"]
    bpe = models.BPE({p: i for i, p in enumerate(pieces)}, [("\u2581", "a"), ("a", "b")], byte_fallback=True,
                     unk_token="<unk>")
    t = Tokenizer(bpe)
    t.normalizer = normalizers.Replace(" ", "\u2581")
    t.add_special_tokens(specials)
    PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(tmp_path / "tok")
    cfg = tiny_model("gemma3").config
    meta = tokenizer_metadata(read_tokenizer(tmp_path / "tok"), cfg, n_vocab=len(pieces) + 3)
    assert (meta["model"], meta["pre"], meta["add_space_prefix"]) == ("llama", "default", False)
    TT = gguf.TokenType
    assert meta["types"][:4] == [TT.CONTROL] * 4
    assert meta["types"][4:260] == [TT.BYTE] * 256
    assert meta["types"][260:265] == [TT.NORMAL] * 5 and meta["types"][265:] == [TT.UNUSED] * 3
    assert meta["tokens"][265] == "[PAD265]"
    normal = meta["scores"][260:265]
    assert normal == sorted(normal, reverse=True) and len(set(normal)) == 5
    assert meta["special"] == {"bos": 2, "eos": 1, "unk": 3, "pad": 0}


def test_unmappable_formats_are_refused_by_name(tmp_path):
    """int3, or groups of 16, have no llama.cpp block type: a ConfigError names each layer; nothing is written."""
    path, model, meta = _checkpoint(tmp_path, "llama", QuantRecipe(fmt=FormatConfig(bits=3, group_size=32)))
    out = tmp_path / "m.gguf"
    with pytest.raises(ConfigError, match=r"(?s)format int3 asym g32 has no .*: model\.layers\.0\.self_attn\.q_proj, .* and 10 more.*int4 sym -> Q4_0"):
        export(model, meta, out, tokenizer=path)
    assert not out.exists()
    path, model, meta = _checkpoint(tmp_path, "qwen2", QuantRecipe(fmt=FormatConfig(bits=4, group_size=16, sym=True)))
    with pytest.raises(ConfigError, match="group size 16 is not a multiple of 32"):
        export(model, meta, out, tokenizer=path)


def test_allow_f16_stores_dequantized_weights(tmp_path):
    path, model, meta = _checkpoint(tmp_path, "llama", QuantRecipe(fmt=FormatConfig(bits=3, group_size=32)))
    out = export(model, meta, tmp_path / "m.gguf", tokenizer=path, allow_f16=True)
    qtype, w = _gguf_weights(out)["blk.0.ffn_down.weight"]
    assert qtype == "F16"
    want = model.model.layers[0].mlp.down_proj.dequantize_weight()
    torch.testing.assert_close(torch.from_numpy(w), want.half().float(), rtol=0, atol=0)


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    """A failure while writing tensors leaves neither a file at ``out`` nor a temporary file beside it."""
    path, model, meta = _checkpoint(tmp_path, "llama", QuantRecipe(fmt=FormatConfig(bits=4, group_size=32, sym=True)))
    out = tmp_path / "out" / "m.gguf"

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(KeyboardInterrupt):
        export(model, meta, out, tokenizer=path)
    assert list(out.parent.iterdir()) == []
    with pytest.raises(ConfigError, match="tokenizer"):
        export(model, meta, out)


def _llama_cpp_logits(monkeypatch, gguf_path, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits ``(len(ids), vocab)`` for ``ids`` from the GGUF file, weights in the blocks the file holds
    (no AMX or repacked copies; AMX tiles also fault on hosts whose kernel does not enable them)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def plain_params():
        p = default_params()
        p.use_extra_bufts = False
        return p

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", plain_params)
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=128, n_batch=128, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    llm.close()
    return got


def _ppl(logits: torch.Tensor, ids: list[int]) -> float:
    return float(torch.exp(torch.nn.functional.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]))))


def _llama_cpp_follows(monkeypatch, gguf_path, model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's and lowbit's logits for ``ids``, after checking that llama.cpp's follow lowbit's: the same argmax
    at 90% of the positions, every logit within 5% of the largest."""
    got = _llama_cpp_logits(monkeypatch, gguf_path, ids)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].float()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * float(want.abs().max()))
    return got, want


def test_llama_cpp_runs_the_export(tmp_path, monkeypatch):
    """llama.cpp loads the exported tiny Llama and its logits follow lowbit's (it quantizes activations to 8 bits
    for the Q4_0 dot products, hence the tolerance)."""
    pytest.importorskip("llama_cpp")
    path, model, meta = _checkpoint(tmp_path, "llama", QuantRecipe(fmt=FormatConfig(bits=4, group_size=32, sym=True)))
    out = export(model, meta, tmp_path / "m.gguf", tokenizer=path)
    ids = list(range(3, 40))
    got, want = _llama_cpp_follows(monkeypatch, out, model, ids)


@pytest.mark.parametrize("method, tag", [("rtn", "q2_k"), ("ksearch", "q3_k"), ("rtn", "q4_k"), ("ksearch", "q4_k"),
                                         ("rtn", "q5_k"), ("rtn", "q6_k"), ("rtn", "mxfp4")])
def test_llama_cpp_runs_kquant_exports(tmp_path, monkeypatch, method, tag):
    """llama.cpp runs the K-quant (and MXFP4) export of a model whose widths are multiples of 256 (embedding and head
    included): its logits follow lowbit's and its perplexity on the same ids is within 0.5% (llama.cpp rounds the
    activations to int8 blocks for the dot products)."""
    pytest.importorskip("llama_cpp")
    fmt = parse_format_tag(tag)
    recipe = QuantRecipe(method=method, fmt=fmt, embed=fmt, head=fmt)
    path, model, meta = _checkpoint(tmp_path, "llama", recipe, std=0.04, **WIDE)   # std: the 64-wide model's gain
    out = export(model, meta, tmp_path / "m.gguf", tokenizer=path)
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors if len(t.shape) == 2} == {tag.upper()}
    ids = tiny_tokenizer()(TINY_TEXT)["input_ids"][:100]
    got, want = _llama_cpp_follows(monkeypatch, out, model, ids)
    assert abs(_ppl(got, ids) / _ppl(want, ids) - 1) < 0.005


def test_llama_cpp_runs_nvfp4_export(tmp_path, monkeypatch):
    """llama.cpp runs the NVFP4 export of the block linears, multiplying in each ``.scale`` tensor: its logits follow
    lowbit's (without the scales they would be off by a factor of about 10^4)."""
    path, model, meta = _checkpoint(tmp_path, "llama", QuantRecipe(fmt=parse_format_tag("nvfp4")), intermediate=128)
    out = export(model, meta, tmp_path / "m.gguf", tokenizer=path)
    ids = tiny_tokenizer()(TINY_TEXT)["input_ids"][:60]
    got, want = _llama_cpp_follows(monkeypatch, out, model, ids)


def test_cli_export_to_gguf(tiny_dir, tmp_path, capsys):
    """`lowbit export --to gguf` goes through the dispatcher: one atomic file, named after the source model."""
    from lowbit.cli import main

    ckpt, out = tmp_path / "ck", tmp_path / "tiny.gguf"
    assert main(["-q", "quantize", str(tiny_dir), "--method", "rtn", "--bits", "4", "--group-size", "32", "--sym",
                 "--out", str(ckpt)]) == 0
    assert main(["-q", "export", str(ckpt), "--to", "gguf", "--out", str(out)]) == 0
    r = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.ffn_down.weight"] == "Q4_0"
    name = r.get_field("general.name")
    assert bytes(name.parts[name.data[0]]).decode() == tiny_dir.name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ck", "tiny.gguf", tiny_dir.name])  # no temp left
    assert main(["-q", "export", str(ckpt), "--to", "gguf", "--out", str(tmp_path / "x.gguf"), "--regroup"]) == 2
    assert "takes no" in capsys.readouterr().err
