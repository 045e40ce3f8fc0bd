"""Architecture adapters as data: one row per model family.

Each row says where the decoder blocks, embedding, final norm and head
live, which linears a block has in execution order, which of them share an
input (they share one Hessian / one activation statistic), which norm
feeds each shared input (for AWQ / SmoothQuant scale folding) and the
other module names the lean decoder reads. A new architecture is a new
row, not new code.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from ..errors import ConfigError, UnsupportedModelError

__all__ = ["ArchSpec", "InputGroup", "ARCHS", "arch_for", "check_seqlen", "context_length", "get_module", "set_module",
           "untie_word_embeddings"]


@dataclass(frozen=True)
class InputGroup:
    """Linears of a block that read the same input tensor.

    ``prev``: the module whose output is that input and into which a
    per-input-channel scale can be folded: a norm (``prev_kind="norm"``),
    a linear (``"linear"``, e.g. v_proj before o_proj when head shapes
    allow), or None when nothing can absorb it. ``feeds``: the block
    module the linears belong to, whose output AWQ's scale search compares
    (attention for q/k/v, the MLP for gate/up); None for a group of one
    linear, which is compared itself. The group feeding attention lists
    q, k, v first, in that order.
    """

    linears: tuple[str, ...]
    prev: str | None = None
    prev_kind: str = "norm"
    feeds: str | None = None


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    blocks: str
    embed: str
    final_norm: str | None
    head: str
    groups: tuple[InputGroup, ...]
    #: ``(attribute, value)`` pairs the model's config must have for this row: tells apart variants of one
    #: model_type whose blocks are wired differently (OPT's pre-norm and post-norm blocks)
    config: tuple[tuple[str, object], ...] = ()
    #: norms compute ``x * (offset + w)``: Gemma stores ``w`` with offset 1
    norm_offset: float = 0.0
    #: perplexity windows start with BOS (Gemma was trained that way)
    bos_per_window: bool = False
    #: blocks are pre-norm RMSNorm + rotary attention + gated MLP, which lowbit.runtime.LeanDecoder runs;
    #: ``groups`` are then q/k/v, o, gate/up, down, in that order
    lean_decode: bool = False
    #: a block's attention module (AWQ calls it with the block's mask and position arguments)
    attention: str = "self_attn"
    #: norms of the attention and MLP outputs before each residual add (Gemma-2/3), None without
    post_norms: tuple[str, str] | None = None
    #: per-head RMSNorms of q and k inside attention, where a block has them (Qwen3, Gemma-3)
    qk_norms: tuple[str, str] = ("self_attn.q_norm", "self_attn.k_norm")
    #: the rotary-embedding module all blocks share (lean decode rows), None without
    rotary: str | None = None

    @property
    def linears(self) -> tuple[str, ...]:
        """Block linears in execution order."""
        return tuple(name for g in self.groups for name in g.linears)

    @property
    def qk(self) -> tuple[str, ...]:
        """The query and key projections (AWQ and the clip search skip them: their error hides in softmax)."""
        return next((g.linears[:2] for g in self.groups if g.feeds == self.attention), ())


def _gated_groups(pre_mlp_norm: str) -> tuple[InputGroup, ...]:
    """Input groups of a pre-norm attention + gated-MLP block; ``pre_mlp_norm`` is the norm before the MLP."""
    return (
        InputGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", feeds="self_attn"),
        InputGroup(("self_attn.o_proj",), "self_attn.v_proj", "linear"),
        InputGroup(("mlp.gate_proj", "mlp.up_proj"), pre_mlp_norm, feeds="mlp"),
        InputGroup(("mlp.down_proj",), "mlp.up_proj", "linear"),
    )


_PATHS = ("model.layers", "model.embed_tokens", "model.norm", "lm_head")   # blocks, embedding, final norm, head

_OPT = ArchSpec("opt", ("opt",), "model.decoder.layers", "model.decoder.embed_tokens",
                "model.decoder.final_layer_norm", "lm_head",
                (
                    InputGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn_layer_norm",
                               feeds="self_attn"),
                    InputGroup(("self_attn.out_proj",), "self_attn.v_proj", "linear"),
                    InputGroup(("fc1",), "final_layer_norm"),
                    InputGroup(("fc2",), None),
                ),
                bos_per_window=True, config=(("do_layer_norm_before", True),))

ARCHS: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama", "mistral", "qwen2", "qwen3"), *_PATHS, _gated_groups("post_attention_layernorm"),
             lean_decode=True, rotary="model.rotary_emb"),
    ArchSpec("gemma", ("gemma",), *_PATHS, _gated_groups("post_attention_layernorm"), norm_offset=1.0,
             bos_per_window=True, lean_decode=True, rotary="model.rotary_emb"),
    ArchSpec("gemma3", ("gemma3_text", "gemma3", "gemma2"), *_PATHS, _gated_groups("pre_feedforward_layernorm"),
             norm_offset=1.0, bos_per_window=True, lean_decode=True, rotary="model.rotary_emb",
             post_norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    _OPT,
    # post-norm OPT (opt-350m): each LayerNorm follows a residual add, so the q/k/v and fc1 inputs are the
    # residual stream too and no norm can absorb a scale; the decoder has no final norm
    replace(_OPT, name="opt-postnorm", final_norm=None, config=(("do_layer_norm_before", False),),
            groups=(InputGroup(_OPT.groups[0].linears, feeds="self_attn"), _OPT.groups[1], InputGroup(("fc1",)),
                    _OPT.groups[3])),
)


def arch_for(model: nn.Module) -> ArchSpec:
    """The adapter row for ``model``: by ``config.model_type``, then by the config attributes a row names."""
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    for a in ARCHS:
        if mt in a.model_types and all(getattr(config, k, None) == v for k, v in a.config):
            return a
    known = sorted({t for a in ARCHS for t in a.model_types})
    raise UnsupportedModelError(
        f"lowbit has no adapter for model_type {mt!r}. Supported: {', '.join(known)}. "
        "Adding one is a new row in lowbit/models/arch.py."
    )


def context_length(model: nn.Module) -> int | None:
    """The model's context in tokens (``max_position_embeddings`` of its text config), if it states one."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) else None


def check_seqlen(model: nn.Module, seqlen: int, what: str = "seqlen") -> None:
    """ConfigError when windows of ``seqlen`` tokens exceed the model's :func:`context_length`.

    Past it a model's position encoding is out of range: its numbers mean nothing, and attention over a
    very long window can run for hours. ``what`` names the setting in the message.
    """
    n = context_length(model)
    if n is not None and seqlen > n:
        raise ConfigError(f"{what} {seqlen} is longer than the model's context of {n} tokens "
                          f"(max_position_embeddings); use {what} {n} or less")


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def untie_word_embeddings(model: nn.Module) -> bool:
    """Give the head its own copy of the embedding's weight where the two share one, and mark the config untied
    (so a saved checkpoint reloads with two tensors); returns whether they were tied."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and getattr(head, "weight", None) is getattr(emb, "weight", 0)
    if tied:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    cfg = model.config
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is not None and getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
    return tied
