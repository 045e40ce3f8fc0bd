"""The fused residual-stream rotation (lowbit.calib.rotate): Hadamard matrices, exactness in float, refusals, and
the flag through the recipe, the pipeline and a checkpoint."""
import json

import pytest
import torch

import lowbit
from conftest import tiny_config, tiny_model, tiny_tokenizer
from lowbit.calib.hadamard import BASE_SIZES, hadamard_matrix, hadamard_size, random_hadamard
from lowbit.calib.rotate import rotate_model
from lowbit.config import FormatConfig, RotationConfig
from lowbit.errors import ConfigError, UnsupportedModelError
from lowbit.models.arch import arch_for, get_module
from lowbit.quantize import QuantRecipe, estimate_output_bytes, recipe_from_options


@pytest.mark.parametrize("n", sorted({m * p for m in BASE_SIZES for p in (1, 2, 4, 8, 16)} | {576, 640, 1536}))
def test_hadamard_rows_are_orthogonal(n):
    h = hadamard_matrix(n)
    assert set(h.unique().tolist()) <= {-1, 1}
    assert torch.equal(h.double() @ h.double().T, n * torch.eye(n, dtype=torch.float64))


def test_hadamard_sizes_of_the_zoo_widths_and_refusal():
    assert hadamard_size(576) == (36, 16) and hadamard_size(1536) == (12, 128) and hadamard_size(640) == (40, 16)
    assert hadamard_size(64) == (1, 64)
    for n in (44, 100, 0, 7):
        assert hadamard_size(n) is None
        with pytest.raises(ConfigError, match="no Hadamard matrix of order"):
            hadamard_matrix(n)


def test_random_hadamard_is_orthogonal_and_seeded():
    q = random_hadamard(96, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(96, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, random_hadamard(96, seed=3)) and not torch.equal(q, random_hadamard(96, seed=4))


def _gemma(**kw):
    """A tiny Gemma (v1): RMSNorm gains stored with offset 1, a scaled embedding, tied head."""
    from transformers import AutoModelForCausalLM, GemmaConfig

    torch.manual_seed(0)
    cfg = GemmaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256, **kw)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.08)   # the norms too: gains far from 1 + 0, so a wrong offset shows
    return m.eval()


def _llama_with_biases():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("llama")
    cfg.attention_bias = cfg.mlp_bias = True
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(*(0, 0.08) if p.dim() == 2 else (1, 0.2) if "norm" in name else (0, 0.05))
    return m.eval()


MODELS = {
    "llama": lambda: tiny_model("llama"),
    "llama-96": lambda: tiny_model("llama", hidden=96, intermediate=160),   # 96 = 12 * 8: a Paley matrix
    "llama-biases": _llama_with_biases,                                      # o_proj/down_proj biases rotate too
    "qwen2": lambda: tiny_model("qwen2"),
    "gemma": _gemma,
}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_rotated_float_model_computes_the_same_logits(name):
    m = MODELS[name]()
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids).logits
        info = rotate_model(m, seed=1)
        out = m(ids).logits
    assert _rel_err(out, ref) < 1e-4
    arch = arch_for(m)
    norms = [get_module(m, arch.final_norm)] + [b.input_layernorm for b in get_module(m, arch.blocks)]
    for norm in norms:   # gains folded away: every norm computes x / rms(x)
        assert torch.equal(norm.weight + arch.norm_offset, torch.ones_like(norm.weight))
    assert info["untied_embeddings"] == (name != "qwen2")   # tiny qwen2 has its own head
    assert m.get_output_embeddings().weight is not m.get_input_embeddings().weight
    assert not m.config.tie_word_embeddings


def test_rotation_spreads_an_outlier_column():
    m = tiny_model("llama")
    lin = m.model.layers[0].mlp.up_proj
    with torch.no_grad():
        lin.weight[:, 5] *= 30            # one input channel 30x the rest: what rounding suffers from
        before = lin.weight.abs().amax(0) / lin.weight.abs().mean()
        rotate_model(m)
        after = lin.weight.abs().amax(0) / lin.weight.abs().mean()
    assert before.max() > 20 and after.max() < before.max() / 4


@pytest.mark.parametrize("arch", ["gemma3", "opt", "opt-postnorm"])
def test_architectures_that_cannot_be_rotated_exactly_are_refused(arch):
    m = tiny_model(arch)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    match = "post_attention_layernorm" if arch == "gemma3" else "LayerNorm"
    with pytest.raises(UnsupportedModelError, match=match):
        rotate_model(m)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())   # refused before touching a weight


def test_recipe_flag_tag_and_round_trip():
    r = recipe_from_options("rtn", {"rotate": "hadamard", "rotate_seed": 7, "bits": 3})
    assert r.rotation == RotationConfig("hadamard", 7)
    assert r.tag() == "int3-g128-rotate=hadamard-rotate_seed=7"
    assert QuantRecipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    plain = recipe_from_options("rtn", {})
    assert "rotation" not in plain.to_dict() and QuantRecipe.from_dict(plain.to_dict()) == plain
    with pytest.raises(ConfigError, match="--rotate must be none or hadamard"):
        recipe_from_options("rtn", {"rotate": "random"})
    with pytest.raises(ConfigError, match="add --rotate hadamard"):
        recipe_from_options("rtn", {"rotate_seed": 3})


def test_output_estimate_counts_the_head_a_rotation_unties():
    cfg = {"vocab_size": 1000, "hidden_size": 64, "tie_word_embeddings": True}
    plain, _ = estimate_output_bytes(QuantRecipe(), 200_000, cfg)
    rotated, _ = estimate_output_bytes(QuantRecipe(rotation=RotationConfig("hadamard")), 200_000, cfg)
    assert rotated - plain == pytest.approx(1000 * 64 * 2 * 1.1, abs=2)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_rotated_quantized_checkpoint_reloads_to_the_same_logits(method, tmp_path):
    m = tiny_model("llama")
    recipe = QuantRecipe(method=method, fmt=FormatConfig(bits=4, group_size=32), rotation=RotationConfig("hadamard", 2))
    calib = torch.randint(3, 320, (4, 32), generator=torch.Generator().manual_seed(1)) if method == "gptq" else None
    summary = lowbit.quantize(m, recipe, calib, progress=False)
    assert summary["rotation"] == {"rotate": "hadamard", "seed": 2, "hidden": 64, "untied_embeddings": True}
    path = lowbit.save(m, tmp_path / "ckpt", tiny_tokenizer())
    meta = json.loads((path / "lowbit.json").read_text())
    assert meta["summary"]["recipe"]["rotation"] == {"rotate": "hadamard", "rotate_seed": 2}
    assert meta["summary"]["rotation"]["untied_embeddings"] and not meta["aliases"]
    again = lowbit.load(path)
    ids = torch.randint(3, 320, (1, 16))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, again(ids).logits)


def test_cli_rotate_flag(tiny_dir, tmp_path):
    from lowbit.cli import main

    out = tmp_path / "q"
    assert main(["-q", "quantize", str(tiny_dir), "--bits", "4", "--group-size", "32", "--rotate", "hadamard",
                 "--out", str(out)]) == 0
    recipe = json.loads((out / "lowbit.json").read_text())["summary"]["recipe"]
    assert recipe["rotation"] == {"rotate": "hadamard", "rotate_seed": 0}


@pytest.mark.slow
def test_rotated_smollm2_computes_the_same_logits():
    model, tok = lowbit.load_model("smollm2-135m")
    ids = tok(["It is a truth universally acknowledged, that a single man in possession of a good fortune"],
              return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits
        rotate_model(model, seed=0)
        out = model(ids).logits
    assert _rel_err(out, ref) < 1e-4


def test_rotated_checkpoint_exports_as_a_plain_model(tmp_path):
    m = tiny_model("llama")   # tied: the export must carry the untied head
    lowbit.quantize(m, QuantRecipe(fmt=FormatConfig(bits=4, group_size=32), rotation=RotationConfig("hadamard")),
                    progress=False)
    ck = lowbit.save(m, tmp_path / "ck", tiny_tokenizer())
    out = lowbit.api.export(ck, "f16", tmp_path / "f16")
    plain, _ = lowbit.load_model(str(out))
    assert not plain.config.tie_word_embeddings
    ids = torch.randint(3, 320, (1, 16))
    with torch.no_grad():
        assert _rel_err(plain.float()(ids).logits, m(ids).logits) < 1e-2   # float16 rounding of the weights
