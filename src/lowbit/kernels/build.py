"""Build (once) and load the C++ kernels; never fail.

The extension is compiled on first use with :func:`torch.utils.cpp_extension.load`
into ``<lowbit cache>/torch_extensions/<torch version>/`` and reused afterwards
(torch rebuilds it only when the source or flags change). Loading registers the
``torch.ops.lowbit.*`` ops. Without a compiler (or ninja), or if the build fails,
a warning is logged once and :func:`load_kernels` returns ``False``: callers then
use the plain-torch path.

One binary holds both the AVX2+FMA path (compiled per function with
``__attribute__((target("avx2,fma")))``) and a portable scalar path; the choice is
made at run time from the CPU's features (``torch.ops.lowbit.isa()``).

Builds are safe across processes and against interrupted builds: :func:`load_extension` holds an
OS file lock (released by the kernel when its holder dies) around torch's build, and under it
clears the ``lock`` file that torch leaves behind when a build is killed (torch would otherwise
wait on it forever).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from ..cache import cache_dir

__all__ = ["SOURCES", "build_once", "extension_dir", "kernel_module", "load_extension", "load_kernels"]

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("lowbit_kernels.cpp", "decode_ops.cpp", "vq_ops.cpp",
                                                                    "q8_ops.cpp", "lut_gemm.cpp",
                                                                    "bindings.cpp")]

_lock = threading.Lock()
_state: dict[str, object] = {}


def extension_dir(name: str) -> Path:
    """Where extension ``name`` is compiled and cached (per torch and Python version)."""
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info.major}{sys.version_info.minor}"
    d = Path(os.environ.get("TORCH_EXTENSIONS_DIR", cache_dir() / "torch_extensions")) / name / tag
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_extension(name: str, sources: list[Path], *, wait_note_s: float = 10.0, **kwargs):
    """:func:`torch.utils.cpp_extension.load` of ``name`` into :func:`extension_dir`, safe across processes.

    Another process building the same extension is waited for (with a log line after ``wait_note_s``
    seconds). A ``lock`` file that torch left in the build folder when a build was killed is removed
    first: under this function's lock no other lowbit build can own it.
    """
    from torch.utils.cpp_extension import load

    d = extension_dir(name)
    guard = FileLock(str(d.parent / f"{d.name}.build.lock"))
    try:
        guard.acquire(timeout=wait_note_s)
    except Timeout:
        log.warning("waiting for another process to finish building %s (lock %s)", name, guard.lock_file)
        guard.acquire()
    try:
        stale = d / "lock"
        if stale.exists():
            age = time.time() - stale.stat().st_mtime
            log.warning("removing %s, left %.0f s ago by an interrupted build of %s", stale, age, name)
            stale.unlink(missing_ok=True)
        return load(name=name, sources=[str(s) for s in sources], build_directory=str(d), **kwargs)
    finally:
        guard.release()


def build_once(name: str, sources: list[Path], what: str, fallback: str, **kwargs):
    """:func:`load_extension` of ``name`` with ``-O3 -fopenmp``, once per process; ``None`` when it fails (no
    compiler, no ninja, a failed build): a warning, once, that names ``what`` and the ``fallback`` taken."""
    if name in _state:
        return _state[name]
    with _lock:
        if name not in _state:
            mod = None
            try:
                mod = load_extension(name, sources, extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                                     **kwargs)
            except Exception as e:  # fall back, never fail
                msg = str(e).strip().splitlines()
                log.warning("%s unavailable (%s); %s", what, msg[-1] if msg else type(e).__name__, fallback)
            _state[name] = mod
    return _state[name]


def load_kernels(verbose: bool = False) -> bool:
    """Compile (first time) and load the kernels; ``True`` when ``torch.ops.lowbit`` is usable."""
    if "ok" not in _state:
        mod = build_once("lowbit_kernels", SOURCES, "lowbit CPU kernels", "using the plain-torch path",
                         is_python_module=True, verbose=verbose)
        ok = mod is not None and hasattr(torch.ops.lowbit, "gemm_int")
        _state["module"] = mod if ok else None
        if ok:
            log.debug("lowbit CPU kernels loaded (%s path) from %s", "avx2+fma" if torch.ops.lowbit.isa() == 1
                      else "scalar", extension_dir("lowbit_kernels"))
        _state["ok"] = ok
    return _state["ok"]


def kernel_module():
    """The extension as a Python module (direct bindings of the decode-path kernels), or ``None``.

    Its functions are the torch ops' own C++ functions, called without the dispatcher (about 1 µs per
    call instead of about 6) and with the GIL released; same arguments as ``torch.ops.lowbit.<name>``.
    """
    return _state.get("module") if load_kernels() else None
