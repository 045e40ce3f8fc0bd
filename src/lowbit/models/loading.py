"""Turn a model reference (zoo name, folder, .gguf file, hub id) into a loaded model."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from lowbit.cache import cache_dir
from lowbit.data.fetch import sha256_file
from lowbit.errors import CheckpointError, UnsupportedModelError
from lowbit.models.weights import from_pretrained_strict, refuse_pickle_only
from lowbit.models.zoo import ZOO, convert_gguf, model_dir, pull_model

log = logging.getLogger(__name__)


def _looks_like_path(ref: str) -> bool:
    """True for references that can only be file-system paths, never hub ids."""
    return (ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or "\\" in ref
            or ref.endswith((".gguf", ".safetensors", ".json")))


def gguf_cache_dir(sha256: str) -> Path:
    """Cache folder of a converted local GGUF, keyed by the file's sha256."""
    return cache_dir() / "models" / f"gguf-{sha256[:16]}"


def resolve_model(name_or_path: str) -> str | Path:
    """Map a model reference to something ``from_pretrained`` can load.

    - a zoo name (``smollm2-135m``) -> the converted folder, pulled if needed;
    - a folder with ``config.json`` and safetensors weights -> that folder (pickled weights are refused);
    - a ``*.gguf`` file -> converted once into the cache (keyed by its sha256);
    - anything else shaped like a hub id (``org/name``) -> returned unchanged.

    Raises CheckpointError for paths that do not exist or are not loadable.
    """
    ref = str(name_or_path)
    if ref in ZOO:
        return pull_model(ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is a folder without config.json; expected a "
                                  f"Hugging Face model folder")
        refuse_pickle_only(path)
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path} is a file but not a .gguf; pass a model folder, "
                                  f"a .gguf file or a zoo name ({', '.join(ZOO)})")
        digest = sha256_file(path, progress=True)
        return convert_gguf(path.resolve(), gguf_cache_dir(digest),
                            source={"local_gguf": str(path.resolve())}, sha256=digest)
    if _looks_like_path(ref):
        raise CheckpointError(f"model path {path} does not exist; pass a model folder, a "
                              f".gguf file, a hub id or a zoo name ({', '.join(ZOO)})")
    return ref


def local_weights_summary(name_or_path) -> tuple[int, dict] | None:
    """``(parameter count, config.json as a dict)`` of a model whose files are already here (an HF folder with
    safetensors weights, a zoo model already pulled), read from the safetensors headers without loading a
    weight; None for anything else (a GGUF file, a hub id, a zoo model not pulled yet, an unreadable file).
    Tied weights are stored once, so they count once."""
    from safetensors import SafetensorError, safe_open

    ref = str(name_or_path)
    folder = model_dir(ref) if ref in ZOO else Path(ref).expanduser()
    files = sorted(folder.glob("*.safetensors")) if (folder / "config.json").is_file() else []
    if not files:
        return None
    try:
        n = 0
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, SafetensorError, ValueError):
        return None   # a damaged file is refused, by name, when the model loads
    return n, config


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[torch.nn.Module, object]:
    """Load ``(model, tokenizer)`` for a zoo name, folder, .gguf file or hub id.

    The model is in eval mode on ``device`` with parameters in ``dtype``.
    Raises UnsupportedModelError when transformers does not know the
    architecture, CheckpointError when the reference cannot be loaded or its
    weights do not cover the model exactly (:mod:`lowbit.models.weights`).
    Only safetensors weights are read, never pickles.
    """
    from transformers import AutoConfig, AutoTokenizer

    source = resolve_model(str(name_or_path))
    try:
        config = AutoConfig.from_pretrained(source)
    except ValueError as exc:  # unknown model_type
        raise UnsupportedModelError(f"transformers cannot load {source}: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"could not load {name_or_path!r}: not a zoo name ({', '.join(ZOO)}), "
                              f"local folder or .gguf file, and the hub copy is unavailable "
                              f"({exc})") from exc
    try:
        model = from_pretrained_strict(source, config=config, dtype=dtype, use_safetensors=True)
    except ValueError as exc:  # config class has no causal-LM head
        raise UnsupportedModelError(f"{source} ({config.model_type}) is not a causal LM "
                                    f"transformers can load: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"could not load weights of {source}: {exc}") from exc
    tokenizer = AutoTokenizer.from_pretrained(source)
    model.to(device).eval()
    log.info("loaded %s (%s, %.1fM params)", source, config.model_type,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model, tokenizer
