"""Shared-scale block formats: OCP MX (MXFP4/6/8, MXINT8) and NVFP4 as lowbit formats.

Element grids round-trip, scales follow the OCP spec (and NVIDIA's NVFP4 recipe) on hand-made blocks, bits per
weight are exact, every weight solver uses them through the quantize API and checkpoints, and MXFP4/NVFP4 export
to GGUF's blocks byte for byte (gguf-py's quantizer and dequantizer are the reference).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lowbit
from lowbit.config import FormatConfig, format_fields, parse_format_tag
from lowbit.errors import ConfigError
from lowbit.formats import make_format, quantize_rtn
from lowbit.formats.mx import BLOCK_FORMATS, ELEMS, E8M0_BIAS, MXFormat, e8m0_value
from lowbit.io.checkpoint import load_checkpoint, read_meta
from lowbit.methods.gptq import gptq_quantize
from lowbit.nn.bpw import bpw_report, codec_bits
from lowbit.nn.codecs import get_codec
from lowbit.quantize import QuantRecipe, recipe_from_options

from conftest import reload_same_logits, tiny_model, tiny_tokenizer

TAGS = list(BLOCK_FORMATS)
MX_TAGS = [t for t in TAGS if t != "nvfp4"]


def _fmt(tag):
    return parse_format_tag(tag).make()


def _block(values, size=32):
    """One block ``(1, 1, size)``: ``values`` then zeros."""
    x = torch.zeros(1, 1, size)
    x[0, 0, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return x


# ------------------------------------------------------------------------------------------------ element grids


def test_element_types():
    """Largest normals and emax as the OCP spec lists them; code counts of the bit patterns."""
    want = {"e2m1": (6.0, 2), "e2m3": (7.5, 2), "e3m2": (28.0, 4), "e4m3": (448.0, 8), "e5m2": (57344.0, 15),
            "int8": (127 / 64, 0)}
    for name, (mx, emax) in want.items():
        e = ELEMS[name]
        assert (e.max_normal, e.emax) == (mx, emax)
        assert len(e.values) == 2 ** e.bits
    assert ELEMS["e2m1"].grid.levels == (-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6)
    assert ELEMS["e4m3"].values[0x7F] is None and ELEMS["e4m3"].values[0x7E] == 448.0   # OCP E4M3: only S.1111.111 NaN
    assert ELEMS["e4m3"].values[0x01] == 2.0 ** -9                                       # smallest subnormal
    assert all(ELEMS["e5m2"].values[c] is None for c in range(0x7C, 0x80))               # inf and NaN
    assert ELEMS["int8"].values[0x80] is None and ELEMS["int8"].values[0xFF] == -1 / 64


@pytest.mark.parametrize("name", list(ELEMS))
def test_every_representable_value_maps_to_itself(name):
    """Every code's value rounds to a code of the same value: the code itself, except -0 which becomes +0."""
    e = ELEMS[name]
    codes = torch.tensor([c for c, v in enumerate(e.values) if v is not None])
    lut = e.grid.lut()
    back = e.grid.nearest(lut[codes])
    assert torch.equal(lut[back], lut[codes])
    minus_zero = torch.tensor([e.values[c] == 0 and c != 0 for c in codes.tolist()])
    assert torch.equal(back[~minus_zero], codes[~minus_zero]) and torch.all(back[minus_zero] == 0)


@pytest.mark.parametrize("tag", TAGS)
def test_codes_round_trip_through_the_format(tag):
    """Every element code, dequantized with a block scale and quantized again, is the same code."""
    fmt = _fmt(tag)
    e = fmt.ELEM
    assert fmt == BLOCK_FORMATS[tag]() and fmt.spec()["format"] == tag
    codes = torch.tensor([c for c, v in enumerate(e.values) if v is not None and (v != 0 or c == 0)]).view(1, 1, -1)
    if isinstance(fmt, MXFormat):
        params = {"shared_exp": torch.full((1, 1, 1), float(E8M0_BIAS - 3))}
    else:
        params = {"block_scale": torch.full((1, 1, 1), float(0x3A)), "tensor_scale": torch.full((1, 1, 1), 0.0123)}
    assert torch.equal(fmt.quantize(fmt.dequantize(codes, params), params), codes)


# ------------------------------------------------------------------------------------------------ scale choice


def test_mx_shared_exponent_and_rounding_per_spec():
    """shared exp = floor(log2(max|x|)) - emax; elements round to nearest, ties to even, saturate at the max normal."""
    fmt = _fmt("mxfp4")
    # max 3.0: floor(log2 3) = 1, emax 2 -> 2^-1; x / 0.5 = 6, 1.5 (0.75: tie -> 1.0), 0.5 (0.25: tie -> 0), 5 (tie
    # between 4 and 6 -> 4, even code), -2.5 (tie between -2 and -3 -> -2), a tiny negative -> +0 (code 0)
    x = _block([3.0, 0.375, 0.125, 2.5, -1.25, -1e-6, 0.3])
    p = fmt.fit(x)
    assert p["shared_exp"].item() == E8M0_BIAS - 1
    c = fmt.quantize(x, p)[0, 0, :7].tolist()
    assert c == [0b0111, 0b0010, 0b0000, 0b0110, 0b1100, 0b0000, 0b0001]
    assert fmt.dequantize(fmt.quantize(x, p), p)[0, 0, :7].tolist() == [3.0, 0.5, 0.0, 2.0, -1.0, 0.0, 0.25]
    # saturation: max 3.9 still gets 2^-1 (floor), and 3.9 / 0.5 = 7.8 clips to 6
    x = _block([3.9, -3.9])
    p = fmt.fit(x)
    assert p["shared_exp"].item() == E8M0_BIAS - 1
    assert fmt.qdq(x, p)[0, 0, :2].tolist() == [3.0, -3.0]
    # an all-zero block stores code 0 (2^-127) and zeros; a subnormal block clamps to -127
    z = _block([])
    assert fmt.fit(z)["shared_exp"].item() == 0 and torch.all(fmt.qdq(z, fmt.fit(z)) == 0)
    tiny = _block([2.0 ** -140])
    assert fmt.fit(tiny)["shared_exp"].item() == 0
    assert e8m0_value(torch.tensor([0, 1, 127, 254])).tolist() == [2.0 ** -127, 2.0 ** -126, 1.0, 2.0 ** 127]


def test_mx_other_element_types():
    """emax per element type; MXINT8 rounds k/64 to even and saturates at 127/64; E4M3 saturates at 448."""
    i8 = _fmt("mxint8")
    x = _block([1.0, 0.5 / 64, 1.5 / 64, -0.5 / 64, 1.999])
    p = i8.fit(x)
    assert p["shared_exp"].item() == E8M0_BIAS                              # floor(log2 1.999) - 0
    assert i8.qdq(x, p)[0, 0, :5].tolist() == [1.0, 0.0, 2 / 64, 0.0, 127 / 64]
    e4 = _fmt("mxfp8_e4m3")
    x = _block([480.0, 1.0])
    p = e4.fit(x)
    assert p["shared_exp"].item() == E8M0_BIAS                              # floor(log2 480) = 8 = emax
    assert e4.qdq(x, p)[0, 0, :2].tolist() == [448.0, 1.0]
    for tag, emax in (("mxfp6_e2m3", 2), ("mxfp6_e3m2", 4), ("mxfp8_e5m2", 15)):
        assert _fmt(tag).fit(_block([1.0]))["shared_exp"].item() == E8M0_BIAS - emax


def test_nvfp4_scales_per_nvidia_recipe():
    """g = max|W| / (6 * 448); block scale e4m3(max|x| / (6 g)); 1.0 for a zero block; elements x / (d g)."""
    fmt = _fmt("nvfp4")
    w = torch.zeros(1, 48)
    w[0, :16] = torch.linspace(-2688.0, 100.0, 16)     # |max| 2688 -> g = 1, block scale 448 (code 0x7E)
    w[0, 16] = 3.0                                     # block scale 0.5: E4M3 code 0x30
    q = quantize_rtn(w, fmt)
    assert q.params["tensor_scale"].unique().tolist() == [1.0]
    assert q.params["block_scale"][0].tolist() == [0x7E, 0x30, 0x38]   # the zero block takes 1.0 (0x38)
    assert q.dequantize()[0, 16].item() == 3.0 and q.dequantize()[0, 0].item() == -2688.0
    r = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    q = quantize_rtn(r, fmt)
    g = float(r.abs().max() / torch.tensor(2688.0))
    assert torch.all(q.params["tensor_scale"] == g)
    d = ELEMS["e4m3"].grid.lut()[q.params["block_scale"].long()]
    amax = r.view(8, 4, 16).abs().amax(-1)
    assert torch.equal(d, ELEMS["e4m3"].grid.lut()[ELEMS["e4m3"].grid.nearest(amax / (6 * torch.tensor(g)))])


def test_gptq_keeps_one_tensor_scale():
    """GPTQ fits a group at a time; the tensor scale still comes from the whole weight (Format.for_weight)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g)
    x = torch.randn(256, 64, generator=g)
    qw = gptq_quantize(w, 2 * x.T @ x / 256, _fmt("nvfp4"))
    assert torch.all(qw.params["tensor_scale"] == float(w.abs().max() / torch.tensor(2688.0)))
    spec = {"codec": "scalar", "format": qw.fmt.spec(), "out_features": 8, "in_features": 64}
    buffers = get_codec("scalar").encode(qw, spec)
    assert torch.equal(get_codec("scalar").decode(buffers, spec), qw.dequantize())


# ------------------------------------------------------------------------------------------------ bits and flags


@pytest.mark.parametrize("tag, bpw", [("mxfp4", 4.25), ("mxfp6_e2m3", 6.25), ("mxfp6_e3m2", 6.25),
                                      ("mxfp8_e4m3", 8.25), ("mxfp8_e5m2", 8.25), ("mxint8", 8.25),
                                      ("nvfp4", 4 + 8 / 16 + 32 / (12 * 256))])
def test_exact_bits_per_weight(tag, bpw):
    """Codes at their width, one 8-bit scale code per block, NVFP4's tensor scale as 32 bits; the codec round-trips."""
    fmt = _fmt(tag)
    spec = {"codec": "scalar", "format": fmt.spec(), "out_features": 12, "in_features": 256}
    assert sum(codec_bits("scalar", spec).values()) / (12 * 256) == bpw
    w = torch.randn(12, 256, generator=torch.Generator().manual_seed(2))
    qw = quantize_rtn(w, fmt)
    buffers = get_codec("scalar").encode(qw, spec)
    assert all(b.dtype == torch.uint8 for b in buffers.values())          # no fp16 anywhere
    assert torch.equal(get_codec("scalar").decode(buffers, spec), qw.dequantize())


def test_tags_and_refusals():
    """The name fixes bits, block and symmetry; a conflicting flag is refused naming the fix."""
    assert parse_format_tag("mxfp4") == FormatConfig("mxfp4", 4, 32, True)
    assert parse_format_tag("nvfp4").tag() == "nvfp4" and parse_format_tag("q4_k").tag() == "q4_k"
    assert format_fields({"format": "mxfp8_e5m2"}) == {"format": "mxfp8_e5m2", "bits": 8, "group_size": 32,
                                                       "sym": True}
    assert recipe_from_options("rtn", {"format": "nvfp4"}).fmt == FormatConfig("nvfp4", 4, 16, True)
    with pytest.raises(ConfigError, match="mxfp4 fixes --group-size to 32; drop --group-size 128"):
        recipe_from_options("rtn", {"format": "mxfp4", "group_size": 128})
    with pytest.raises(ConfigError, match="nvfp4 fixes --bits to 4; drop --bits 8"):
        format_fields({"format": "nvfp4", "bits": 8})
    with pytest.raises(ConfigError, match="mxfp6_e3m2 has blocks of 32 columns of e3m2 .* not bits=6, group_size=64"):
        make_format({"format": "mxfp6_e3m2", "bits": 6, "group_size": 64, "sym": True})


# ------------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("tag", ["mxfp4", "nvfp4", "mxint8"])
def test_rtn_model_saves_and_loads(tmp_path, tag):
    """RTN through the quantize API; the checkpoint reloads to the same logits and counts the exact bpw."""
    m = tiny_model("llama")
    lowbit.quantize(m, QuantRecipe(method="rtn", fmt=parse_format_tag(tag)), progress=False)
    q = m.model.layers[0].self_attn.q_proj
    assert q.spec["format"] == _fmt(tag).spec()
    back = reload_same_logits(m, tmp_path / "ck")
    rep = bpw_report(back)
    if tag == "nvfp4":   # 4.5 + one fp32 per tensor: 7 linears per block of 64x64 .. 64x96 weights
        layers = [v for k, v in rep["layers"].items() if k.startswith("model.layers")]
        assert all(v["bpw"] == 4.5 + 32 / v["weights"] for v in layers)
    else:
        assert rep["blocks"] == _fmt(tag).bits + 8 / 32


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_use_block_formats(method):
    """GPTQ and AWQ quantize with MXFP4 and NVFP4 unchanged; the layer output error is near RTN's or below."""
    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    for tag in ("mxfp4", "nvfp4"):
        m = tiny_model("llama")
        lowbit.quantize(m, QuantRecipe(method=method, fmt=parse_format_tag(tag)), calib_ids=calib, progress=False)
        q = m.model.layers[1].mlp.down_proj
        assert q.spec["format"]["format"] == tag and torch.isfinite(q.dequantize_weight()).all()


def test_cli_quantize_and_evaluate(tiny_dir, text_file, tmp_path):
    """`lowbit quantize --format mxfp4` writes a checkpoint that `lowbit eval` reads; --group-size is refused."""
    from lowbit.cli import main

    out = tmp_path / "ck"
    assert main(["-q", "quantize", str(tiny_dir), "--method", "rtn", "--format", "mxfp4", "--out", str(out)]) == 0
    assert read_meta(out)["modules"]["model.layers.0.mlp.up_proj"]["spec"]["format"]["format"] == "mxfp4"
    res = tmp_path / "results"
    assert main(["-q", "eval", str(out), "--ppl", str(text_file), "--seqlen", "32", "--windows", "2",
                 "--device", "cpu", "--results-dir", str(res)]) == 0
    record = json.loads(next(res.glob("*.json")).read_text())
    assert record["bpw"]["blocks"] == 4.25 and record["ppl"]
    assert main(["-q", "quantize", str(tiny_dir), "--method", "rtn", "--format", "nvfp4", "--group-size", "32",
                 "--out", str(tmp_path / "x")]) == 2


# ------------------------------------------------------------------------------------------------ GGUF

def _random(rows, cols, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_mxfp4_bytes_equal_gguf_quantizer():
    """lowbit's MXFP4 blocks are gguf-py's quantizer's bytes (no exact ties in this weight), and gguf-py's
    dequantizer gives lowbit's weight bit for bit."""
    gguf = pytest.importorskip("gguf")
    from lowbit.export.gguf_fp4 import pack_mxfp4

    w = _random(6, 256)
    qw = quantize_rtn(w, _fmt("mxfp4"))
    ours = pack_mxfp4(qw.codes, qw.params["shared_exp"])
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.MXFP4)
    assert ours.shape == theirs.shape == (6, 256 // 32 * 17)
    np.testing.assert_array_equal(ours, theirs)
    back = gguf.quants.dequantize(ours, gguf.GGMLQuantizationType.MXFP4).reshape(6, 256)
    np.testing.assert_array_equal(back, qw.dequantize().numpy())


def test_nvfp4_blocks_dequantize_to_lowbit_weight():
    """gguf-py has no NVFP4 quantizer: its dequantizer of lowbit's blocks times the tensor scale is lowbit's weight."""
    gguf = pytest.importorskip("gguf")
    from lowbit.export.gguf_fp4 import pack_nvfp4

    w = _random(6, 256, seed=3)
    qw = quantize_rtn(w, _fmt("nvfp4"))
    ours = pack_nvfp4(qw.codes, qw.params["block_scale"])
    assert ours.shape == (6, 256 // 64 * 36)
    back = gguf.quants.dequantize(ours, gguf.GGMLQuantizationType.NVFP4).reshape(6, 256)
    np.testing.assert_array_equal(back * np.float32(qw.params["tensor_scale"][0, 0]), qw.dequantize().numpy())


@pytest.mark.parametrize("tag", ["mxfp4", "nvfp4"])
def test_tiny_model_exports_to_gguf(tmp_path, tag):
    """Every block linear lands as MXFP4 / NVFP4 (plus NVFP4's ``.scale``) and reads back as lowbit's weight."""
    gguf = pytest.importorskip("gguf")
    from lowbit.export.gguf import export

    m = tiny_model("llama", intermediate=128)
    lowbit.quantize(m, QuantRecipe(method="rtn", fmt=parse_format_tag(tag)), progress=False)
    path = lowbit.save(m, tmp_path / "ck", tiny_tokenizer())
    model, meta = load_checkpoint(path), read_meta(path)
    out = export(model, meta, tmp_path / "m.gguf", tokenizer=path)
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    t = tensors["blk.0.ffn_down.weight"]
    assert t.tensor_type.name == tag.upper()
    got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(64, 128)
    if tag == "nvfp4":
        got = got * np.asarray(tensors["blk.0.ffn_down.scale"].data, dtype=np.float32)[0]
    want = model.model.layers[0].mlp.down_proj.dequantize_weight().numpy()
    np.testing.assert_array_equal(got, want)


def test_gguf_refuses_by_name(tmp_path):
    """Rows that are not whole blocks, MX types without a ggml type and an NVFP4 embedding are refused naming the
    layers."""
    pytest.importorskip("gguf")
    from lowbit.export.gguf import export

    nv = parse_format_tag("nvfp4")
    for tag, recipe, why in (
            ("nvfp4", QuantRecipe(fmt=nv), "rows of 96 columns are not whole NVFP4 blocks of 64: "
                                           "model.layers.0.mlp.down_proj"),
            ("mxfp6", QuantRecipe(fmt=parse_format_tag("mxfp6_e2m3")), "format mxfp6_e2m3 has no llama.cpp block type"),
            ("embed", QuantRecipe(fmt=parse_format_tag("mxfp4"), embed=nv),
             "per-tensor scale only to the decoder-block linears, not the embedding or head: model.embed_tokens")):
        m = tiny_model("llama")
        lowbit.quantize(m, recipe, progress=False)
        path = lowbit.save(m, tmp_path / tag, tiny_tokenizer())
        with pytest.raises(ConfigError, match=why):
            export(load_checkpoint(path), read_meta(path), tmp_path / f"{tag}.gguf", tokenizer=path)
