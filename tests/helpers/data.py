"""Data helpers shared by the data tests (unit and e2e): synthetic buckets written with the real ShardWriter,
readers of data_audit.jsonl, and a bucket's documents decoded back to text."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gpt_simple.data.shards import Bucket, ShardWriter
from gpt_simple.data.tokenizer import ByteTokenizer


def write_bucket(data_dir: Path, name: str, lengths, seed: int = 0, shards: int = 1,
                 tokenizer: str = "byte", vocab: int = 257, eos: int = 256) -> list[np.ndarray]:
    """A bucket of documents with the given token counts (random byte tokens), split over `shards` files."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, min(vocab - 1, 256), size=int(n)).astype(np.uint16) for n in lengths]
    per = -(-len(docs) // shards)
    for s in range(shards):
        w = ShardWriter(Path(data_dir) / name / f"shard-{s:05d}", vocab, tokenizer, eos)
        for doc in docs[s * per:(s + 1) * per]:
            w.add(doc)
        w.close()
    return docs


def exact_lengths(n_sequences: int, seq_len: int, n_docs: int, seed: int = 0) -> list[int]:
    """Document lengths whose tokens plus one end-of-document token each fill exactly n_sequences
    sequences of seq_len + 1 tokens."""
    total = n_sequences * (seq_len + 1) - n_docs  # document tokens without the EOS
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, total), size=n_docs - 1, replace=False))
    lengths = np.diff(np.concatenate([[0], cuts, [total]]))
    assert lengths.sum() == total and (lengths > 0).all()
    return [int(x) for x in lengths]


def read_audit(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "data_audit.jsonl").read_text().splitlines()]


def coverage(audit: list[dict]) -> dict[tuple[str, int], list[tuple[int, int]]]:
    """(bucket, doc) -> the [start, end) token ranges the audit lists for it, in order of appearance."""
    spans: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for line in audit:
        for bucket, doc, start, end in line["spans"]:
            spans.setdefault((bucket, doc), []).append((start, end))
    return spans


def assert_each_token_once(audit: list[dict], doc_sizes: dict[str, list[int]], complete: bool) -> None:
    """Every audited token range is read once, each document's ranges tile it from 0 without gaps or overlap;
    with complete=True every document of every bucket is covered whole (its tokens + its EOS)."""
    steps = [line["step"] for line in audit]
    assert steps == list(range(1, len(steps) + 1)), f"audit steps are not 1..N once each: {steps}"
    spans = coverage(audit)
    for (bucket, doc), ranges in spans.items():
        pos = 0
        for start, end in ranges:
            assert start == pos and end > start, f"{bucket} doc {doc}: ranges {ranges} overlap or leave a gap"
            pos = end
        assert pos <= doc_sizes[bucket][doc] + 1
    if complete:
        for bucket, sizes in doc_sizes.items():
            for doc, n in enumerate(sizes):
                assert spans.get((bucket, doc), [(0, 0)])[-1][1] == n + 1, \
                    f"{bucket} doc {doc} ({n} tokens + EOS) not read whole: {spans.get((bucket, doc))}"


def decode(tokens) -> str:
    return ByteTokenizer().decode(tokens)


def documents(folder: Path) -> list[str]:
    bucket = Bucket(folder)
    return [decode(bucket.document(i)) for i in range(bucket.n_docs)]
