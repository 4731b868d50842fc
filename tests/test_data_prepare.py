"""`gpt-simple prepare`: malformed input is reported with file and line, counted, skipped (or fatal with
--strict); the output does not depend on the number of workers or on how the input is cut; the tokenizer is
recorded in the shards and a mismatch is refused naming the file."""
from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import PYTHON
from gpt_simple.data.prepare import PrepareError, prepare
from gpt_simple.data.shards import Bucket, ShardError, open_buckets
from test_data_helpers import decode

GPT_SIMPLE = str(Path(PYTHON).with_name("gpt-simple"))


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([GPT_SIMPLE, "prepare", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def documents(folder: Path) -> list[str]:
    bucket = Bucket(folder)
    return [decode(bucket.document(i)) for i in range(bucket.n_docs)]


@pytest.fixture
def messy(tmp_path) -> Path:
    """One of each kind of malformed input, between good documents."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_bytes(b"\n".join([
        b'{"text": "first good"}',     # 1
        b'{"text": bad}',               # 2 bad JSON
        b'{"title": "no text"}',        # 3 no text field
        b'{"text": "caf\xe9"}',         # 4 not UTF-8
        b'',                            # 5 blank line: ignored, not a record
        b'{"text": "   "}',             # 6 empty text
        b'[1, 2]',                      # 7 not an object
        b'{"text": 5}',                 # 8 text not a string
        b'{"text": "second good"}',     # 9
    ]) + b"\n")
    (src / "b.txt").write_bytes(b"line one\nline \xff two\n")  # not UTF-8 on line 2
    (src / "c.txt").write_text("a good text file")
    (src / "d.jsonl").write_bytes(b"")
    (src / "e.txt").write_bytes(b"")
    return src


EXPECTED_WARNINGS = [
    "a.jsonl:2: bad JSON (Expecting value at column 10)",
    "a.jsonl:3: no field 'text'",
    "a.jsonl:4: not UTF-8 (byte 0xe9 at column 14)",
    "a.jsonl:6: empty 'text'",
    "a.jsonl:7: not a JSON object (list)",
    "a.jsonl:8: field 'text' is not a string (int)",
    "b.txt:2: not UTF-8 (byte 0xff at column 6)",
    "d.jsonl: empty file",
    "e.txt: empty file",
]


def test_malformed_input_is_reported_with_file_and_line_counted_and_skipped(messy, tmp_path):
    proc = cli("in", "--out", "data", "--bucket", "web", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [f"warning: skipped in/{w}" for w in EXPECTED_WARNINGS]
    summary = proc.stdout.strip()
    assert "3 documents" in summary and "from 5 file(s)" in summary and "1 blank lines ignored" in summary
    assert ("skipped 9 (bad JSON 1, empty file 2, empty text 1, no text field 1, not UTF-8 2, not a JSON object 1, "
            "text not a string 1)") in summary
    assert documents(tmp_path / "data" / "web") == ["first good", "second good", "a good text file"]
    manifest = json.loads((tmp_path / "data" / "web" / "prepare.json").read_text())
    assert (manifest["documents"], manifest["skipped"], manifest["tokenizer"]) == (3, 9, "byte")
    assert manifest["problems"] == [f"in/{w}" for w in EXPECTED_WARNINGS]
    assert sum(manifest["skipped_by_reason"].values()) == 9


def test_strict_makes_the_first_malformed_record_fatal_and_writes_nothing(messy, tmp_path):
    proc = cli("in", "--out", "data", "--bucket", "web", "--strict", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: in/a.jsonl:2: bad JSON (Expecting value at column 10) (--strict: stopped, nothing was written; "
        "leave out --strict to skip malformed records)"]
    assert not (tmp_path / "data").exists() or list((tmp_path / "data").iterdir()) == []


def test_nothing_usable_and_bad_arguments_are_one_line_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    for args, message in (
            (["empty.jsonl", "--out", "data", "--bucket", "x"], "no documents to write"),
            (["nope.jsonl", "--out", "data", "--bucket", "x"], "nope.jsonl: no such file or folder"),
            (["empty.jsonl", "--out", "data", "--bucket", ".x"], "bucket name '.x'"),
            (["empty.jsonl", "--out", "data", "--bucket", "x", "--tokenizer", "sp:m"], "unknown tokenizer 'sp:m'")):
        proc = cli(*args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in proc.stderr, proc.stderr


def test_an_existing_bucket_is_kept_unless_forced(tmp_path):
    (tmp_path / "one.txt").write_text("the first version")
    prepare([str(tmp_path / "one.txt")], str(tmp_path / "data"), "b", quiet=True)
    (tmp_path / "one.txt").write_text("the second version")
    with pytest.raises(PrepareError, match="bucket already exists"):
        prepare([str(tmp_path / "one.txt")], str(tmp_path / "data"), "b", quiet=True)
    assert documents(tmp_path / "data" / "b") == ["the first version"]
    prepare([str(tmp_path / "one.txt")], str(tmp_path / "data"), "b", quiet=True, force=True)
    assert documents(tmp_path / "data" / "b") == ["the second version"]
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["b"]  # no hidden leftovers


def test_output_does_not_depend_on_workers_or_how_the_input_is_cut(tmp_path):
    rng = np.random.default_rng(0)
    lines = [json.dumps({"text": f"doc {i} " + "x" * int(rng.integers(1, 300))}) for i in range(400)]
    lines[137] = '{"text": "torn'  # one bad line deep inside: its number must survive the cutting
    body = ("\n".join(lines) + "\n").encode()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(body)
    (tmp_path / "in" / "b.jsonl.gz").write_bytes(gzip.compress(body))
    outputs = []
    for name, workers, chunk in (("one", 1, 1 << 20), ("cut", 1, 500), ("pool", 2, 700)):
        summary = prepare([str(tmp_path / "in")], str(tmp_path / name), "b", workers=workers, quiet=True,
                          chunk_bytes=chunk)
        assert (summary.documents, summary.skipped) == (798, 2)
        assert summary.problems == [f"{tmp_path / 'in' / f}:138: bad JSON (Unterminated string starting "
                                    f"at column 10)" for f in ("a.jsonl", "b.jsonl.gz")]
        folder = tmp_path / name / "b"
        outputs.append({p.name: p.read_bytes() for p in sorted(folder.glob("shard-*"))})
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) == 2


def test_a_truncated_gzip_keeps_the_lines_before_the_damage(tmp_path):
    body = "".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(2000)).encode()
    raw = gzip.compress(body)
    (tmp_path / "t.jsonl.gz").write_bytes(raw[: len(raw) * 2 // 3])
    summary = prepare([str(tmp_path / "t.jsonl.gz")], str(tmp_path / "data"), "b", quiet=True)
    assert summary.skipped_by_reason == {"corrupt gzip": 1} and 0 < summary.documents < 2000
    n = summary.documents
    assert summary.problems == [f"{tmp_path / 't.jsonl.gz'}:{n + 1}: gzip stream truncated after line {n}: "
                                f"the rest of the file"]
    assert documents(tmp_path / "data" / "b") == [f"document number {i}" for i in range(summary.documents)]


def test_the_tokenizer_is_recorded_and_a_mismatch_is_refused(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {"[UNK]": 0, "<|endoftext|>": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "a.txt").write_text("hello world hello mars")
    (tmp_path / "b.txt").write_text("hello")
    data = tmp_path / "data"
    summary = prepare([str(tmp_path / "a.txt")], str(data), "words", tokenizer=f"hf:{tmp_path / 'tok.json'}",
                      quiet=True)
    bucket = Bucket(data / "words")
    assert bucket.tokenizer == summary.tokenizer and bucket.tokenizer.startswith("hf:tok.json:")
    assert (bucket.vocab_size, bucket.eos, bucket.document(0).tolist()) == (4, 1, [2, 3, 2, 0])

    prepare([str(tmp_path / "b.txt")], str(data), "bytes", quiet=True)  # byte-level, into the same data.dir
    with pytest.raises(ShardError, match="buckets use different tokenizers") as e:
        open_buckets(data)
    assert "bytes: 'byte'" in str(e.value) and "words: 'hf:tok.json:" in str(e.value)

    # A shard of the other tokenizer slipped into a bucket: refused, naming that shard.
    (data / "bytes" / "shard-00000.idx").rename(data / "words" / "shard-00001.idx")
    (data / "bytes" / "shard-00000.bin").rename(data / "words" / "shard-00001.bin")
    with pytest.raises(ShardError, match="tokenizer 'byte'.*differs from 'hf:tok.json:") as e:
        Bucket(data / "words")
    assert str(data / "words" / "shard-00001.idx") in str(e.value)
