"""A bucket's reading layout: which documents each pass reads, in which seeded orders, as shards are appended.

A bucket's shards (in file-name order) form generations: the shards it had when the run began (generation 0),
then the shards each accepted plan amendment appended after them (data.amend, amend.py), each recorded as
[number of shards once it arrived, the pass in progress then]. Pass p reads

  1. the shards present before pass p began, in one seeded permutation: seed (data.seed, bucket, p), the
     historical order, over exactly those shards (so its on-disk index, keyed by those shards, stays valid);
  2. then each generation that arrived during pass p, in its own seeded permutation: seed (data.seed, bucket, p,
     "from" + its first shard's number), in the order they arrived.

So the documents already scheduled keep their places (nothing already read is read again in that pass), an
appended document is read once in the pass it arrived in, after the original documents still unread, and every
later pass shuffles the whole bucket afresh. A cursor position counts documents across these runs (one run per
part of a pass), so a bucket that was never appended to has one run per pass: the historical layout, and its
checkpoints mean what they always meant.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Run:
    """One stretch of the position space: the documents of shards [first, end) in one seeded order."""
    pass_: int
    first: int        # first shard
    end: int          # one past the last shard
    tag: str          # "" for a pass's base order, "fromN" for shards appended during the pass
    doc_base: int     # the bucket's number of its first document (documents count across shards in name order)
    n_docs: int
    n_tokens: int     # end-of-document tokens included
    position: int     # cursor position of its first document
    tokens_before: int  # tokens of every run before it


def initial_generations(n_shards: int) -> list[list[int]]:
    return [[n_shards, -1]]


def runs(shard_docs: list[int], shard_tokens: list[int], generations: list[list[int]], passes: int) -> list[Run]:
    """The runs of passes 0..passes-1 (empty ones left out) for shards with these document and token counts."""
    doc_base = np.concatenate([[0], np.cumsum(shard_docs, dtype=np.int64)]).tolist()
    tok_base = np.concatenate([[0], np.cumsum(shard_tokens, dtype=np.int64)]).tolist()
    out: list[Run] = []
    position = tokens = 0
    for p in range(passes):
        base = max(end for end, added in generations if added < p)
        parts = [(0, base, "")]
        start = base
        for end, added in generations:
            if added == p:
                parts.append((start, end, f"from{start}"))
                start = end
        for first, end, tag in parts:
            n_docs = doc_base[end] - doc_base[first]
            n_tokens = tok_base[end] - tok_base[first] + n_docs
            if n_docs:
                out.append(Run(p, first, end, tag, doc_base[first], n_docs, n_tokens, position, tokens))
                position, tokens = position + n_docs, tokens + n_tokens
    return out


def pass_at(layout: list[Run], position: int, passes: int) -> int:
    """The pass a cursor at `position` is in (at the very end of the layout: the last pass)."""
    for run in layout:
        if position < run.position + run.n_docs:
            return run.pass_
    return max(passes - 1, 0)


def view(bucket, first: int, end: int):
    """The bucket seen as its shards [first, end) only (what one run's index is built over)."""
    if (first, end) == (0, len(bucket.shards)):
        return bucket
    v = copy.copy(bucket)
    v.shards = bucket.shards[first:end]
    counts = [s.header.n_docs for s in v.shards]
    v._shard_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    v.n_docs = int(sum(counts))
    v.n_tokens = int(sum(s.header.n_tokens for s in v.shards))
    v._lengths = None
    return v
