"""Imports point downward: every import between lowbit's packages, lazy ones included, follows LAYERS.

A package (or top-level module) may import only what sits before it in ``LAYERS``. A cycle between two
packages is therefore impossible, and a change that needs an upward import has to move code instead
(docs/architecture.md says where each piece lives). No module imports a ``_private`` name of another
package either.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lowbit"

#: lowest first; each entry is a subpackage or a top-level module of ``lowbit``
LAYERS = (
    "errors", "_version", "cache", "utils",   # leaves: errors, the version, paths, small helpers
    "data",                                   # pinned sources, texts, calibration windows
    "models",                                 # architecture rows, loading, zoo
    "packing",                                # bit planes
    "kernels",                                # C++ ops and their plain-torch references (no formats, no modules)
    "formats",                                # number formats, RTN, clip search, codebooks
    "nn",                                     # packed modules, codecs, kernel layouts, bpw
    "config",                                 # format/storage/calibration/eval dataclasses
    "io",                                     # checkpoints
    "runtime",                                # the lean decode loop
    "calib",                                  # the layer-wise engine, resume, shared transforms
    "methods",                                # one file per method, a registry
    "mixed",                                  # size budgets: a format per tensor (knapsack over bpw costs)
    "quantize",                               # QuantRecipe and the whole-model pipeline
    "eval",                                   # perplexity, zero-shot, lm-eval bridge, results records
    "export",                                 # checkpoints in serving engines' formats (api.export calls it)
    "api",                                    # the public functions
    "distill",                                # BitDistiller (uses the API to initialise and save)
    "report",                                 # tables and plots from results files
    "bench",                                  # grids, decode and kernel benchmarks
    "cli",                                    # parse, call the library, print
    "__main__", "__init__",
)


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, path: Path):
    """``(target module, imported name or None, line)`` for every lowbit import in ``path``, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "lowbit" or a.name.startswith("lowbit."):
                    yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if path.name != "__init__.py":
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == "lowbit" or target.startswith("lowbit.")):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                yield (sub if sub in MODULES else target), a.name, node.lineno


def test_every_package_has_a_layer():
    missing = sorted({_layer(m) for m in MODULES} - set(LAYERS))
    assert not missing, f"add these packages to LAYERS at their level: {missing}"


def violations(modules: dict[str, Path]) -> tuple[list[str], list[str]]:
    """``(upward imports, private names used across packages)``, one line each."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward, private = [], []
    for module, path in sorted(modules.items()):
        src = _layer(module)
        for target, name, line in _imports(module, path):
            dst = _layer(target)
            if dst == src:
                continue
            if rank[dst] > rank[src]:
                upward.append(f"{module}:{line}: imports {target} ({dst} sits above {src})")
            if name and name.startswith("_") and not name.startswith("__"):
                private.append(f"{module}:{line}: {name} is private to {dst}")
    return upward, private


def test_imports_point_downward_and_names_stay_private():
    upward, private = violations(MODULES)
    assert not upward, "upward imports:\n" + "\n".join(upward)
    assert not private, "private names used across packages:\n" + "\n".join(private)


@pytest.mark.parametrize("where, line, upward, private", [
    ("formats", "from ..cli.main import build_parser", 1, 0),
    ("formats", "import lowbit.api", 1, 0),
    ("cli", "from ..calib.engine import _hidden", 0, 1),
    ("cli", "from ..calib import engine", 0, 0),
])
def test_the_checker_catches_violations(tmp_path, where, line, upward, private):
    """The rule is not vacuous: planted upward and private imports are reported, a downward one is not."""
    fake = tmp_path / "lowbit" / where / "planted.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(f"def f():\n    {line}\n")   # lazy, inside a function
    up, priv = violations({f"lowbit.{where}.planted": fake})
    assert (len(up), len(priv)) == (upward, private)
