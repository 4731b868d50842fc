"""The validation split: N whole documents of the bucket, set aside as the input streams past.

Document number i (in input order, counting every document written) gets the key splitmix64(seed, i); the split
is the N documents with the smallest keys: a uniform sample without replacement that depends only on the
documents' order, the seed and N, not on worker counts, shard sizes or a build being continued after a kill.
The candidates so far are held in memory (N documents); a candidate pushed out by a smaller key goes to the
training shards at that moment, so the training documents keep their input order except for those few
(about N·ln(total/N) in all). The split's documents are written in input order: the first ones an evaluation
reads are as random as the rest.
"""
from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np

from gpt_simple.data.shards import VAL_SPLIT, Shard, ShardWriter

_MASK = (1 << 64) - 1


def doc_key(seed: int, ordinal: int) -> int:
    """splitmix64 of (seed, ordinal): well mixed, so small keys are spread over the whole input."""
    z = (seed * 0x9E3779B97F4A7C15 + ordinal + 1) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


class Holdout:
    """Chooses the split's documents; `offer` says which document goes to the training shards now, if any."""

    def __init__(self, docs: int, seed: int):
        self.docs, self.seed = docs, seed
        self._heap: list[tuple[int, int, np.ndarray]] = []   # (-key, ordinal, tokens): the largest key on top

    def __len__(self) -> int:
        return len(self._heap)

    def offer(self, ordinal: int, tokens: np.ndarray) -> np.ndarray | None:
        """Document `ordinal` arrives: the tokens to write to the training shards now (it, a candidate it pushed
        out, or None when it became a candidate without pushing one out)."""
        if self.docs <= 0:
            return tokens
        entry = (-doc_key(self.seed, ordinal), ordinal, tokens)
        if len(self._heap) < self.docs:
            heapq.heappush(self._heap, entry)
            return None
        if entry[0] > self._heap[0][0]:   # a smaller key than the largest candidate's
            return heapq.heapreplace(self._heap, entry)[2]
        return tokens

    def chosen(self) -> list[tuple[int, np.ndarray]]:
        """The split: (ordinal, tokens) in input order."""
        return sorted(((ordinal, tokens) for _, ordinal, tokens in self._heap), key=lambda e: e[0])

    # A continued build starts from the candidates of its last record: their ordinals go in the record, their
    # tokens in a shard of their own beside it (written first; the record names it).
    def save(self, prefix: Path, vocab_size: int, tokenizer: str, eos: int) -> list[int]:
        if not self._heap:
            return []
        chosen = self.chosen()
        write_docs(prefix, chosen, vocab_size, tokenizer, eos)
        return [ordinal for ordinal, _ in chosen]

    def load(self, prefix: Path, ordinals: list[int]) -> None:
        self._heap = []
        if not ordinals:
            return
        shard = Shard(prefix.with_name(prefix.name + ".idx"))
        offsets = np.asarray(shard.offsets)
        for i, ordinal in enumerate(ordinals):
            tokens = np.array(shard.tokens[offsets[i]:offsets[i + 1]])
            heapq.heappush(self._heap, (-doc_key(self.seed, ordinal), ordinal, tokens))


def write_docs(prefix: Path, chosen: list[tuple[int, np.ndarray]], vocab_size: int, tokenizer: str,
               eos: int) -> int:
    """The documents of `chosen` ((ordinal, tokens), in that order) as one shard PREFIX.{bin,idx}; its tokens."""
    writer = ShardWriter(prefix, vocab_size, tokenizer, eos)
    for _, tokens in chosen:
        writer.add(tokens)
    writer.close()
    return writer.n_tokens


def write_split(folder: Path, chosen: list[tuple[int, np.ndarray]], vocab_size: int, tokenizer: str,
                eos: int) -> int:
    """The split's shard in BUCKET/val; returns its tokens."""
    return write_docs(folder / VAL_SPLIT / "shard-00000", chosen, vocab_size, tokenizer, eos)
