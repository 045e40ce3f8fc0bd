"""Export to the VPTQ format: the layout against a reference unpacker written here from docs/export.md, the vptq
package's own ``VQuantLinear`` on CPU (skipped where vptq is not importable), refusals, atomic writes."""
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from safetensors.torch import load_file
from test_export import IDS, _lowbit_weights, _rel

import lowbit
from lowbit.cli import main
from lowbit.errors import ExportError
from lowbit.export import export
from lowbit.export.layers import VQLinear
from lowbit.export.vptq import check_layer, pack_fields
from lowbit.formats.codebook import VQWeight
from lowbit.quantize import QuantRecipe

HAS_VPTQ = importlib.util.find_spec("vptq") is not None
needs_vptq = pytest.mark.skipif(not HAS_VPTQ, reason="vptq is not installed (install it beside lowbit with pip install "
                                "--no-deps --target DIR; see docs/export.md)")
#: a folder holding transformers 4.x (whose vptq quantizer runs on CPU), tokenizers and huggingface-hub for it, installed
#: with pip install --no-deps --target (docs/export.md)
TRANSFORMERS4 = os.environ.get("LOWBIT_TRANSFORMERS4_PATH")

#: tiny settings that reach every part of the mapping
CASES = {
    # tied embeddings; 48 main centroids (padded to 64), a residual codebook, 3% outlier columns (a permutation),
    # column norms
    "outliers": ("llama", dict(vector_len=4, codebook_size=48, residual_size=4, outlier_pct=3.0, kmeans_iters=2)),
    # biases and an untied head; the residual codebook is the wider one (the two swap roles), no outliers, no norms
    "wide-residual": ("qwen2", dict(vector_len=2, codebook_size=8, residual_size=64, outlier_pct=0.0, col_norm=False,
                                    kmeans_iters=2)),
}
_CKPTS = {}


def _ckpt(tmp_path_factory, case="outliers", method="vptq"):
    if (case, method) not in _CKPTS:
        arch, cfg = CASES[case]
        m = tiny_model(arch)
        # a rotary base other than transformers 4's default, so a reader that misses it gives other logits
        m.config.rope_parameters = {"rope_type": "default", "rope_theta": 50000.0}
        calib = torch.randint(3, 320, (4, 32), generator=torch.Generator().manual_seed(0))
        recipe = QuantRecipe(method="vptq", method_config=cfg) if method == "vptq" else QuantRecipe()
        lowbit.quantize(m, recipe, calib_ids=calib if method == "vptq" else None, progress=False)
        d = tmp_path_factory.mktemp("ck") / "ck"
        lowbit.save(m, d, tiny_tokenizer())
        _CKPTS[case, method] = d
    return _CKPTS[case, method]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return lambda case="outliers", method="vptq": _ckpt(tmp_path_factory, case, method)


# ------------------------------------------------------------------ the layout, read back by a reference unpacker

def _unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """``(..., W)`` int32 words, each row one little-endian bit stream -> ``(..., n)`` fields of ``bits`` bits."""
    u = words.long() & 0xFFFFFFFF
    stream = ((u.unsqueeze(-1) >> torch.arange(32)) & 1).flatten(-2)          # (..., W * 32), bit 0 first
    fields = stream[..., : n * bits].unflatten(-1, (n, bits))
    return (fields << torch.arange(bits)).sum(-1)


def _lookup(codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Codes ``(rows, cols)`` into a ``(k, v)`` codebook -> ``(rows * v, cols)``: vector ``r`` of column ``c`` is
    output rows ``r*v .. r*v+v-1``."""
    return codebook[codes].permute(0, 2, 1).reshape(-1, codes.shape[1])


def _ref_weight(t: dict, name: str, c: dict) -> torch.Tensor:
    """The float32 ``(out, in)`` weight of layer ``name`` rebuilt from its tensors and config_for_layers entry."""
    (v0, v), (k0, k), kr = c["vector_lens"], c["num_centroids"], c["num_res_centroids"][1]
    b, br = int(math.log2(k)), int(math.log2(kr)) if kr > 0 else 0
    fields = _unpack_rows(t[f"{name}.indices"][0], b + br, c["group_size"])       # (out / v, group_size)
    w = _lookup(t[f"{name}.centroids.weight"].float().view(k, v), fields & (k - 1))
    if kr > 0:
        w = w + _lookup(t[f"{name}.res_centroids.weight"].float().view(kr, v), fields >> b)
    if c["outlier_size"]:
        codes = t[f"{name}.outlier_indices"][0].long() & 0xFFFF                     # unsigned 16-bit
        w = torch.cat([_lookup(t[f"{name}.outlier_centroids.weight"].float().view(k0, v0), codes), w], 1)
    if c["enable_perm"]:
        placed = torch.empty_like(w)
        placed[:, t[f"{name}.perm"].long() & 0xFFFF] = w                            # stored column p -> perm[p]
        w = placed
    if c["enable_norm"]:
        w = w * t[f"{name}.weight_scale"].float() + t[f"{name}.weight_bias"].float()
    return w


@pytest.mark.parametrize("bits, n", [(2, 16), (3, 32), (5, 7), (8, 62), (12, 93), (20, 33), (32, 3)])
def test_pack_fields_matches_the_reference_unpacker(bits, n):
    g = torch.Generator().manual_seed(bits * n)
    fields = torch.randint(0, 1 << min(bits, 62), (5, n), generator=g) & ((1 << bits) - 1)
    words = pack_fields(fields, bits)
    assert words.dtype == torch.int32 and words.shape == (5, -(-n * bits // 32))
    assert torch.equal(_unpack_rows(words, bits, n), fields)


def test_pack_fields_by_hand():
    assert pack_fields(torch.arange(8).view(1, 8), 4).item() == 0x76543210
    f = torch.zeros(1, 11, dtype=torch.long)
    f[0, 10] = 0b111                                   # 3-bit field 10: bits 30, 31 of word 0 and bit 0 of word 1
    assert pack_fields(f, 3)[0].tolist() == [-(1 << 31) | (1 << 30), 1]


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_exact(ckpt, tmp_path, case, caplog):
    from transformers import VptqConfig

    ck = ckpt(case)
    with caplog.at_level(logging.WARNING, logger="lowbit.export.vptq"):
        export(ck, "vptq", tmp_path / "v")
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "vptq" and config["dtype"] == "float16"
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 50000.0   # for transformers 4 readers
    VptqConfig.from_dict(qc)                                        # transformers' own checks of the config
    t, ref = load_file(tmp_path / "v" / "model.safetensors"), _lowbit_weights(ck)
    assert set(qc["config_for_layers"]) == set(ref)
    for name, w in ref.items():
        # lowbit's float32 weight, bit for bit: every stored value is lowbit's float16 value
        assert torch.equal(_ref_weight(t, name, qc["config_for_layers"][name]), w), name
    q = qc["config_for_layers"]["model.layers.0.self_attn.q_proj"]
    if case == "outliers":
        assert q["num_centroids"] == [256, 64] and q["num_res_centroids"] == [-1, 4] and q["vector_lens"] == [2, 4]
        assert q["outlier_size"] == 2 and q["enable_perm"] and q["enable_norm"] and not q["bias"]
        assert "lm_head.weight" not in t                           # tied, as transformers saves it
        assert "14 layers have settings the vptq CUDA kernels do not dispatch on (model.layers.0.self_attn.q_proj: " \
               "6-bit indices, outlier vectors of 2 (GEMV: 4), 64 input columns" in caplog.text
    else:
        assert q["num_centroids"] == [-1, 64] and q["num_res_centroids"] == [-1, 8]       # swapped
        assert not (q["enable_perm"] or q["enable_norm"]) and q["bias"] and q["outlier_size"] == 0
        assert qc["modules_to_not_convert"] == ["lm_head"] and t["lm_head.weight"].dtype == torch.float16
        m = lowbit.load(ck)
        assert torch.equal(t["model.layers.1.self_attn.k_proj.bias"], m.model.layers[1].self_attn.k_proj.bias.half())
    assert {p.name for p in (tmp_path / "v").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}


# ------------------------------------------------------------------ the vptq package's own layers

def _vptq_model(folder, dtype):
    """The export as the vptq package builds it: the float model from config.json, every layer of
    config_for_layers replaced by vptq's ``make_quant_linear`` with its ``VQuantLinear``, the tensors loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from vptq import VQuantLinear
    from vptq.layers.model_base import make_quant_linear

    conf = AutoConfig.from_pretrained(folder)
    qc = conf.quantization_config
    model = AutoModelForCausalLM.from_config(conf, dtype=dtype)
    make_quant_linear(model, qc["config_for_layers"], qc["shared_layer_config"], target_layer=VQuantLinear)
    missing, unexpected = model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}   # a tied head is the embedding
    return model.eval()


def _vptq_weight(q) -> torch.Tensor:
    """A ``VQuantLinear``'s weight from vptq's own torch dequantization (what its forward multiplies by)."""
    from vptq.ops import dequant

    return dequant(
        indices=q.indices, centroids=q.centroids.weight.view(1, q.num_centroids, q.vector_len),
        outlier_indices=q.outlier_indices, res_indices=q.res_indices,
        outlier_centroids=q.outlier_centroids.weight if q.enable_outlier else None,
        res_centroids=q.res_centroids.weight if q.enable_residual else None,
        perm=q.perm if q.enable_perm else None, weight_scale=q.weight_scale, weight_bias=q.weight_bias,
        is_indice_packed=True, enable_outlier=q.enable_outlier, enable_residual=q.enable_residual,
        enable_perm=q.enable_perm, enable_norm=q.enable_norm, num_centroids=q.num_centroids,
        num_outlier_centroids=q.num_outlier_centroids, num_res_centroids=q.num_res_centroids, padding=q.padding,
        outlier_padding=q.outlier_padding, num_codebooks=q.num_codebooks, group_size=q.group_size,
        outlier_size=q.outlier_size, vector_len=q.vector_len, outlier_vector_len=q.outlier_vector_len).detach()


@needs_vptq
@pytest.mark.parametrize("case", list(CASES))
def test_the_vptq_package_runs_the_export_on_cpu(ckpt, tmp_path, case):
    from vptq import VQuantLinear

    ck = ckpt(case)
    export(ck, "vptq", tmp_path / "v")
    ref = _lowbit_weights(ck)
    hf = _vptq_model(tmp_path / "v", torch.float32)
    layers = {n: m for n, m in hf.named_modules() if isinstance(m, VQuantLinear)}
    assert set(layers) == set(ref)
    for name, q in layers.items():
        assert torch.equal(_vptq_weight(q), ref[name]), name     # in float32: lowbit's weights bit for bit
    with torch.no_grad():
        got, want = hf(input_ids=IDS).logits, lowbit.load(ck)(input_ids=IDS).logits
    assert _rel(got, want) < 1e-3
    # in float16 (the config's dtype) vptq rounds after the lookup sum, the scale and the bias: a few float16 steps
    hf16 = _vptq_model(tmp_path / "v", torch.float16)
    for name, q in hf16.named_modules():
        if isinstance(q, VQuantLinear):
            assert _rel(_vptq_weight(q).float(), ref[name]) < 2e-3, name


_TRANSFORMERS4_LOAD = """
import sys, types, torch
# vptq imports sentence_transformers only to recognise one in its packing tool; the installed one needs a newer
# huggingface-hub than transformers 4 takes, so a stand-in serves the import
st = types.ModuleType("sentence_transformers.SentenceTransformer")
st.SentenceTransformer = type("SentenceTransformer", (), {})
sys.modules.update({"sentence_transformers": types.ModuleType("sentence_transformers"),
                    "sentence_transformers.SentenceTransformer": st})
import transformers, vptq
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])   # no GPU: the quantizer picks float32
q = model.model.layers[0].self_attn.q_proj
assert isinstance(q, vptq.VQuantLinear) and model.dtype == torch.float32, (type(q), model.dtype)
with torch.no_grad():
    torch.save(model(input_ids=torch.arange(3, 67).view(2, 32)).logits, sys.argv[2])
print(transformers.__version__, vptq.__version__)
"""


@needs_vptq
@pytest.mark.skipif(not TRANSFORMERS4, reason="set LOWBIT_TRANSFORMERS4_PATH to a folder holding transformers 4.x")
@pytest.mark.parametrize("case", list(CASES))
def test_transformers_4_vptq_quantizer_loads_the_export_on_cpu(ckpt, tmp_path, case):
    # transformers 5's vptq quantizer refuses to run without a GPU; transformers 4.57 loads VPTQ models on CPU in
    # float32, through the vptq package's VQuantLinear and its torch path
    ck = ckpt(case)
    export(ck, "vptq", tmp_path / "v")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TRANSFORMERS4, *sys.path])}
    run = subprocess.run([sys.executable, "-c", _TRANSFORMERS4_LOAD, str(tmp_path / "v"), str(tmp_path / "l.pt")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-2].startswith("4.")
    with torch.no_grad():
        assert _rel(torch.load(tmp_path / "l.pt"), lowbit.load(ck)(input_ids=IDS).logits) < 1e-3


# ------------------------------------------------------------------ refusals, atomic writes, the CLI

def test_other_formats_are_refused_by_name(ckpt, tmp_path):
    with pytest.raises(ExportError) as e:
        export(ckpt(method="rtn"), "vptq", tmp_path / "x")
    msg = str(e.value)
    assert "cannot export model.layers.0.self_attn.q_proj.weight to vptq: its format is int4" in msg
    assert "VQ layers (lowbit's --method vptq)" in msg and "--dequantize f16" in msg
    assert list(tmp_path.iterdir()) == []


def _vq(in_f, n_out, v0, k=4):
    """A synthetic 4 x ``in_f`` VQ layer with ``n_out`` outlier columns of vector length ``v0``."""
    qw = VQWeight(4, in_f, torch.zeros(k, 2), torch.zeros(2, in_f - n_out, dtype=torch.long))
    if n_out:
        qw.outlier_cols = torch.arange(n_out)
        qw.out_codebook, qw.out_idx = torch.zeros(4, v0), torch.zeros(4 // v0, n_out, dtype=torch.long)
    return VQLinear("model.layers.0.mlp.up_proj", qw)


def test_what_vquantlinear_cannot_read_is_refused_by_name():
    with pytest.raises(ExportError, match=r"up_proj\.weight to vptq: its outlier columns .* vectors of length 1"):
        check_layer(_vq(64, 2, v0=1))
    # one main column of 2-bit codes: a 2-bit packed row, which vptq's unpacker cannot split
    with pytest.raises(ExportError, match=r"up_proj\.weight to vptq: its 1 main columns pack 2 bits .* fewer outlier"):
        check_layer(_vq(8, 7, v0=2))
    assert check_layer(_vq(64, 2, v0=2)).name.endswith("up_proj")
    assert check_layer(_vq(9, 0, v0=2))   # 9 columns of 2 bits: 18 bits in one word, which it splits


def test_an_interrupted_export_leaves_nothing_at_out(ckpt, tmp_path, monkeypatch):
    from lowbit.export import folder

    def killed_mid_write(tensors, path, metadata=None):
        with open(path, "wb") as f:              # config.json and the tokenizer are written by now
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(folder, "save_file", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        export(ckpt(), "vptq", tmp_path / "v")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_to_vptq(ckpt, tmp_path, capsys):
    assert main(["-q", "export", str(ckpt()), "--to", "vptq", "--out", str(tmp_path / "v")]) == 0
    assert str(tmp_path / "v") in capsys.readouterr().out
    assert (tmp_path / "v" / "model.safetensors").exists()
