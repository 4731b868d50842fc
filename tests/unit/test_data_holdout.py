"""`prepare --val-docs N`: exactly N whole documents, a seeded sample spread over the input, never in the training
shards, and the same split whatever the shard size or the number of workers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpt_simple.data.prepare import prepare
from gpt_simple.data.prepare.cli import prepare_main
from gpt_simple.data.shards import Bucket


def write_corpus(folder: Path, n: int) -> None:
    folder.mkdir()
    lines = [json.dumps({"text": f"document {i:05d} " + "x" * (i % 37)}) for i in range(n)]
    (folder / "a.jsonl").write_text("\n".join(lines[: n // 2]) + "\n")
    (folder / "b.jsonl").write_text("\n".join(lines[n // 2:]) + "\n")


def doc_numbers(bucket: Bucket) -> list[int]:
    return [int(bytes(np.asarray(bucket.document(i), dtype=np.uint8)).split()[1]) for i in range(bucket.n_docs)]


def build(tmp_path: Path, name: str, **kwargs) -> tuple[list[int], list[int]]:
    prepare([str(tmp_path / "src")], str(tmp_path / name), "b", quiet=True, **kwargs)
    folder = tmp_path / name / "b"
    return doc_numbers(Bucket(folder)), doc_numbers(Bucket(folder / "val"))


def test_the_split_is_exact_disjoint_spread_and_independent_of_how_it_was_built(tmp_path):
    write_corpus(tmp_path / "src", 2000)
    train, val = build(tmp_path, "one", val_docs=50, workers=1)
    assert len(val) == 50 and val == sorted(val)                      # in input order
    assert not set(train) & set(val) and sorted(train + val) == list(range(2000))
    assert max(val) - min(val) > 1000                                 # a sample of the whole input, not its head
    # training documents keep their input order, except the few a smaller key pushed out of the candidates
    out_of_order = sum(1 for a, b in zip(train, train[1:]) if b < a)
    assert out_of_order < 50 * 4
    assert build(tmp_path, "sharded", val_docs=50, workers=2, shard_tokens=3000) == (train, val)
    assert len(list((tmp_path / "sharded" / "b").glob("*.idx"))) > 5
    other = build(tmp_path, "seeded", val_docs=50, val_seed=7)[1]
    assert other != val and len(other) == 50


def test_summary_and_manifest_count_the_split_apart(tmp_path, capsys):
    write_corpus(tmp_path / "src", 300)
    code = prepare_main([str(tmp_path / "src"), "--out", str(tmp_path / "d"), "--bucket", "b", "--val-docs", "10",
                         "--quiet"])
    assert code == 0
    line = capsys.readouterr().out
    assert "290 documents" in line and "validation split 10 documents" in line
    manifest = json.loads((tmp_path / "d" / "b" / "prepare.json").read_text())
    assert manifest["documents"] == 290 and manifest["val_documents"] == 10
    assert manifest["val_tokens"] == Bucket(tmp_path / "d" / "b" / "val").n_tokens
    assert Bucket(tmp_path / "d" / "b").n_tokens == manifest["tokens"]


@pytest.mark.parametrize("args, message", [
    (["--val-docs", "-1"], "--val-docs must be >= 0"),
    (["--val-docs", "300"], "all 300 went to the validation split"),
])
def test_bad_split_requests_are_one_line_errors(tmp_path, capsys, args, message):
    write_corpus(tmp_path / "src", 300)
    code = prepare_main([str(tmp_path / "src"), "--out", str(tmp_path / "d"), "--bucket", "b", "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d" / "b").exists()
