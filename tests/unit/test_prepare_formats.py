"""`prepare()` on the formats real corpora ship in: Parquet and .jsonl.zst give the tokens of the same documents
as .jsonl; their bad rows and damaged streams are reported like JSONL's; a missing column or library is one line.
A build interrupted in this process keeps its finished shards and a rerun continues it to the same bytes; a live
build is left alone and a dead build of other inputs is removed. (Killed for real: e2e/test_prepare_resume.py.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpt_simple.data.prepare import BucketWriter, PrepareError, prepare, prepare_main
from helpers.data import documents
from helpers.paths import PYTHON

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstd = pytest.importorskip("zstandard")

DOCS = [f"document {i}: caf\u00e9 \u2713 " + "words and more words " * (i % 53) for i in range(3000)]


def jsonl(docs) -> bytes:
    return "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*"))}


@pytest.fixture
def corpus(tmp_path) -> Path:
    """The same documents as .jsonl, as .jsonl.zst (two frames: a stream may hold several) and as Parquet (several
    row groups, the text next to another column)."""
    src = tmp_path / "src"
    src.mkdir()
    body = jsonl(DOCS)
    (src / "a.jsonl").write_bytes(body)
    cut = body.index(b"\n", len(body) // 2) + 1
    c = zstd.ZstdCompressor()
    (src / "a.jsonl.zst").write_bytes(c.compress(body[:cut]) + c.compress(body[cut:]))
    pq.write_table(pa.table({"id": list(range(len(DOCS))), "text": DOCS}), src / "a.parquet", row_group_size=700)
    return src


@pytest.mark.parametrize("suffix", ["jsonl.zst", "parquet"])
def test_parquet_and_zstd_give_the_tokens_of_the_same_jsonl(corpus, tmp_path, suffix):
    ref = prepare([str(corpus / "a.jsonl")], str(tmp_path / "ref"), "b", quiet=True, shard_tokens=100_000)
    assert ref.shards > 1 and documents(tmp_path / "ref" / "b") == DOCS
    for workers, chunk in ((1, 1 << 20), (2, 5000)):  # one task per file, and many small ones through a pool
        out = tmp_path / f"{workers}"
        s = prepare([str(corpus / f"a.{suffix}")], str(out), "b", workers=workers, chunk_bytes=chunk, quiet=True,
                    shard_tokens=100_000)
        assert (s.documents, s.tokens, s.shards, s.skipped) == (ref.documents, ref.tokens, ref.shards, 0)
        assert s.input_bytes == (corpus / f"a.{suffix}").stat().st_size
        assert shard_bytes(out / "b") == shard_bytes(tmp_path / "ref" / "b")


def test_bad_rows_and_damaged_streams_are_reported_and_skipped(tmp_path):
    pq.write_table(pa.table({"text": ["good one", None, "", "  ", "good two"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "b.parquet")
    (tmp_path / "c.parquet").write_bytes(b"not parquet")
    raw = zstd.ZstdCompressor().compress(jsonl(f"line {i}" for i in range(20000)))
    (tmp_path / "d.jsonl.zst").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "e.jsonl.zst").write_bytes(b"not zstd")
    s = prepare([str(tmp_path)], str(tmp_path / "data"), "b", quiet=True)
    kept = s.documents - 2
    assert 0 < kept < 20000 and documents(tmp_path / "data" / "b")[:3] == ["good one", "good two", "line 0"]
    p = str(tmp_path)
    assert s.problems[:5] == [f"{p}/a.parquet:row 2: null text", f"{p}/a.parquet:row 3: empty text",
                              f"{p}/a.parquet:row 4: empty text", f"{p}/b.parquet: empty file (no rows)",
                              f"{p}/c.parquet: not readable as Parquet (Parquet magic bytes not found in footer. "
                              f"Either the file is corrupted or this is not a parquet file.)"]
    assert s.problems[5] == (f"{p}/d.jsonl.zst:{kept + 1}: zstd stream truncated after line {kept}: the rest of "
                             f"the file")
    assert s.problems[6].startswith(f"{p}/e.jsonl.zst:1: zstd stream corrupt (")
    assert s.skipped_by_reason == {"no text field": 1, "empty text": 2, "empty file": 1, "unreadable file": 1,
                                   "corrupt zstd": 2}


def test_a_missing_or_non_text_column_is_one_line_naming_the_file_and_its_columns(tmp_path, capsys):
    pq.write_table(pa.table({"content": ["x"], "n": [1]}), tmp_path / "a.parquet")
    for argv, message in (
            ([], f"{tmp_path / 'a.parquet'}: no column 'text'; it has 'content', 'n' (choose one with --text-column)"),
            (["--text-column", "n"], f"{tmp_path / 'a.parquet'}: column 'n' holds int64, not text")):
        assert prepare_main([str(tmp_path / "a.parquet"), "--out", str(tmp_path / "data"), "--bucket", "b",
                             *argv]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert not (tmp_path / "data").exists()  # found before any work
    s = prepare([str(tmp_path / "a.parquet")], str(tmp_path / "data"), "b", text_column="content", quiet=True)
    assert s.documents == 1


def test_a_missing_library_names_the_extra_to_install(tmp_path, capsys, monkeypatch):
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "a.parquet")
    (tmp_path / "a.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(b'{"text": "x"}\n'))
    for module, name, extra in (("pyarrow", "a.parquet", "parquet"), ("zstandard", "a.jsonl.zst", "zstd")):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # what an import of a missing package raises: ImportError
            assert prepare_main([str(tmp_path / name), "--out", str(tmp_path / "data"), "--bucket", "b"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and f"needs {module}: pip install 'gpt-simple[{extra}]'" in err[0], err


def _messy_corpus(src: Path) -> None:
    """Several files of each format, with malformed records before and after any resume point."""
    src.mkdir()
    for i in range(3):
        docs = [f"file {i} doc {j} " + "x" * (j % 300) for j in range(1500)]
        lines = jsonl(docs).splitlines(keepends=True)
        lines[100 + 500 * i] = b'{"text": torn\n'
        lines[1300] = b'{"no": "text"}\n'
        (src / f"{i}a.jsonl").write_bytes(b"".join(lines))
        (src / f"{i}b.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(b"".join(lines)))
        pq.write_table(pa.table({"text": docs[:700] + [None] + docs[700:]}), src / f"{i}c.parquet",
                       row_group_size=300)


def _build(src: Path, out: Path, **kwargs):
    return prepare([str(src)], str(out), "b", quiet=True, shard_tokens=20_000, chunk_bytes=30_000, **kwargs)


def test_an_interrupted_build_continues_to_the_same_bucket(tmp_path, monkeypatch):
    _messy_corpus(tmp_path / "src")
    ref = _build(tmp_path / "src", tmp_path / "ref")
    assert ref.shards > 20 and ref.skipped == 15
    finish, finished = BucketWriter.finish_shard, []

    def counted(self, progress):
        finish(self, progress)
        finished.append(self.shards)
        if len(finished) in stops:
            raise KeyboardInterrupt

    monkeypatch.setattr(BucketWriter, "finish_shard", counted)
    stops = (1, 6, 16)   # Ctrl-C at several points, each rerun continuing the one before
    for _ in stops:
        with pytest.raises(KeyboardInterrupt) as e:
            _build(tmp_path / "src", tmp_path / "data", workers=2)
        assert e.value.kept is not None and e.value.kept.is_dir()
        assert not (tmp_path / "data" / "b").exists()   # nothing a trainer would read
    s = _build(tmp_path / "src", tmp_path / "data")
    assert finished == list(range(1, ref.shards))   # every shard written once (the last by the commit)
    assert shard_bytes(tmp_path / "data" / "b") == shard_bytes(tmp_path / "ref" / "b")
    for name in ("files", "documents", "tokens", "shards", "skipped", "blank_lines", "input_bytes", "problems",
                 "skipped_by_reason"):
        assert getattr(s, name) == getattr(ref, name), name
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["b"]
    assert sorted(p.name for p in (tmp_path / "data" / "b").iterdir() if not p.name.startswith("shard-")) == [
        "prepare.json"]


def _interrupt_after_two_shards(monkeypatch, src: Path, out: Path) -> Path:
    finish, calls = BucketWriter.finish_shard, []

    def interrupted(self, progress):
        finish(self, progress)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(BucketWriter, "finish_shard", interrupted)
        with pytest.raises(KeyboardInterrupt) as e:
            _build(src, out)
    return e.value.kept


def test_a_live_build_is_left_alone_and_a_dead_one_of_other_inputs_is_removed(tmp_path, monkeypatch, capfd):
    _messy_corpus(tmp_path / "src")
    kept = _interrupt_after_two_shards(monkeypatch, tmp_path / "src", tmp_path / "data")
    kept = kept.rename(kept.with_name(".b.tmp-999999999"))   # as if another process had built it
    # Another process holds the lock: its build is alive, and a second prepare builds on its own.
    holder = subprocess.Popen([PYTHON, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
                               "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
                               str(kept / ".lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        prepare([str(tmp_path / "src")], str(tmp_path / "data"), "b", shard_tokens=20_000, chunk_bytes=30_000)
        assert "continuing the build" not in capfd.readouterr().err
        assert kept.is_dir() and (kept / ".progress.json").exists()
    finally:
        holder.communicate("")
    # Its owner gone, a build of other inputs cannot continue it: removed.
    (tmp_path / "src" / "0a.jsonl").write_bytes(b'{"text": "changed"}\n')
    prepare([str(tmp_path / "src")], str(tmp_path / "other"), "b", quiet=True)  # another data dir: untouched
    assert kept.is_dir()
    prepare([str(tmp_path / "src")], str(tmp_path / "data"), "b", quiet=True, force=True)
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["b"]
    with pytest.raises(PrepareError, match="bucket already exists"):
        prepare([str(tmp_path / "src")], str(tmp_path / "data"), "b", quiet=True)
