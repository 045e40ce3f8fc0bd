"""Tiny random-init models for every supported architecture, built from configs (no downloads)."""
from __future__ import annotations

import pytest
import torch

TINY_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered as the rightful property of some one or other "
    "of their daughters. "
) * 20


def tiny_config(arch: str, vocab: int = 320, hidden: int = 64, intermediate: int = 96, layers: int = 2):
    """``hidden``/``intermediate``: the widths (4 heads of ``hidden / 4``); 256/512 makes every linear of the
    llama, qwen2 and gemma3 rows whole K-quant super-blocks."""
    from transformers import Gemma3TextConfig, LlamaConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if arch == "gemma3":
        return Gemma3TextConfig(**common, head_dim=hidden // 4, sliding_window=32, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0)
    if arch in ("opt", "opt-postnorm"):
        # opt-postnorm has opt-350m's shape: LayerNorms after the residual adds, no final norm, and
        # embeddings narrower than the blocks (project_in / project_out)
        post = arch == "opt-postnorm"
        return OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=96, num_hidden_layers=layers, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=32 if post else 64,
                         do_layer_norm_before=not post, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0, std: float = 0.08, layers: int = 2, **widths):
    """A random-init model of :func:`tiny_config` (``widths``: its ``hidden``/``intermediate``), weights of
    standard deviation ``std``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(arch, layers=layers, **widths), dtype=torch.float32)
    # random init with std 0.02 makes every layer near-identity; widen weights so quantization error shows.
    # Biases (Qwen2's q/k/v, OPT's linears and LayerNorms) start at zero: make them non-zero, so a checkpoint
    # or a folding step that drops or mis-scales one changes the logits
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0, std)
            elif name.endswith(".bias"):
                p.normal_(0, 0.05)
    return m.eval()


_TOKENIZER = None


def tiny_tokenizer():
    """A byte-level BPE (320 tokens) trained on a paragraph; deterministic."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<bos>", "<eos>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator([TINY_TEXT], trainer)
        _TOKENIZER = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    return _TOKENIZER


def reload_same_logits(model, path):
    """Save quantized ``model`` to ``path`` with the tiny tokenizer, load it back, check the logits on fixed ids are
    equal bit for bit; returns the loaded model."""
    import lowbit
    from lowbit.io.checkpoint import load_checkpoint

    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    back = load_checkpoint(lowbit.save(model, path, tiny_tokenizer()))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, want)
    return back


def codec_round_trip(qw, want_weight):
    """Pack ``qw`` (a weight with ``layer_spec()``) into a QuantizedLinear, check both decode to ``want_weight`` and
    that every itemised bpw entry is its buffer's stored bits, as the codec's layout says, and that each stored field
    (a buffer is the weight's field of its name) comes back equal: codes exactly, float fields as the fp16 values they
    hold; returns ``(the weight rebuilt from the buffers, layer_bits report)``."""
    from lowbit.nn import QuantizedLinear
    from lowbit.nn.bpw import codec_bits, layer_bits

    spec = qw.layer_spec()
    m = QuantizedLinear.from_quantized(qw, spec)
    assert torch.equal(qw.dequantize(), want_weight) and torch.equal(m.dequantize_weight(), want_weight)
    rep = layer_bits(m)
    stored = {n: t.numel() * t.element_size() * 8 for n, t in m.packed_buffers().items()}
    assert rep["items"] == stored == codec_bits(spec["codec"], spec)
    assert rep["bpw"] == sum(stored.values()) / (spec["out_features"] * spec["in_features"])
    back = m.codec.to_weight(m.packed_buffers(), spec)
    for name in stored:
        a, b = getattr(back, name), getattr(qw, name)
        same = torch.equal(a.float(), b.float()) if b.is_floating_point() else torch.equal(a.long(), b.long())
        assert same, name
    return back, rep


#: every architecture tiny_config builds; tests taking the ``arch`` fixture run on each
ARCHS = ("llama", "gemma3", "opt", "opt-postnorm", "qwen2")


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def tiny_dir(tmp_path):
    """A saved tiny Llama HF folder (config, weights, tokenizer)."""
    d = tmp_path / "tiny-llama"
    m = tiny_model("llama")
    m.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text(TINY_TEXT)
    return p
