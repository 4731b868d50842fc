"""On-disk shards: round trip, and the reader's refusal of damaged or mismatched files (one-line errors)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gpt_simple.config import load_config
from gpt_simple.data import DataError, open_data
from gpt_simple.data.shards import HEADER_BYTES, MAGIC, Bucket, ShardError, ShardWriter, open_buckets
from helpers.data import write_bucket


def test_round_trip_across_shards(tmp_path):
    docs = write_bucket(tmp_path, "b", [5, 0, 17, 1, 300, 2], shards=3)
    bucket = Bucket(tmp_path / "b")
    assert bucket.n_docs == 6 and bucket.n_tokens == sum(len(d) for d in docs)
    assert (bucket.tokenizer, bucket.vocab_size, bucket.eos) == ("byte", 257, 256)
    assert [int(x) for x in bucket.lengths] == [5, 0, 17, 1, 300, 2]
    for i, doc in enumerate(docs):
        assert np.array_equal(bucket.document(i), doc)
    assert np.array_equal(bucket.document(4, 10, 20), docs[4][10:20])


def test_uint32_for_large_vocabularies(tmp_path):
    w = ShardWriter(tmp_path / "b" / "shard-00000", 100_000, "tiktoken:x", 99_999)
    w.add(np.array([0, 70_000, 99_999]))
    w.close()
    bucket = Bucket(tmp_path / "b")
    assert bucket.shards[0].header.dtype == "uint32"
    assert bucket.document(0).tolist() == [0, 70_000, 99_999]


def test_out_of_range_tokens_are_refused(tmp_path):
    w = ShardWriter(tmp_path / "b" / "shard-00000", 257, "byte", 256)
    with pytest.raises(ShardError, match="out of range"):
        w.add(np.array([1, 257]))
    w.abort()
    assert list((tmp_path / "b").iterdir()) == []


def _idx(tmp_path):
    write_bucket(tmp_path, "b", [3, 4, 5])
    return tmp_path / "b" / "shard-00000.idx"


def _one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_bad_magic(tmp_path):
    idx = _idx(tmp_path)
    raw = bytearray(idx.read_bytes())
    raw[:8] = b"NOTSHARD"
    idx.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="bad magic") as e:
        Bucket(tmp_path / "b")
    assert str(idx) in _one_line(e)


def test_other_format_revision(tmp_path):
    idx = _idx(tmp_path)
    raw = bytearray(idx.read_bytes())
    raw[7] = 2
    idx.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="another format revision"):
        Bucket(tmp_path / "b")


@pytest.mark.parametrize("keep", [4, 100, HEADER_BYTES + 8 * 2 + 3])
def test_truncated_index(tmp_path, keep):
    idx = _idx(tmp_path)
    idx.write_bytes(idx.read_bytes()[:keep])
    with pytest.raises(ShardError, match="truncated|bad magic") as e:
        Bucket(tmp_path / "b")
    assert str(idx) in _one_line(e)


@pytest.mark.parametrize("change", [-2, +2])
def test_token_file_of_the_wrong_size(tmp_path, change):
    idx = _idx(tmp_path)
    bin_path = idx.with_suffix(".bin")
    raw = bin_path.read_bytes()
    bin_path.write_bytes(raw[:change] if change < 0 else raw + b"\0" * change)
    with pytest.raises(ShardError, match="truncated" if change < 0 else "longer") as e:
        Bucket(tmp_path / "b")
    assert str(bin_path) in _one_line(e)


def test_missing_token_file(tmp_path):
    idx = _idx(tmp_path)
    idx.with_suffix(".bin").unlink()
    with pytest.raises(ShardError, match="missing token file"):
        Bucket(tmp_path / "b")


def test_corrupt_header_and_version(tmp_path):
    idx = _idx(tmp_path)
    raw = idx.read_bytes()
    header = json.loads(raw[8:HEADER_BYTES])
    for patch, message in (({"version": 9}, "version 9"), ({"dtype": "int8"}, "unknown token dtype"),
                           ({"eos": 999}, "corrupt shard header"), ({"n_docs": 7}, "truncated")):
        body = json.dumps({**header, **patch}).encode().ljust(HEADER_BYTES - 8)
        idx.write_bytes(MAGIC + body + raw[HEADER_BYTES:])
        with pytest.raises(ShardError, match=message):
            Bucket(tmp_path / "b")
    idx.write_bytes(MAGIC + b"{not json".ljust(HEADER_BYTES - 8) + raw[HEADER_BYTES:])
    with pytest.raises(ShardError, match="corrupt shard header"):
        Bucket(tmp_path / "b")


def test_mismatched_tokenizer_inside_a_bucket(tmp_path):
    write_bucket(tmp_path, "b", [3, 4])
    w = ShardWriter(tmp_path / "b" / "shard-00001", 50257, "tiktoken:gpt2", 50256)
    w.add(np.array([1, 2, 3]))
    w.close()
    with pytest.raises(ShardError, match="tiktoken:gpt2.*differs from 'byte'") as e:
        Bucket(tmp_path / "b")
    assert "shard-00001.idx" in _one_line(e)


def test_mismatched_tokenizer_across_buckets(tmp_path):
    write_bucket(tmp_path, "a", [3, 4])
    write_bucket(tmp_path, "b", [3, 4], tokenizer="hf:tok.json:abc", vocab=300, eos=299)
    with pytest.raises(ShardError, match="different tokenizers") as e:
        open_buckets(tmp_path)
    _one_line(e)


def test_vocabulary_larger_than_the_model(tmp_path):
    write_bucket(tmp_path, "a", [3, 4], tokenizer="tiktoken:gpt2", vocab=50257, eos=50256)
    cfg = load_config(None, ["--data.dir", str(tmp_path), "--model.vocab_size", "320"])
    with pytest.raises(DataError, match=r"model.vocab_size \(320\) is smaller .* \(50257, tokenizer 'tiktoken:gpt2'\)"):
        open_data(cfg)


def test_missing_or_empty_data_dir(tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        open_buckets(tmp_path / "nope")
    with pytest.raises(ShardError, match="no buckets"):
        open_buckets(tmp_path)


def test_hidden_folders_are_not_buckets(tmp_path):
    write_bucket(tmp_path, "a", [3, 4])
    write_bucket(tmp_path, ".a.tmp-123", [3])  # a prepare in progress
    assert list(open_buckets(tmp_path)) == ["a"]
