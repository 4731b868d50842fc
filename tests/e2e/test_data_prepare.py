"""`gpt-simple prepare`, the real CLI: malformed input is reported with file and line, counted, skipped (or fatal
with --strict); nothing usable and bad arguments are one-line errors."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers.data import documents
from helpers.paths import PYTHON

GPT_SIMPLE = str(Path(PYTHON).with_name("gpt-simple"))


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([GPT_SIMPLE, "prepare", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


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
