"""Small helpers: memory, devices, atomic writes."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)


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


#: the temp and replaced folders :func:`atomic_dir` is working with in this process right now; a leftover named
#: with this process's own pid is stale unless listed here (in a container, a new run often gets the pid of an old one)
_IN_FLIGHT: set[Path] = set()


@contextlib.contextmanager
def atomic_dir(target: Path, replace: bool = True, durable: bool = False):
    """Yield an empty temp folder next to ``target``; on success it becomes ``target``.

    ``replace=True``: an existing ``target`` is replaced (checkpoints).
    ``replace=False``: if another process created ``target`` first, its copy
    wins and ours is discarded (shared caches).
    ``durable=True``: every file is flushed to disk before the renames, so a power cut cannot leave the new
    folder with empty files after the old one is gone.

    The temp folder is ``.NAME.tmp-PID-XXXXXXXX.tmp``; replacing renames ``target`` to ``.NAME.old-PID-XXXXXXXX``,
    renames the temp folder into place, then deletes the old one. A process killed on the way leaves those
    folders behind; :func:`recover_dir` finds them by name and pid and restores or removes them.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f".{target.name}."
    tmp = Path(tempfile.mkdtemp(prefix=f"{tag}tmp-{os.getpid()}-", suffix=".tmp", dir=target.parent))
    _IN_FLIGHT.add(tmp.resolve())
    tmp.chmod(0o755)  # mkdtemp makes 0700
    try:
        yield tmp
        if durable:
            fsync_tree(tmp)
        if target.exists() and replace:
            old = target.with_name(f"{tag}old-{os.getpid()}-{secrets.token_hex(4)}")
            _IN_FLIGHT.add(old.resolve())
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except OSError:
                os.replace(old, target)  # put the old folder back before reporting the failure
                raise
            if durable:
                fsync_tree(target.parent, recurse=False)
            shutil.rmtree(old, ignore_errors=True)
            _IN_FLIGHT.discard(old.resolve())
        else:
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():
                    raise
            if durable:
                fsync_tree(target.parent, recurse=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _IN_FLIGHT.discard(tmp.resolve())


def fsync_tree(path: Path, recurse: bool = True) -> None:
    """Flush ``path`` (a folder) to disk: its files and subfolders first (``recurse``), then its own entries."""
    path = Path(path)
    if recurse:
        for p in path.rglob("*"):
            if p.is_file() and not p.is_symlink():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the files themselves are on disk
        pass
    finally:
        os.close(fd)


_LEFTOVER = re.compile(r"(?P<kind>tmp)-(?P<pid>[0-9]+)-[a-z0-9_]+\.tmp|(?P<old>old)-(?P<old_pid>[0-9]+)(?:-[0-9a-f]+)?")


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs under another user
        return True
    return True


def stale_leftovers(target: Path) -> list[tuple[str, Path]]:
    """``[(kind, folder)]``: what :func:`atomic_dir` writes of ``target`` left next to it by processes that
    no longer run, ``kind`` ``"tmp"`` (an unfinished write) or ``"old"`` (the folder a replacing write moved
    aside). Only lowbit's own names count (``.NAME.tmp-PID-X.tmp``, ``.NAME.old-PID[-X]``); a pid that runs (or
    that another user's process holds) keeps its folders. Pids are this machine's: two machines saving to one
    network folder at the same time could take each other's temp folders for stale."""
    target = Path(target)
    tag = f".{target.name}."
    try:
        entries = [p for p in target.parent.iterdir() if p.name.startswith(tag)]
    except OSError:
        return []
    found = []
    for p in entries:
        m = _LEFTOVER.fullmatch(p.name[len(tag):])
        if m is None or p.is_symlink() or not p.is_dir() or p.resolve() in _IN_FLIGHT:
            continue
        kind, pid = m["kind"] or m["old"], int(m["pid"] or m["old_pid"])
        if pid == os.getpid() or not _pid_running(pid):
            found.append((kind, p))
    return sorted(found, key=lambda kp: (kp[0], kp[1].name))


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def recover_dir(target: Path) -> bool:
    """Clean up after :func:`atomic_dir` writes of ``target`` that were killed (:func:`stale_leftovers`).

    A write killed between its two renames leaves no ``target`` and the previous folder as ``.NAME.old-*``:
    that folder is renamed back to ``target``. Every other leftover (temp folders, old folders whose
    replacement is in place) is deleted. Each step is logged. Returns whether ``target`` was restored.
    """
    target = Path(target)
    restored = False
    left = stale_leftovers(target)
    olds = sorted((p for kind, p in left if kind == "old"), key=lambda p: p.stat().st_mtime, reverse=True)
    if olds and not target.exists():
        try:
            os.replace(olds[0], target)
            restored = True
            log.warning("restored %s from %s, which a save killed between its two renames left behind",
                        target, olds[0].name)
        except OSError as e:
            log.warning("could not restore %s from %s: %s", target, olds[0], e)
        olds = olds[1:]
    for p in [*olds, *(p for kind, p in left if kind == "tmp")]:
        try:
            size = _tree_size(p)
            shutil.rmtree(p)
            log.info("removed %s (%.1f MB), left by an interrupted save of %s", p, size / 1e6, target.name)
        except OSError as e:
            log.warning("could not remove %s, left by an interrupted save: %s", p, e)
    return restored


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
