"""Small helpers: memory, devices, atomic writes."""
from __future__ import annotations

import contextlib
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path

import torch


def peak_memory_gb(device: torch.device | str | None = None) -> float:
    """Peak memory of this process: CUDA max allocated on a GPU, else peak RSS."""
    if device is not None and torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return round(rss * scale / 2**30, 3)


@contextlib.contextmanager
def env_var(name: str, value: str | None):
    """Run the body with environment variable ``name`` set to ``value`` (``None``: unset), then restore it."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def cpu_threads(n: int):
    """Run the body with ``n`` intra-op CPU threads, then restore the previous count.

    Column-by-column solvers issue thousands of tiny ops; on a CPU, thread
    synchronisation costs more than it saves there (measured: GPTQ on a
    1536x576 layer, 1.1 s with 1 thread vs 6.5-11.6 s with 2 on a loaded 2-core machine).
    """
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): the GPU when there is one, else the CPU; otherwise a checked torch device."""
    from .errors import ConfigError

    if name is None or str(name) == "auto":
        return default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def device_name(dev: torch.device) -> str:
    """A readable device name for results files, e.g. ``cuda (NVIDIA H100 80GB HBM3)`` or ``cpu``."""
    dev = torch.device(dev)
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return dev.type


@contextlib.contextmanager
def atomic_dir(target: Path, replace: bool = True):
    """Yield an empty temp folder next to ``target``; on success it becomes ``target``.

    ``replace=True``: an existing ``target`` is replaced (checkpoints).
    ``replace=False``: if another process created ``target`` first, its copy
    wins and ours is discarded (shared caches).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700
    try:
        yield tmp
        if target.exists() and replace:
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(dest: Path):
    """Yield a temp path next to ``dest``; on success it replaces ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o644)  # mkstemp makes 0600; results and cached files are meant to be shared
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_between_markers(md_path: Path, body: str, tag: str, append: bool = True) -> bool:
    """Replace the generated part of ``md_path`` (between ``<!-- {tag}:begin -->`` and ``<!-- {tag}:end -->``),
    keeping the text around it; atomic. Without the markers the block is appended (``append``) or nothing is
    written. Returns whether the file was written."""
    md_path = Path(md_path)
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    old = md_path.read_text(encoding="utf-8") if md_path.exists() else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    elif append:
        new = (old.rstrip() + "\n\n" if old else "") + block + "\n"
    else:
        return False
    atomic_write_text(md_path, new)
    return True



def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_writable(folder, what: str, need_bytes: int = 0, need_note: str = "") -> Path:
    """Check, in seconds, that files can be created in ``folder`` (which may not exist yet) and that its disk has
    ``need_bytes`` free; returns the nearest existing folder at or above ``folder``, where the test ran.

    A temp file is created and deleted there, so permissions, read-only disks and full disks all show. OutputError
    names ``what`` (``--out DIR``) and, when space is short, the estimate (``need_note`` says how it was made).
    """
    from .errors import OutputError

    base = Path(folder).expanduser().absolute()
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise OutputError(f"{what}: {base} is a file, so no folder can be made below it; choose another path")
    try:
        fd, name = tempfile.mkstemp(prefix=".lowbit-write-test-", dir=base)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise OutputError(f"{what}: cannot write in {base} ({e.strerror or e}); choose a writable place or fix "
                          f"its permissions") from None
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        note = f" ({need_note})" if need_note else ""
        raise OutputError(f"{what}: the disk of {base} has {_size(free)} free, and the output needs about "
                          f"{_size(need_bytes)}{note}; free some space or write elsewhere")
    return base
