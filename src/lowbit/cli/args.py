"""CLI flags generated from config dataclasses, so defaults live in one place."""
from __future__ import annotations

import argparse
import functools
import inspect
import re
import typing
from dataclasses import fields


__all__ = ["add_dataclass_args", "at_least", "dataclass_from_args", "int_at_least", "parse_shape", "windows_arg"]


def _flag(prefix: str, name: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+?)\s*$")


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """``{field: its trailing comment}`` from the dataclass source, the help text of its flags ({} without source)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        for line in lines:
            m = _FIELD_COMMENT.match(line)
            if m:
                docs[m.group(1)] = m.group(2)
    return docs


def add_dataclass_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls, prefix: str = "",
                       seen: dict | None = None) -> None:
    """Add one ``--flag`` per field of dataclass ``cls`` (bools as ``--x/--no-x``).

    ``seen`` maps flags already added to their defaults; a flag shared by two
    configs must have the same default in both, else this raises, so a
    default can never differ between configs silently.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in fields(cls):
        flag = _flag(prefix, f.metadata.get("flag", f.name))
        default = f.default
        if seen is not None:
            if flag in seen:
                if seen[flag] != default:
                    raise RuntimeError(f"{flag} has two different defaults: {seen[flag]!r} and {default!r}")
                continue
            seen[flag] = default
        typ = hints[f.name]
        help_ = f"{docs[f.name]} (default: {default})" if f.name in docs else f"(default: {default})"
        help_ = help_.replace("%", "%%")
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            conv = {int: int, float: float, str: str}.get(typ, str)
            if typ is int and "min" in f.metadata:  # counts are refused when parsed, before any model loads
                conv = int_at_least(f.metadata["min"])
            parser.add_argument(flag, type=conv, default=None, help=help_)


def dataclass_from_args(cls, args: argparse.Namespace, prefix: str = ""):
    """Instance of ``cls`` from parsed args; flags not given keep the dataclass default."""
    kw = {}
    for f in fields(cls):
        v = getattr(args, (prefix + f.metadata.get("flag", f.name)).replace("-", "_"), None)
        if v is not None:
            kw[f.name] = v
    return cls(**kw)


def parse_shape(text: str) -> tuple[int, int]:
    """``"4096x11008"`` -> ``(4096, 11008)``: a linear layer's ``out x in`` (argparse ``type=``)."""
    mt = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not mt or not int(mt[1]) or not int(mt[2]):
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected OUTxIN with positive sizes, e.g. 4096x11008")
    return int(mt[1]), int(mt[2])


def at_least(lo, kind=int):
    """An argparse ``type=`` for numbers of ``kind`` ``>= lo``, so ``--seqlen 0`` is refused at parse time."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {text}")
        return v

    parse.__name__ = f"{kind.__name__} >= {lo}"
    return parse


def int_at_least(lo: int):
    return at_least(lo, int)


def windows_arg(text: str) -> int | None:
    """``--windows``: a positive number of perplexity windows, or ``all`` (``None``)."""
    if text.strip().lower() == "all":
        return None
    try:
        return int_at_least(1)(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; or 'all' for every window") from None
