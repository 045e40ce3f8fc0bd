"""GGUF export for llama.cpp: lowbit's codes and scales written on llama.cpp's own block grids.

Nothing is re-quantized. A lowbit ``int`` weight whose groups line up with llama.cpp's blocks of 32 columns
is the same grid as one of ggml's legacy block types, so its codes and fp16 scales are copied bit for bit:

==================  ===============================  =============================================
lowbit format       ggml type                        per 32-block value
==================  ===============================  =============================================
int4 sym            Q4_0                             ``(q - 8) * d``,   ``d = s``
int4 asym           Q4_1                             ``d * q + m``,     ``d = s``, ``m = -z * s``
int5 sym            Q5_0                             ``(q - 16) * d``,  ``d = s``
int5 asym           Q5_1                             ``d * q + m``,     ``d = s``, ``m = -z * s``
int8 sym            Q8_0                             ``(q - 128) * d``, ``d = s`` (stored as int8)
kquant q2_k..q6_k   Q2_K, Q3_K, Q4_K, Q5_K, Q6_K     the same super-blocks (:mod:`lowbit.formats.kquant`)
mxfp4               MXFP4                            ``e2m1(c) * 2^(e - 127)`` (:mod:`lowbit.formats.mx`)
nvfp4               NVFP4 + F32 ``<name>.scale``     ``(e2m1(c) * e4m3(d)) * g``, 64-column blocks
==================  ===============================  =============================================

For the int types the group size must be a multiple of 32 (or one group per row) and the row width a multiple
of 32; each 32-block then takes its group's scale (and zero point). A lowbit K-quant weight is ggml's own grid
(rows of whole 256-column super-blocks; other widths were quantized with the type's int fallback), so its codes,
sub-scales, mins and fp16 ``d``/``dmin`` are moved into the blocks bit for bit (:mod:`.gguf_kquants`); so are an
``mxfp4`` weight's e2m1 codes and E8M0 exponents (rows a multiple of 32 wide) and an ``nvfp4`` weight's codes and
E4M3 block scales (rows a multiple of 64 wide, ggml's NVFP4 block), whose per-tensor scale goes in a one-value
F32 tensor ``<name>.scale`` as llama.cpp's converter writes it (:mod:`.gguf_fp4`). The symmetric int types, every
K-quant, MXFP4 and NVFP4 are exact; the asymmetric int ones
store ``m = -z * s`` as fp16, the only rounding in the file (at most half an fp16 ulp of ``m``). Unquantized
tensors keep the checkpoint's storage precision (F16 or BF16; F32 for norms and biases, as llama.cpp's
converter writes them). Any other quantized weight (int2/int3, fp/nf, VQ, W8A8, a group of 16, ...) is refused by
name with a :class:`~lowbit.errors.ConfigError`, or stored dequantized as F16 with ``allow_f16=True``.

Architectures (rows of :data:`ARCHS`): ``llama`` (q/k rows permuted to llama.cpp's rotary layout),
``qwen2`` and ``gemma3`` (norm weights stored as ``1 + w``, the checkpoint's ``norm_offset``). The
vocabulary comes from the checkpoint's ``tokenizer.json``: a byte-level BPE becomes llama.cpp's ``gpt2``
tokenizer with its merges, a SentencePiece-style BPE (byte fallback, ``▁`` for spaces) its ``llama``
tokenizer with scores that keep the merge order.

The file is written to a temporary name next to ``out`` and renamed, so an interrupted export leaves nothing.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._version import __version__
from ..errors import ConfigError
from ..formats import IntFormat, KQuantFormat, group_layout, make_format, preset_tag
from ..formats.kquant import SUPER_BLOCK
from ..formats.mx import MXFormat, NVFP4Format
from ..models.arch import arch_for
from ..utils import atomic_file
from .gguf_fp4 import MXFP4_BLOCK, NVFP4_BLOCK, pack_mxfp4, pack_nvfp4
from .gguf_kquants import pack_kblocks

log = logging.getLogger(__name__)

__all__ = ["export", "ARCHS", "GGUFArch", "BLOCK", "block_type", "pack_blocks", "block_params", "qk_permutation",
           "tensor_plan", "tokenizer_metadata"]

#: columns per block of every legacy ggml block type
BLOCK = 32

#: exact mappings, for the refusal message
MAPS = ("int4 sym -> Q4_0", "int4 asym -> Q4_1", "int5 sym -> Q5_0", "int5 asym -> Q5_1", "int8 sym -> Q8_0",
        "kquant q2_k..q6_k -> Q2_K..Q6_K", "mxfp4 -> MXFP4", "nvfp4 -> NVFP4")

#: columns per block of the fp4 block types: a row must be whole blocks
FP4_BLOCKS = {"MXFP4": MXFP4_BLOCK, "NVFP4": NVFP4_BLOCK}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF export needs the `gguf` package: pip install gguf") from None
    return gguf


# ---------------------------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class GGUFArch:
    """How one model family is written for llama.cpp.

    ``name``: llama.cpp's architecture (``general.architecture``). ``permute_qk``: llama.cpp rotates pairs
    ``(i, i + 1)`` where Hugging Face rotates ``(i, i + d/2)``, so q/k rows are interleaved per head.
    ``sliding``: llama.cpp builds the sliding-window layout itself (Gemma-3: every 6th layer global, local
    rotary base 10000), so the export checks the model follows it.
    """

    name: str
    model_types: tuple[str, ...]
    permute_qk: bool = False
    sliding: bool = False


ARCHS: tuple[GGUFArch, ...] = (
    GGUFArch("llama", ("llama",), permute_qk=True),
    GGUFArch("qwen2", ("qwen2",)),
    GGUFArch("gemma3", ("gemma3_text",), sliding=True),
)

#: llama.cpp's fixed Gemma-3 layout: layer i attends globally when (i + 1) % 6 == 0, locally with this rotary base
GEMMA3_GLOBAL_EVERY = 6
GEMMA3_LOCAL_ROPE_BASE = 10000.0


def gguf_arch(model) -> GGUFArch:
    mt = getattr(model.config, "model_type", None)
    for a in ARCHS:
        if mt in a.model_types:
            return a
    known = ", ".join(t for a in ARCHS for t in a.model_types)
    raise ConfigError(f"GGUF export supports model types {known}; this model is {mt!r}")


# ------------------------------------------------------------------------------------------------ block grids


def block_type(fmt) -> str | None:
    """The ggml type name holding lowbit format ``fmt`` exactly, ignoring widths (None when there is none)."""
    if isinstance(fmt, KQuantFormat):
        return fmt.ktype.ggml
    if isinstance(fmt, (MXFormat, NVFP4Format)):
        return {"mxfp4": "MXFP4", "nvfp4": "NVFP4"}.get(fmt.name)
    if not isinstance(fmt, IntFormat):
        return None
    return {(4, True): "Q4_0", (4, False): "Q4_1", (5, True): "Q5_0", (5, False): "Q5_1", (8, True): "Q8_0"}.get(
        (fmt.bits, fmt.sym))


def _why_not(fmt, in_features: int) -> str | None:
    """Why a weight in ``fmt`` with rows of ``in_features`` has no exact block type (None: it has one)."""
    if block_type(fmt) is None:
        return f"format {_fmt_name(fmt)} has no llama.cpp block type with the same grid"
    if isinstance(fmt, KQuantFormat):
        return None if in_features % SUPER_BLOCK == 0 else \
            f"rows of {in_features} columns are not whole {fmt.ktype.ggml} super-blocks of {SUPER_BLOCK}"
    if block_type(fmt) in FP4_BLOCKS:
        qtype = block_type(fmt)
        return None if in_features % FP4_BLOCKS[qtype] == 0 else \
            f"rows of {in_features} columns are not whole {qtype} blocks of {FP4_BLOCKS[qtype]}"
    if in_features % BLOCK:
        return f"rows of {in_features} columns are not whole blocks of {BLOCK}"
    gs = group_layout(in_features, fmt.group_size).group_size
    if gs % BLOCK:
        return f"group size {fmt.group_size} is not a multiple of {BLOCK}, so a block would straddle two scales"
    return None


def _fmt_name(fmt) -> str:
    spec = fmt.spec()
    tag = preset_tag(spec)   # a format whose name fixes its settings (q4_k, mxfp4)
    if tag is not None:
        return tag
    sym = spec.get("sym")
    desc = f"{spec['format']}{spec.get('bits', '')}" + ("" if sym is None else (" sym" if sym else " asym"))
    return f"{desc} g{fmt.group_size}"


def block_params(codes: torch.Tensor, params: dict[str, torch.Tensor], fmt) -> tuple:
    """Per-block view of a lowbit int weight: ``(codes (rows, in), scale (rows, nb), zero (rows, nb) or None)``.

    ``params`` are lowbit's per-group ``(rows, n_groups)`` tensors; block ``k`` covers columns
    ``32k .. 32k+31`` and takes the parameters of the group holding them.
    """
    rows, in_f = codes.shape
    gs = group_layout(in_f, fmt.group_size).group_size
    group_of_block = torch.arange(0, in_f, BLOCK) // gs
    scale = params["scale"][:, group_of_block]
    zero = None if fmt.sym else params["zero"][:, group_of_block]
    return codes, scale, zero


def pack_blocks(qtype: str, codes, scale, zero=None) -> np.ndarray:
    """ggml blocks of type ``qtype`` for lowbit codes, as uint8 ``(rows, n_blocks * bytes_per_block)``.

    ``codes``: ``(rows, in)`` integers in ``[0, 2**bits)``; ``scale``/``zero``: ``(rows, in/32)`` per block (an
    fp16 scale, an integer zero point for the asymmetric types). Block layouts (little endian):
    Q4_0 ``d, qs[16]``; Q4_1 ``d, m, qs[16]``; Q5_0 ``d, qh[4], qs[16]``; Q5_1 ``d, m, qh[4], qs[16]``;
    Q8_0 ``d, qs[32] (int8)``. ``qs[j]`` holds element ``j`` in its low nibble and ``j + 16`` in its high
    nibble; bit ``j`` of ``qh`` (a uint32) is bit 4 of element ``j``.
    """
    codes = np.asarray(codes, dtype=np.int64)
    rows, in_f = codes.shape
    nb = in_f // BLOCK
    c = codes.reshape(rows, nb, BLOCK)
    d = np.asarray(scale, dtype=np.float32).astype(np.float16).reshape(rows, nb, 1).view(np.uint8)  # (rows, nb, 2)
    parts = [d]
    if qtype in ("Q4_1", "Q5_1"):
        m = -np.asarray(zero, dtype=np.float32) * np.asarray(scale, dtype=np.float32)  # exact in fp32: 16 bits
        parts.append(m.astype(np.float16).reshape(rows, nb, 1).view(np.uint8))
    if qtype == "Q8_0":
        parts.append((c - 128).astype(np.int8).view(np.uint8))
    else:
        if qtype in ("Q5_0", "Q5_1"):
            parts.append(np.packbits(((c >> 4) & 1).astype(np.uint8), axis=-1, bitorder="little"))  # (rows, nb, 4)
        lo = (c & 0xF).astype(np.uint8)
        parts.append(lo[..., :BLOCK // 2] | (lo[..., BLOCK // 2:] << 4))  # (rows, nb, 16)
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def qk_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order that turns Hugging Face's rotary layout into llama.cpp's, for ``rows = n_head * head_dim``.

    Per head, HF rotates pairs ``(i, i + d/2)``; llama.cpp rotates ``(2i, 2i + 1)``. New row ``2i + j`` of a
    head is old row ``i + j * d/2``.
    """
    half = rows // n_head // 2
    return torch.arange(rows).view(n_head, 2, half).transpose(1, 2).reshape(-1)


# ------------------------------------------------------------------------------------------------ tensor plan


@dataclass
class PlannedTensor:
    """One GGUF tensor: its name, its data as written (a uint8 byte view for block types) and the ggml type."""

    name: str
    data: np.ndarray
    qtype: str


def _quantized_modules(model) -> dict:
    """``{module name: module}`` for every packed module (anything with a ``spec`` and a float weight)."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "spec") and hasattr(m, "dequantize_weight")}


def _float_tensor(name: str, w: torch.Tensor, storage: str) -> PlannedTensor:
    """A float tensor at the checkpoint's storage precision; F32 for 1-D ones (norms, biases), as llama.cpp's
    converter writes them."""
    w = w.detach().float().cpu()
    qtype = "F32" if w.dim() < 2 or storage == "float32" else {"bfloat16": "BF16"}.get(storage, "F16")
    if qtype == "BF16":
        data = _gguf().quants.quantize(w.numpy(), _gguf().GGMLQuantizationType.BF16)
    else:
        data = w.numpy().astype(np.float16 if qtype == "F16" else np.float32)
    return PlannedTensor(name, data, qtype)


def _block_tensor(name: str, qmod, perm: torch.Tensor | None, in_blocks: bool = True) -> list[PlannedTensor] | str:
    """The packed weight of ``qmod`` on its ggml block grid (and an NVFP4 weight's per-tensor scale), or why it
    has none. ``in_blocks``: a decoder-block linear (not the embedding or head)."""
    spec = qmod.spec
    if spec.get("codec") != "scalar":
        return f"codec {spec.get('codec', type(qmod).__name__)!r} has no llama.cpp block type"
    fmt = make_format(spec["format"])
    why = _why_not(fmt, spec["in_features"])
    if why is not None:
        return why
    if isinstance(fmt, NVFP4Format) and not in_blocks:
        # llama.cpp fails to load a token_embd.scale and gives NaN logits with an NVFP4 output (llama-cpp-python 0.3.36)
        return "llama.cpp applies NVFP4's per-tensor scale only to the decoder-block linears, not the embedding or head"
    qw = qmod.codec.to_quantized_weight(qmod.packed_buffers(), spec)
    if isinstance(fmt, (KQuantFormat, MXFormat, NVFP4Format)):
        codes, params = qw.codes, qw.params
        if perm is not None:
            codes, params = codes[perm], {k: v[perm] for k, v in params.items()}
        if isinstance(fmt, KQuantFormat):
            return [PlannedTensor(name, pack_kblocks(fmt, codes, params), fmt.ktype.ggml)]
        if isinstance(fmt, MXFormat):   # mxfp4, the one MX type with a ggml type
            return [PlannedTensor(name, pack_mxfp4(codes, params["shared_exp"]), "MXFP4")]
        out = [PlannedTensor(name, pack_nvfp4(codes, params["block_scale"]), "NVFP4")]
        g = params["tensor_scale"].reshape(-1)[:1].float().numpy()
        if g[0] != 1.0:   # llama.cpp's converter leaves a scale of 1 out
            out.append(PlannedTensor(name.removesuffix(".weight") + ".scale", g.astype(np.float32), "F32"))
        return out
    codes, scale, zero = block_params(qw.codes, qw.params, fmt)
    if perm is not None:  # rows are independent blocks: permuting them moves codes and scales together
        codes, scale = codes[perm], scale[perm]
        zero = None if zero is None else zero[perm]
    qtype = block_type(fmt)
    return [PlannedTensor(name, pack_blocks(qtype, codes, scale, zero), qtype)]


def tensor_plan(model, meta: dict, allow_f16: bool = False) -> list[PlannedTensor]:
    """Every tensor of ``model`` as it will be written, checked before anything is written.

    Raises one :class:`ConfigError` naming every quantized weight without an exact block type (unless
    ``allow_f16``) and every tensor llama.cpp has no name for.
    """
    gguf = _gguf()
    arch = gguf_arch(model)
    norm_offset = arch_for(model).norm_offset
    cfg = model.config
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], cfg.num_hidden_layers)
    storage = meta.get("storage_dtype", "float16")
    qmods = _quantized_modules(model)
    heads = {gguf.MODEL_TENSOR.ATTN_Q: cfg.num_attention_heads,
             gguf.MODEL_TENSOR.ATTN_K: getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads}

    plan, unnamed, seen, done = [], [], set(), set()
    refused: dict[str, list[str]] = {}  # reason -> modules
    for key, t in model.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        qmod = qmods.get(mod) if leaf != "bias" else None
        if qmod is not None:  # its packed buffers stand for one weight
            if mod in done:
                continue
            done.add(mod)
            key = f"{mod}.weight"
        elif t.numel():
            ident = (t.data_ptr(), t.numel(), tuple(t.shape))
            if ident in seen:  # a tied weight (the head sharing the embedding): llama.cpp reuses token_embd
                continue
            seen.add(ident)
        found = tmap.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if found is None:
            unnamed.append(key)
            continue
        kind, name = found
        rows = qmod.spec["out_features"] if qmod is not None else t.shape[0]
        perm = qk_permutation(rows, heads[kind]) if arch.permute_qk and kind in heads else None

        if qmod is None:
            w = t.detach().float()
            if norm_offset and kind.name.endswith("NORM"):
                w = w + norm_offset
            plan.append(_float_tensor(name, w if perm is None else w[perm], storage))
            continue
        planned = _block_tensor(name, qmod, perm, kind not in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT))
        if not isinstance(planned, str):
            plan.extend(planned)
        elif allow_f16:
            w = qmod.dequantize_weight().float()
            plan.append(_float_tensor(name, w if perm is None else w[perm], "float16"))
        else:
            refused.setdefault(planned, []).append(mod)

    if unnamed:
        raise ConfigError(f"llama.cpp's {arch.name} architecture has no tensor for: {', '.join(unnamed)}")
    unknown = sorted({p.qtype for p in plan} - set(gguf.GGMLQuantizationType.__members__))
    if unknown:
        raise ConfigError(f"the installed gguf package has no {', '.join(unknown)} type: pip install -U gguf "
                          "(0.19 has MXFP4 and NVFP4)")
    if refused:
        lines = [f"{why}: {', '.join(mods[:4])}" + (f" and {len(mods) - 4} more" if len(mods) > 4 else "")
                 for why, mods in refused.items()]
        raise ConfigError(
            "these quantized weights have no exact llama.cpp block type:\n  " + "\n  ".join(lines)
            + f"\nformats that map exactly (int: group size a multiple of {BLOCK} or per channel, rows a multiple "
              f"of {BLOCK} wide; kquant: rows a multiple of {SUPER_BLOCK} wide; mxfp4, nvfp4: rows a multiple of "
              f"{MXFP4_BLOCK}, {NVFP4_BLOCK} wide): " + ", ".join(MAPS)
            + "; or export with allow_f16=True to store them dequantized as F16")
    return plan


# ------------------------------------------------------------------------------------------------ tokenizer


@dataclass
class TokenizerFiles:
    """What the vocabulary is built from: ``tokenizer.json``, ``tokenizer_config.json`` and a chat template."""

    spec: dict
    config: dict
    chat_template: str | None


def read_tokenizer(source) -> TokenizerFiles:
    """The tokenizer of a checkpoint folder (path) or of a transformers fast tokenizer object."""
    if source is None:
        raise ConfigError("GGUF export needs the tokenizer: pass tokenizer=CHECKPOINT_FOLDER (it holds tokenizer.json)")
    if hasattr(source, "backend_tokenizer"):
        config = {f"{t}_token": getattr(source, f"{t}_token", None) for t in ("bos", "eos", "unk", "pad")}
        template = getattr(source, "chat_template", None)
        return TokenizerFiles(json.loads(source.backend_tokenizer.to_str()), config,
                              template if isinstance(template, str) else None)
    folder = Path(source)
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise ConfigError(f"{folder} has no tokenizer.json: llama.cpp needs the vocabulary; export a checkpoint "
                          "saved with its tokenizer (lowbit quantize ... --out DIR writes it)")
    spec = json.loads(tj.read_text(encoding="utf-8"))
    tc = folder / "tokenizer_config.json"
    config = json.loads(tc.read_text(encoding="utf-8")) if tc.is_file() else {}
    template = config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif template is None and (folder / "chat_template.json").is_file():
        template = json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    return TokenizerFiles(spec, config, template if isinstance(template, str) else None)


#: tokenizers' pre-tokenizer regexes that llama.cpp knows by name
_SPLIT_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}


def _steps(node) -> list[dict]:
    if not node:
        return []
    for key in ("pretokenizers", "normalizers", "processors"):
        if node.get("type") == "Sequence" and key in node:
            return [s for n in node[key] for s in _steps(n)]
    return [node]


def bpe_pre_name(spec: dict) -> str:
    """llama.cpp's name for a byte-level BPE's pre-tokenizer (its ``tokenizer.ggml.pre``)."""
    steps = _steps(spec.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = _SPLIT_PRE.get((steps[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise ConfigError(f"llama.cpp has no pre-tokenizer known to match this tokenizer's ({json.dumps(steps)[:300]}); "
                      "pass tokenizer_pre=NAME (a name llama.cpp knows) if you know the right one")


def _content(entry) -> str | None:
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _flag(value, default: bool) -> bool:
    return value if isinstance(value, bool) else default


def tokenizer_metadata(tok: TokenizerFiles, model_config, n_vocab: int, pre: str | None = None) -> dict:
    """GGUF tokenizer fields: ``{"model", "pre", "tokens", "types", "scores" | "merges", special ids, flags}``.

    The token list has exactly ``n_vocab`` entries (the embedding's rows); ids the tokenizer does not use are
    filled with unused ``[PAD<id>]`` tokens, as llama.cpp's converter does.
    """
    gguf = _gguf()
    TT = gguf.TokenType
    spec = tok.spec
    bpe = spec.get("model", {})
    if bpe.get("type") != "BPE":
        raise ConfigError(f"GGUF export writes BPE tokenizers; this one is {bpe.get('type')!r}")
    by_id: dict[int, str] = {i: t for t, i in bpe["vocab"].items()}
    special: set[int] = set()
    user: set[int] = set()
    for a in spec.get("added_tokens", []):
        by_id[a["id"]] = a["content"]
        (special if a.get("special") else user).add(a["id"])
    if by_id and max(by_id) >= n_vocab:
        raise ConfigError(f"the tokenizer has token id {max(by_id)} but the embedding has only {n_vocab} rows")

    spm = bool(bpe.get("byte_fallback"))

    def entry(i: int) -> tuple[str, object, float]:
        t = by_id.get(i)
        if t is None:
            return f"[PAD{i}]", TT.UNUSED, -1000.0
        if i in special:
            return t, TT.CONTROL, -1000.0
        if i in user:
            return t, TT.USER_DEFINED, -1000.0
        if spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            return t, TT.BYTE, 0.0
        # SentencePiece pieces are ranked by id and llama.cpp merges the highest score first: -id keeps the order
        return t, TT.NORMAL, -float(i)

    tokens, types, scores = (list(c) for c in zip(*(entry(i) for i in range(n_vocab))))
    out: dict = {"tokens": tokens, "types": types}
    if spm:
        norms = _steps(spec.get("normalizer"))
        if not any(n.get("type") == "Replace" and n.get("content") == "\u2581" for n in norms):
            raise ConfigError("this BPE tokenizer has byte fallback but does not write spaces as '\u2581': it is not "
                              "SentencePiece-style, and llama.cpp has no tokenizer for it")
        out.update(model="llama", pre="default", scores=scores,
                   add_space_prefix=any(n.get("type") == "Prepend" for n in norms))
    else:
        merges = []
        for m in bpe.get("merges", []):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            # llama.cpp splits a merge at its one space; a space inside a part is written as its byte-level 'Ġ'
            merges.append(f"{a.replace(' ', chr(288))} {b.replace(' ', chr(288))}")
        out.update(model="gpt2", pre=pre or bpe_pre_name(spec), merges=merges)

    def token_id(typ: str) -> int | None:
        text = _content(tok.config.get(f"{typ}_token"))
        ids = [i for i, t in by_id.items() if t == text] if text is not None else []
        if ids:
            return min(ids)
        tid = getattr(model_config, f"{typ}_token_id", None)
        return tid if isinstance(tid, int) and 0 <= tid < n_vocab else None

    out["special"] = {typ: token_id(typ) for typ in ("bos", "eos", "unk", "pad")}
    single = [s for p in _steps(spec.get("post_processor")) if p.get("type") == "TemplateProcessing"
              for s in p.get("single", [])]
    firsts = (single[:1] or [{}])[0].get("SpecialToken", {}).get("id")
    lasts = (single[-1:] or [{}])[0].get("SpecialToken", {}).get("id")
    bos_text, eos_text = _content(tok.config.get("bos_token")), _content(tok.config.get("eos_token"))
    # tokenizer_config's add_*_token wins over what the post-processor template implies, as in transformers
    out["add_bos"] = _flag(tok.config.get("add_bos_token"), firsts is not None and firsts == bos_text)
    out["add_eos"] = _flag(tok.config.get("add_eos_token"), lasts is not None and lasts == eos_text and len(single) > 1)
    out["chat_template"] = tok.chat_template
    return out


# ------------------------------------------------------------------------------------------------ metadata


def _rope(cfg, arch: GGUFArch) -> float:
    """The (global) rotary base; ConfigError for rotary scalings the export does not write."""
    rp = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", 10000.0)}
    per_type = rp if "full_attention" in rp else {"full_attention": rp}
    for typ, p in per_type.items():
        if p.get("rope_type", "default") != "default":
            raise ConfigError(f"rotary scaling {p.get('rope_type')!r} ({typ}) is not written by the GGUF export")
    if arch.sliding and "sliding_attention" in per_type:
        local = per_type["sliding_attention"].get("rope_theta")
        if local != GEMMA3_LOCAL_ROPE_BASE:
            raise ConfigError(f"llama.cpp gives gemma3's local layers rotary base {GEMMA3_LOCAL_ROPE_BASE:g}; "
                              f"this model uses {local}")
    return float(per_type["full_attention"]["rope_theta"])


def _check_sliding(cfg) -> None:
    """Gemma-3 as llama.cpp builds it: the fixed local/global pattern and 1/sqrt(head_dim) attention scaling."""
    types = getattr(cfg, "layer_types", None) or []
    want = ["full_attention" if (i + 1) % GEMMA3_GLOBAL_EVERY == 0 else "sliding_attention" for i in range(len(types))]
    if types != want:
        raise ConfigError(f"llama.cpp makes every {GEMMA3_GLOBAL_EVERY}th gemma3 layer global; this model's layer "
                          f"types are {types}")
    if getattr(cfg, "query_pre_attn_scalar", cfg.head_dim) != cfg.head_dim:
        raise ConfigError(f"llama.cpp scales gemma3 attention by 1/sqrt(head_dim={cfg.head_dim}); this model uses "
                          f"query_pre_attn_scalar={cfg.query_pre_attn_scalar}")
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise ConfigError("llama.cpp's gemma3 has no attention logit soft-capping; this model sets it")


def _write_metadata(w, model, meta: dict, arch: GGUFArch, plan: list[PlannedTensor], tok: dict, name: str) -> None:
    gguf = _gguf()
    cfg = model.config
    n_head = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    if arch.sliding:
        _check_sliding(cfg)
    w.add_name(name)
    w.add_quantized_by(f"lowbit {__version__}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or n_head)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(_rope(cfg, arch))
    w.add_rope_dimension_count(head_dim)
    if head_dim * n_head != cfg.hidden_size or arch.sliding:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if arch.sliding:
        w.add_sliding_window(cfg.sliding_window)
        if getattr(cfg, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)

    # the file type names the block type most linears use (llama.cpp only shows it)
    common = Counter(p.qtype for p in plan if p.data.ndim == 2).most_common(1)
    ftype = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q3_K": "MOSTLY_Q3_K_S",
             "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S", "MXFP4": "MOSTLY_MXFP4_MOE"}.get(common[0][0], f"MOSTLY_{common[0][0]}")
    w.add_file_type(gguf.LlamaFileType[ftype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    recipe = (meta.get("summary") or {}).get("recipe")
    if recipe:
        w.add_string("lowbit.recipe", json.dumps(recipe, sort_keys=True))

    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if "scores" in tok:
        w.add_token_scores(tok["scores"])
        w.add_add_space_prefix(tok["add_space_prefix"])
    if "merges" in tok:
        w.add_token_merges(tok["merges"])
    for typ, tid in tok["special"].items():
        if tid is not None:
            getattr(w, f"add_{typ}_token_id")(tid)
    w.add_add_bos_token(bool(tok["add_bos"]))
    w.add_add_eos_token(bool(tok["add_eos"]))
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])


# ------------------------------------------------------------------------------------------------ export


OUTPUT = "file"   # one .gguf file (lowbit.export writes it atomically)


def export(model, meta: dict, out, *, tokenizer=None, allow_f16: bool = False, name: str | None = None,
           tokenizer_pre: str | None = None) -> Path:
    """Write ``model`` (a loaded lowbit checkpoint) as a llama.cpp GGUF file at ``out``; returns ``out``.

    ``meta``: the checkpoint's ``lowbit.json`` dict (storage precision, recipe). ``tokenizer``: the checkpoint
    folder (its ``tokenizer.json``, ``tokenizer_config.json``, chat template) or a transformers fast tokenizer.
    ``allow_f16``: store quantized weights without an exact block type dequantized as F16 instead of refusing.
    ``name``: ``general.name`` (default: the file name). ``tokenizer_pre``: llama.cpp's pre-tokenizer name for
    a byte-level BPE when it is not recognised. Everything is checked before the file is written, and the file
    appears at ``out`` only once complete.
    """
    gguf = _gguf()
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{out} is a folder; the GGUF export writes one file: pass a path like {out}/model.gguf")
    arch = gguf_arch(model)
    plan = tensor_plan(model, meta, allow_f16=allow_f16)
    tokenizer = tokenizer if tokenizer is not None else meta.get("checkpoint")
    tok = tokenizer_metadata(read_tokenizer(tokenizer), model.config, model.config.vocab_size, pre=tokenizer_pre)
    name = name or (Path(str(meta["source_model"])).name if meta.get("source_model") else out.stem)

    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch.name)
        _write_metadata(w, model, meta, arch, plan, tok, name)
        for p in plan:
            w.add_tensor(p.name, p.data, raw_dtype=gguf.GGMLQuantizationType[p.qtype])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    log.info("wrote %s (%d tensors, %.1f MB)", out, len(plan), out.stat().st_size / 1e6)
    return out
