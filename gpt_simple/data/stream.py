"""The global sequence stream: packing, the curriculum schedule, rank slicing, prefetch, and its cursor.

Step s of training takes the global sequences [s·G, (s+1)·G) of one deterministic stream; rank r of W takes
the contiguous slice [r·G/W, (r+1)·G/W) of them. The stream depends on the data, the config and the cursor,
never on the world size, the micro-batch size or the prefetch depth, so a run resumed on another topology
reads the same tokens in the same order.

Each bucket is read as its documents in a seeded permutation, each document followed by an end-of-document
token; a sequence is seq_len + 1 consecutive tokens of one bucket (inputs and shifted targets). A bucket is
read once: running out is exhaustion (see curriculum.py), not a new epoch.
"""
from __future__ import annotations

import copy
import hashlib
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from gpt_simple.data.curriculum import BucketExhausted, DataError, Schedule, nothing_left, resolve_phases
from gpt_simple.data.shards import Bucket
from gpt_simple.runtime import one_thread_here

Span = tuple  # (bucket, doc, token_start, token_end): tokens of the document followed by its EOS


def bucket_permutation(name: str, n_docs: int, seed: int) -> np.ndarray:
    # Seed from (data.seed, bucket name) so adding a bucket does not reshuffle the others.
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(n_docs)


class BucketReader:
    """Cursor over one bucket: position in its document permutation + offset inside that document."""

    def __init__(self, bucket: Bucket, seed: int):
        self.bucket = bucket
        self.perm = bucket_permutation(bucket.name, bucket.n_docs, seed)
        sizes = bucket.lengths[self.perm] + 1  # + end-of-document token
        self.ends = np.cumsum(sizes)  # tokens consumed once document perm[i] is done
        self.total = int(self.ends[-1]) if len(self.ends) else 0

    def consumed(self, cursor: list[int]) -> int:
        pos, offset = cursor
        return (int(self.ends[pos - 1]) if pos > 0 else 0) + offset

    def remaining(self, cursor: list[int]) -> int:
        return self.total - self.consumed(cursor)

    def take(self, cursor: list[int], n: int) -> tuple[list[Span], list[int]]:
        """Spans covering the next n tokens, and the cursor after them (caller checks remaining() first)."""
        pos, offset = cursor
        spans = []
        while n > 0:
            doc = int(self.perm[pos])
            size = int(self.bucket.lengths[doc]) + 1
            end = min(size, offset + n)
            spans.append((self.bucket.name, doc, offset, end))
            n -= end - offset
            pos, offset = (pos + 1, 0) if end == size else (pos, end)
        return spans, [pos, offset]

    def tokens(self, spans: list[Span]) -> np.ndarray:
        parts = []
        for _, doc, start, end in spans:
            length = int(self.bucket.lengths[doc])
            parts.append(np.asarray(self.bucket.document(doc, start, min(end, length)), dtype=np.int64))
            if end > length:
                parts.append(np.array([self.bucket.eos], dtype=np.int64))
        return np.concatenate(parts)


@dataclass
class StepPlan:
    """What one optimizer step reads: the spans of each global sequence, and the cursor after it."""
    step: int
    sequences: list[list[Span]]
    state_after: dict
    events: list[dict] = field(default_factory=list)


@dataclass
class Batch:
    plan: StepPlan
    inputs: torch.Tensor   # (accumulation steps, micro batch, seq_len) of this rank
    targets: torch.Tensor


class DataStream:
    def __init__(self, buckets: dict[str, Bucket], curriculum: list, seq_len: int, seed: int,
                 allow_exhaustion: bool, global_batch: int, micro_batch: int, rank: int, world_size: int,
                 prefetch: int = 2):
        self.readers = {name: BucketReader(b, seed) for name, b in buckets.items()}
        self.phases = resolve_phases(curriculum, {n: r.total for n, r in self.readers.items()})
        self.seq_len, self.allow_exhaustion = seq_len, allow_exhaustion
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.prefetch, self.seed = prefetch, seed
        self._state = self.initial_state()
        self._worker: _Prefetcher | None = None

    def initial_state(self) -> dict:
        schedule = Schedule(self.phases, self.seq_len)
        return {"step": 0, "sequences": 0, "schedule": schedule.state_dict(),
                "cursors": {name: [0, 0] for name in self.readers},
                "fingerprint": self.fingerprint(), "seed": self.seed}

    @property
    def tokenizer(self) -> str:
        return next(iter(self.readers.values())).bucket.tokenizer

    def fingerprint(self) -> dict:
        """What a cursor assumes about the data: documents and tokens per bucket."""
        return {name: [r.bucket.n_docs, r.bucket.n_tokens] for name, r in sorted(self.readers.items())}

    # -- checkpointed state: what the optimizer has consumed, never what was prefetched --------------------
    checkpoint_scope = "global"

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved cursor; refuses one that was taken over other data or another data.seed."""
        saved, now = state.get("fingerprint"), self.fingerprint()
        if saved != now or state.get("seed") != self.seed:
            raise DataError(f"the data changed since this checkpoint (buckets [docs, tokens] then {saved}, now "
                            f"{now}; data.seed then {state.get('seed')}, now {self.seed}); resuming would not "
                            f"continue the same data stream")
        missing = set(self.readers) - set(state["cursors"])
        extra = set(state["cursors"]) - set(self.readers)
        if missing or extra:
            raise DataError(f"the checkpointed data cursor has buckets {sorted(state['cursors'])}, data.dir has "
                            f"{sorted(self.readers)}: the buckets in data.dir changed since the checkpoint")
        Schedule(self.phases, self.seq_len).load_state_dict(state["schedule"])  # refuses an incompatible one
        for name, (pos, offset) in state["cursors"].items():
            if not (0 <= pos <= self.readers[name].bucket.n_docs and offset >= 0) or \
                    self.readers[name].remaining([pos, offset]) < 0:
                raise DataError(f"the checkpointed data cursor of bucket {name!r} ({pos}, {offset}) lies outside "
                                f"its {self.readers[name].bucket.n_docs} documents")
        self.close()
        self._state = copy.deepcopy(state)

    def capacity(self, state: dict | None = None) -> dict[str, int]:
        """Whole sequences each bucket can still supply from `state` (default: the committed cursor)."""
        state = self._state if state is None else state
        return {name: r.remaining(state["cursors"][name]) // (self.seq_len + 1) for name, r in self.readers.items()}

    def commit(self, batch: Batch) -> None:
        """The optimizer consumed this batch: the saved cursor moves past it."""
        self._state = copy.deepcopy(batch.plan.state_after)

    # -- planning: a pure function of the state ----------------------------------------------------------
    def plan(self, state: dict) -> StepPlan:
        state = copy.deepcopy(state)
        schedule = Schedule(self.phases, self.seq_len)
        schedule.load_state_dict(state["schedule"])
        sequences, events = [], []
        need = self.seq_len + 1
        while len(sequences) < self.global_batch:
            bucket = schedule.peek()
            if bucket is None:
                raise nothing_left(schedule)
            reader = self.readers[bucket]
            cursor = state["cursors"][bucket]
            left = reader.remaining(cursor)
            if left < need:
                remaining = [b for b in schedule.active_weights() if b != bucket]
                if not self.allow_exhaustion:
                    raise BucketExhausted(bucket, schedule.phase, need - left, remaining)
                if not remaining:  # the last bucket of the phase: dropping it would leave nothing
                    raise BucketExhausted(bucket, schedule.phase, need - left, [], final=True)
                schedule.drop(bucket)
                events.append({"kind": "bucket_dropped", "bucket": bucket, "phase": schedule.phase,
                               "step": state["step"] + 1, "tokens_unused": left,
                               "mix": {b: float(w) for b, w in schedule.active_weights().items()}})
                continue
            schedule.advance(bucket)
            spans, state["cursors"][bucket] = reader.take(cursor, need)
            sequences.append(spans)
        state["step"] += 1
        state["sequences"] += len(sequences)
        state["schedule"] = schedule.state_dict()
        return StepPlan(state["step"], sequences, state, events)

    def materialize(self, plan: StepPlan) -> Batch:
        per_rank = self.global_batch // self.world_size
        mine = plan.sequences[self.rank * per_rank:(self.rank + 1) * per_rank]
        rows = np.stack([self.readers[seq[0][0]].tokens(seq) for seq in mine])
        data = torch.from_numpy(rows).view(per_rank // self.micro_batch, self.micro_batch, self.seq_len + 1)
        return Batch(plan, data[..., :-1].contiguous(), data[..., 1:].contiguous())

    def next_batch(self) -> Batch:
        """The batch of the step after the last committed one (prefetched in the background if enabled)."""
        if self.prefetch == 0:
            return self.materialize(self.plan(self._state))
        if self._worker is None:
            self._worker = _Prefetcher(self, self._state, self.prefetch)
        batch = self._worker.get()
        if batch.plan.step != self._state["step"] + 1:
            # The consumer skipped a commit (should not happen); restart from the committed cursor.
            self.close()
            return self.next_batch()
        return batch

    def close(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None


class _Prefetcher:
    """Plans and materialises the next batches on a thread; errors (exhaustion) surface on get()."""

    def __init__(self, stream: DataStream, state: dict, depth: int):
        self.stream, self.queue = stream, queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(copy.deepcopy(state),), daemon=True,
                                       name="data-prefetch")
        self.thread.start()

    def _run(self, state: dict) -> None:
        one_thread_here()
        while not self.stopping.is_set():
            try:
                item = self.stream.materialize(self.stream.plan(state))
            except BaseException as e:  # delivered to the consumer in order
                item = e
            # A blocking put: the thread sleeps until the loop takes a batch. (Polling with a timeout woke it
            # every 0.1 s to take the GIL from the training loop, which showed up as data wait.) stop() drains
            # the queue to release it.
            self.queue.put(item)
            if isinstance(item, BaseException):
                return
            state = item.plan.state_after

    def get(self) -> Batch:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        self.stopping.set()
        deadline = time.monotonic() + 10
        while self.thread.is_alive() and time.monotonic() < deadline:
            try:
                while True:
                    self.queue.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=0.05)
