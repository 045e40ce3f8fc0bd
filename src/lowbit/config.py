"""Config dataclasses shared by the library and the CLI (one source of defaults).

CLI flags are generated from these dataclasses (see :mod:`lowbit.cli.args`),
so a default lives in exactly one place. Every config round-trips through
JSON (``asdict`` / ``from_dict``) and is recorded in checkpoints and results.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

from .errors import ConfigError


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

    format: str = "int"       # int | fp | nf (asymmetric = two scales for fp/nf) | a K-quant: q2_k q3_k q4_k q5_k q6_k | a block format: mxfp4 mxfp6_e2m3 mxfp6_e3m2 mxfp8_e4m3 mxfp8_e5m2 mxint8 nvfp4 | e8p (lattice, --sym, bits 2-4)
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

        The inverse of :func:`parse_format_tag`. A format whose name fixes its settings is its tag (``q4_k``,
        ``mxfp4``).
        """
        from .formats import preset_tag

        tag = preset_tag(asdict(self))
        if tag is not None:
            return tag
        g = "pc" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.format}{self.bits}{'-sym' if self.sym else ''}-{g}"


@dataclass(frozen=True)
class StorageConfig:
    """How tensors that are not quantized are stored."""

    dtype: str = "float16"    # float16 | bfloat16 | float32

    def __post_init__(self):
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"storage dtype must be float16, bfloat16 or float32, got {self.dtype!r}")


@dataclass(frozen=True)
class RotationConfig:
    """A function-preserving rotation of the float model's residual stream before quantizing (docs/methods.md)."""

    rotate: str = "none"   # none | hadamard: rotate the residual stream by a seeded random Hadamard matrix first
    rotate_seed: int = 0   # seed of the rotation's random signs

    def __post_init__(self):
        if self.rotate not in ("none", "hadamard"):
            raise ConfigError(f"--rotate must be none or hadamard, got {self.rotate!r}")
        if not isinstance(self.rotate_seed, int) or isinstance(self.rotate_seed, bool):
            raise ConfigError(f"--rotate-seed must be an integer, got {self.rotate_seed!r}")
        if self.rotate == "none" and self.rotate_seed != 0:
            raise ConfigError("--rotate-seed seeds a rotation: add --rotate hadamard, or drop --rotate-seed")


BLOCK_TUNE_MODES = ("none", "lwc", "lwc+scale", "ap")
#: the step sizes each block-tuning mode uses
_BLOCK_TUNE_LRS = {"none": (), "lwc": ("block_tune_lr",), "lwc+scale": ("block_tune_lr", "block_tune_scale_lr"),
                   "ap": ("block_tune_scale_lr", "block_tune_weight_lr")}


@dataclass(frozen=True)
class BlockTuneConfig:
    """Block-wise reconstruction after the solver: each decoder block's quantizer tuned against the float block's
    outputs on the calibration windows (docs/methods.md). Defaults: OmniQuant (clipping step size), EfficientQAT's
    Block-AP (epochs, batch, scale and weight step sizes)."""

    block_tune: str = "none"                                                # none | lwc (learnable clipping) | lwc+scale (also scales and zeros) | ap (weights, scales and zeros)
    block_tune_epochs: int = field(default=2, metadata={"min": 1})          # passes over the calibration windows per block
    block_tune_batch: int = field(default=2, metadata={"min": 1})           # calibration windows per step (at most 8)
    block_tune_lr: float = 1e-2                                             # Adam step size of the clipping strengths (lwc, lwc+scale)
    block_tune_scale_lr: float = 1e-4                                       # Adam step size of the scales and zero points (lwc+scale, ap)
    block_tune_weight_lr: float = 1e-5                                      # Adam step size of the weights (ap)

    def __post_init__(self):
        if self.block_tune not in BLOCK_TUNE_MODES:
            raise ConfigError(f"--block-tune must be one of {', '.join(BLOCK_TUNE_MODES)}, got {self.block_tune!r}")
        for name in ("block_tune_epochs", "block_tune_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("block_tune_lr", "block_tune_scale_lr", "block_tune_weight_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {v!r}")
        # a setting the chosen mode does not use is an error, not silently ignored
        used = _BLOCK_TUNE_LRS[self.block_tune]
        common = ("block_tune_epochs", "block_tune_batch") if self.block_tune != "none" else ()
        for f in fields(self):
            if f.name != "block_tune" and f.name not in used + common and getattr(self, f.name) != f.default:
                flag = "--" + f.name.replace("_", "-")
                if self.block_tune == "none":
                    raise ConfigError(f"{flag} sets block tuning: add --block-tune lwc|lwc+scale|ap, or drop {flag}")
                raise ConfigError(f"{flag} is not used by --block-tune {self.block_tune} (it is used by "
                                  f"{', '.join(m for m in BLOCK_TUNE_MODES if f.name in _BLOCK_TUNE_LRS[m])}); drop it")

    @property
    def enabled(self) -> bool:
        return self.block_tune != "none"


#: the formats a budgeted (mixed-precision) recipe chooses from, by default: RTN-able integer formats
MIX_CANDIDATES = ("int2-g64", "int2-g128", "int3-g64", "int3-g128", "int4-g64", "int4-g128", "int8-g128")


@dataclass(frozen=True)
class MixConfig:
    """A size budget: one format per tensor, chosen to minimise the summed predicted damage (docs/mixed.md).

    Exactly one of ``target_bpw`` and ``target_mb``. ``target_bpw`` counts the decoder-block linears (the bpw
    ``blocks`` total), or with ``all_in`` every stored tensor over the parameter count; ``target_mb`` counts every
    stored tensor in MB (10^6 bytes). With ``all_in`` or ``target_mb`` the embedding and head are chosen too
    (each candidate or kept at the storage dtype), unless ``--embed``/``--head`` fix them.
    """

    target_bpw: float | None = None                   # bits per weight the plan may take at most
    all_in: bool = False                              # target_bpw counts every stored tensor (bpw all-in)
    target_mb: float | None = None                    # MB (10^6 bytes) the stored tensors may take at most
    candidates: tuple[str, ...] = MIX_CANDIDATES      # format tags a tensor may take
    damage: str = "relative"                          # relative: output error over the tensor's output energy | absolute

    def __post_init__(self):
        object.__setattr__(self, "candidates", tuple(self.candidates))   # JSON gives a list
        if (self.target_bpw is None) == (self.target_mb is None):
            raise ConfigError("a size budget is either --target-bpw or --target-mb, not both or neither")
        for name in ("target_bpw", "target_mb"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {v!r}")
        if self.all_in and self.target_bpw is None:
            raise ConfigError("--all-in says how --target-bpw counts; --target-mb already counts every tensor")
        if self.damage not in ("relative", "absolute"):
            raise ConfigError(f"--mix-damage must be relative or absolute, got {self.damage!r}")
        if not self.candidates:
            raise ConfigError("--mix-candidates needs at least one format, e.g. int3-g128,int4-g128")
        for tag in self.candidates:
            parse_format_tag(tag).make()   # a bad tag fails here, before any model loads

    def formats(self) -> dict[str, "FormatConfig"]:
        """``{tag: FormatConfig}`` of the candidates, in the order given."""
        return {tag: parse_format_tag(tag) for tag in self.candidates}

    @property
    def counts_all(self) -> bool:
        """Whether the budget counts every stored tensor (so the embedding and head are chosen too)."""
        return self.all_in or self.target_mb is not None

    def tag(self) -> str:
        """``mix=3.5bpw``, ``mix=3.5bpw-all-in`` or ``mix=40mb`` (``-abs`` for absolute damage, then the candidates
        when they are not the default ones)."""
        t = f"{self.target_mb:g}mb" if self.target_mb is not None else f"{self.target_bpw:g}bpw"
        cands = "" if self.candidates == MIX_CANDIDATES else "-" + "+".join(self.candidates)
        return f"mix={t}{'-all-in' if self.all_in else ''}{'-abs' if self.damage == 'absolute' else ''}{cands}"


@dataclass(frozen=True)
class CalibConfig:
    """Calibration windows for methods that need data (recorded in checkpoints and results as ``calib``)."""

    source: str = field(default="wiki-train", metadata={"flag": "calib"})         # text source for calibration
    nsamples: int = field(default=128, metadata={"min": 1})                      # calibration windows
    seqlen: int = field(default=512, metadata={"flag": "calib_seqlen", "min": 2})  # tokens per calibration window
    seed: int = 0                                                                # calibration sampling seed

    def __post_init__(self):
        if not isinstance(self.nsamples, int) or self.nsamples < 1:
            raise ConfigError(f"--nsamples must be at least 1, got {self.nsamples!r}")
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise ConfigError(f"--calib-seqlen must be at least 2, got {self.seqlen!r}")


@dataclass(frozen=True)
class EvalConfig:
    """What a run evaluates: perplexity corpora and windows, and zero-shot tasks (docs/evaluation.md)."""

    ppl: tuple[str, ...] = ("wiki",)   # corpora for perplexity
    seqlen: int = 512                  # tokens per window
    windows: int | None = 40           # number of windows; None = every window
    tasks: tuple[str, ...] = ()        # zero-shot tasks (names; empty = none)
    limit: int | None = 200            # items per zero-shot task, seeded subset; None = every item

    def __post_init__(self):
        if isinstance(self.ppl, str) or isinstance(self.tasks, str):
            raise ConfigError("EvalConfig.ppl and .tasks are tuples of names, e.g. ppl=('wiki',)")
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise ConfigError(f"--seqlen must be at least 2, got {self.seqlen!r}")
        if self.windows is not None and (not isinstance(self.windows, int) or self.windows < 1):
            raise ConfigError(f"--windows must be a positive number or 'all', got {self.windows!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ConfigError(f"--limit must be a positive number or 'full', got {self.limit!r}")


_KTAG = re.compile(r"^q(?P<bits>\d+)_k$")


def kquant_config(bits: int) -> FormatConfig:
    """The FormatConfig of the K-quant type with ``bits``-bit codes: its sub-block size and symmetry are fixed."""
    from .formats.kquant import KTYPES, ktag

    kt = KTYPES.get(bits)
    if kt is None:
        raise ConfigError(f"K-quant types are {', '.join(ktag(b) for b in KTYPES)}; there is no {ktag(bits)}")
    return FormatConfig("kquant", bits, kt.sub, kt.sym)


def format_fields(given: dict) -> dict:
    """FormatConfig fields from the flags given: a format whose name fixes its settings (``format: q4_k``,
    ``mxfp4``; or ``format: kquant`` with ``bits``) brings its bits, group size and symmetry; a flag given with
    another value is a ConfigError naming it."""
    from .formats import preset

    fmt = given.get("format")
    m = _KTAG.match(fmt.strip().lower()) if isinstance(fmt, str) else None
    ref = preset(fmt.strip().lower()) if isinstance(fmt, str) else None
    if ref is None and (m is not None or fmt == "kquant"):
        bits = int(m["bits"]) if m else given.get("bits")
        if bits is None:
            raise ConfigError("--format kquant needs --bits (2 to 6), or name the type: --format q4_k")
        ref = asdict(kquant_config(bits))
    if ref is None:
        return dict(given)
    tag = FormatConfig(**ref).tag()
    for key in ("bits", "group_size", "sym"):
        if key in given and given[key] != ref[key]:
            raise ConfigError(f"{tag} fixes --{key.replace('_', '-')} to {ref[key]}; drop "
                              f"--{key.replace('_', '-')} {given[key]}")
    return ref


_TAG = re.compile(r"^(?P<fmt>[a-z][a-z0-9]*?)(?P<bits>\d+)(?P<sym>-sym)?(?:-(?:g(?P<g>\d+)|(?P<pc>pc)))?$")


def parse_format_tag(tag: str, default_group: int = -1) -> FormatConfig:
    """``int8``, ``int4-g128``, ``int4-sym-g64``, ``int8-pc``, ``q4_k``, ``mxfp4`` -> FormatConfig."""
    from .formats import preset

    fixed = preset(tag.strip().lower())
    if fixed is not None:
        return FormatConfig(**fixed)
    k = _KTAG.match(tag.strip().lower())
    if k:
        return kquant_config(int(k["bits"]))
    m = _TAG.match(tag.strip().lower())
    if not m:
        raise ConfigError(f"cannot read format {tag!r}; write it like int8, int4-g128, int4-sym-g64 (pc = per row), "
                          "q4_k or mxfp4")
    g = -1 if m["pc"] else int(m["g"]) if m["g"] else default_group
    return FormatConfig(format=m["fmt"], bits=int(m["bits"]), group_size=g, sym=bool(m["sym"]))
