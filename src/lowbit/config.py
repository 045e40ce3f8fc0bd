"""Config dataclasses shared by the library and the CLI (one source of defaults).

CLI flags are generated from these dataclasses (see :mod:`lowbit.cli.args`),
so a default lives in exactly one place. Every config round-trips through
JSON (``asdict`` / ``from_dict``) and is recorded in checkpoints and results.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

from .errors import ConfigError

CONFIG_VERSION = 1


def from_dict(cls, d: dict | None):
    """Build dataclass ``cls`` from a dict, rejecting unknown keys clearly."""
    d = dict(d or {})
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
    return cls(**d)


@dataclass(frozen=True)
class FormatConfig:
    """Number format of the quantized weights."""

    format: str = "int"       # int | fp | nf (asymmetric = two scales for fp/nf)
    bits: int = 4             # bits per weight code
    group_size: int = 128     # columns per group; -1 = one group per output channel
    sym: bool = False         # symmetric (one scale) instead of asymmetric

    def __post_init__(self):
        if not isinstance(self.group_size, int) or (self.group_size <= 0 and self.group_size != -1):
            raise ConfigError(
                f"--group-size must be a positive number of columns or -1 (per output channel), got {self.group_size}"
            )
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 16:
            raise ConfigError(f"--bits must be an integer between 1 and 16, got {self.bits!r}")

    def make(self):
        from .formats import make_format

        return make_format(asdict(self))

    def tag(self) -> str:
        """Short readable name, e.g. ``fp4-g128`` (two-scale/asymmetric), ``int4-sym-g128``, ``nf3-pc``.

        The inverse of :func:`parse_format_tag`.
        """
        g = "pc" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.format}{self.bits}{'-sym' if self.sym else ''}-{g}"


@dataclass(frozen=True)
class StorageConfig:
    """How tensors that are not quantized are stored."""

    dtype: str = "float16"    # float16 | bfloat16 | float32

    def __post_init__(self):
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"storage dtype must be float16, bfloat16 or float32, got {self.dtype!r}")


_TAG = re.compile(r"^(?P<fmt>[a-z]+?)(?P<bits>\d+)(?P<sym>-sym)?(?:-(?:g(?P<g>\d+)|(?P<pc>pc)))?$")


def parse_format_tag(tag: str, default_group: int = -1) -> FormatConfig:
    """``int8``, ``int4-g128``, ``int4-sym-g64``, ``int8-pc`` -> FormatConfig."""
    m = _TAG.match(tag.strip().lower())
    if not m:
        raise ConfigError(f"cannot read format {tag!r}; write it like int8, int4-g128 or int4-sym-g64 (pc = per row)")
    g = -1 if m["pc"] else int(m["g"]) if m["g"] else default_group
    return FormatConfig(format=m["fmt"], bits=int(m["bits"]), group_size=g, sym=bool(m["sym"]))
