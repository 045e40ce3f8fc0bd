"""Writing a transformers model folder: config.json, model.safetensors and the checkpoint's tokenizer files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..io.checkpoint import META_FILE, WEIGHTS_FILE

__all__ = ["write_folder"]


def write_folder(out: Path, meta: dict, tensors: dict[str, torch.Tensor],
                 quantization_config: dict | None = None) -> None:
    """Write a transformers folder into ``out`` (an empty temp folder).

    ``config.json`` is the checkpoint's, with ``dtype`` float16 and ``quantization_config`` set (None: a plain
    float model); ``model.safetensors`` holds ``tensors``; every other file of the checkpoint folder
    (tokenizer, generation config, chat template) is copied unchanged.
    """
    src = Path(meta["checkpoint"])
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in (META_FILE, WEIGHTS_FILE, "config.json"):
            shutil.copy2(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = "float16"
    if "torch_dtype" in config:   # the key before transformers 5
        config["torch_dtype"] = "float16"
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    _rope_theta_for_transformers4(config)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _rope_theta_for_transformers4(config: dict) -> None:
    """Write a plain ``rope_parameters``' theta also as ``rope_theta``, the key transformers 4 reads.

    transformers 5 saves the rotary base only inside ``rope_parameters``; a transformers 4 reader (the one whose
    vptq quantizer runs on CPU, and the engines pinned to it) then takes its default 10000, and a model trained
    with another base (SmolLM2: 100000) gives other logits. transformers 5 reads ``rope_parameters`` and keeps it.
    Other rope types and per-layer-type parameters (Gemma-3) are spelled differently in transformers 4 and are
    left as they are.
    """
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("rope_type", "default") == "default" and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
