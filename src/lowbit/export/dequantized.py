"""A plain float16 transformers folder from any checkpoint (``lowbit export CKPT --dequantize f16``).

Every quantized module becomes its dequantized weight rounded to float16 (``<name>.weight``); the config
carries no ``quantization_config``, so any engine loads it as a float model. Activation quantization
(W8A8) is not part of the folder: it holds the weights only.
"""
from __future__ import annotations

from pathlib import Path

from .folder import write_folder
from .layers import float_tensors

OUTPUT = "folder"


def export(model, meta: dict, out: Path) -> None:
    write_folder(Path(out), meta, float_tensors(model, packed=set()))
