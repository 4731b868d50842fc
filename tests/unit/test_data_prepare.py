"""`prepare()` in this process: an existing bucket is kept unless forced; the output does not depend on the number
of workers or on how the input is cut; a truncated gzip keeps what precedes the damage; the tokenizer is recorded
in the shards and a mismatch is refused naming the file. (The `gpt-simple prepare` CLI: e2e/test_data_prepare.py.)"""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from gpt_simple.data.prepare import PrepareError, prepare
from gpt_simple.data.shards import Bucket, ShardError, open_buckets
from helpers.data import documents


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
