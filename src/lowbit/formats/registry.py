"""Formats by name, so checkpoints and CLIs can rebuild them from a spec."""
from __future__ import annotations

from ..errors import ConfigError

_FORMATS: dict[str, type] = {}
#: tags that name a whole format spec (``q4_k``, ``mxfp4``): a format whose name fixes its settings
_PRESETS: dict[str, dict] = {}


def register_format(name: str, cls: type) -> None:
    _FORMATS[name] = cls


def format_names() -> list[str]:
    return sorted(_FORMATS)


def make_format(spec: dict):
    """Rebuild a format from its ``spec()`` dict (``{"format": name, ...fields}``)."""
    spec = dict(spec)
    name = spec.pop("format", None)
    if name not in _FORMATS:
        raise ConfigError(f"unknown number format {name!r}; known: {', '.join(format_names())}")
    return _FORMATS[name](**spec)


def register_preset(tag: str, spec: dict) -> None:
    """Let ``tag`` stand for the whole format ``spec`` (``{"format", "bits", "group_size", "sym"}``), as a
    ``--format`` value and a tag: ``q4_k``, ``mxfp4``."""
    _PRESETS[tag] = dict(spec)


def preset(tag: str) -> dict | None:
    """The format spec ``tag`` stands for, or None."""
    spec = _PRESETS.get(tag)
    return None if spec is None else dict(spec)


def preset_tag(spec: dict) -> str | None:
    """The tag standing for exactly ``spec``, or None."""
    return next((t for t, s in _PRESETS.items() if s == spec), None)


def preset_names() -> list[str]:
    return sorted(_PRESETS)
