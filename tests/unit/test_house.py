"""The house rules that code review would otherwise have to remember: one write policy (only gpt_simple/fileio.py
fsyncs, appends or replaces a file; the other renames move whole directories or are the lease's lock protocol),
rooms a reader can hold (no module over 420 lines, no trainer function over 45), and the trainer spells no file."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gpt_simple"
# Renames of whole directories (a checkpoint's commit, retention's and quarantine's moves, a bucket build's
# publication and its claim of a killed build's folder). The lease's take-over replaces the file through fileio.
DIRECTORY_RENAMES = {"checkpoint/saver.py": 2, "checkpoint/retention.py": 1, "checkpoint/loader.py": 1,
                     "data/prepare/writer.py": 2, "data/prepare/folder.py": 1}


def sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), path.read_text()


def test_only_fileio_writes_durably_or_appends():
    for name, text in sources():
        if name == "fileio.py":
            continue
        assert not re.search(r"os\.fsync\(|open\([^)]*[\"']a[\"']", text), name
        renames = len(re.findall(r"os\.(replace|rename|link)\(", text))
        assert renames == DIRECTORY_RENAMES.get(name, 0), (name, renames)


def test_rooms_a_reader_can_hold():
    for name, text in sources():
        assert len(text.splitlines()) <= 420, name
    tree = ast.parse((PACKAGE / "trainer.py").read_text())
    long = [(f.name, f.end_lineno - f.lineno + 1) for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and f.end_lineno - f.lineno + 1 > 45]
    assert not long, long


def test_the_trainer_spells_no_file_name():
    text = (PACKAGE / "trainer.py").read_text()
    assert not re.search(r"\.(jsonl|json|toml)\b|run_state\.json|HALTED\"|\"STOP\"", text)
    assert "open(" not in text and "write_" not in text
