"""The global sequence stream: packing, the curriculum schedule, rank slicing, prefetch, and its cursor.

Step s of training takes the global sequences [s·G, (s+1)·G) of one deterministic stream; rank r of W takes
the contiguous slice [r·G/W, (r+1)·G/W) of them. The stream depends on the data, the config and the cursor,
never on the world size, the micro-batch size or the prefetch depth, so a run resumed on another topology
reads the same tokens in the same order.

Each bucket is read as its documents in a seeded permutation, each document followed by an end-of-document
token; a sequence is seq_len + 1 consecutive tokens of one bucket (inputs and shifted targets). A bucket is
read at most its pass limit (data.max_epochs / data.epochs, default once), each pass in a fresh seeded order;
running out is exhaustion (see curriculum.py). The orders live on disk (index.py), memory-mapped; shards appended
by a plan amendment (amend.py) are read as layout.py describes.
"""
from __future__ import annotations

import copy
import os
import queue
import struct
import threading
import time
from bisect import bisect_right
from dataclasses import dataclass, field

import numpy as np
import torch

from gpt_simple.data.amend import adopt, current_plan, reconcile
from gpt_simple.data.curriculum import BucketExhausted, DataError, Schedule, nothing_left, resolve_phases
from gpt_simple.data.index import IndexCorrupt, Order, bucket_key, open_order, permutation
from gpt_simple.data.layout import initial_generations, runs, view
from gpt_simple.data.shards import DTYPES, HEADER_BYTES, Bucket
from gpt_simple.runtime import one_thread_here

Span = tuple  # (bucket, doc, token_start, token_end[, pass]): tokens of the document followed by its EOS; the
#              pass (0-based) is appended from the second pass on, so single-pass spans keep their format

CURSOR_VERSION = 2  # 1: no "cursor_version" key, single pass; 2: cursor positions count across passes


def bucket_permutation(name: str, n_docs: int, seed: int, pass_: int = 0) -> np.ndarray:
    # Seed from (data.seed, bucket name[, pass]) so adding a bucket does not reshuffle the others.
    return permutation(name, n_docs, seed, pass_)


class BucketReader:
    """Cursor over one bucket: [position, offset inside that document], the position counting documents across
    the runs of every pass (layout.py: one run per pass unless documents were appended by a plan amendment), each
    run in its own seeded order, read from its on-disk index."""

    def __init__(self, bucket: Bucket, seed: int, passes: int = 1):
        self.bucket, self.seed, self.passes = bucket, seed, passes
        self.n_docs = bucket.n_docs
        self.per_pass = bucket.n_tokens + bucket.n_docs  # + an end-of-document token per document
        self._lock = threading.Lock()
        self._starts = bucket._shard_start.tolist()
        self._fds: list | None = None
        self.set_generations(initial_generations(len(bucket.shards)))

    def set_generations(self, generations: list[list[int]]) -> None:
        """The bucket's shard generations (layout.py), from the checkpointed plan."""
        self.close()
        self.generations = [list(g) for g in generations]
        shards = self.bucket.shards
        self.runs = runs([s.header.n_docs for s in shards], [s.header.n_tokens for s in shards],
                         self.generations, self.passes)
        self._positions = [r.position for r in self.runs]
        self.end = self.runs[-1].position + self.runs[-1].n_docs if self.runs else 0
        self.total = self.runs[-1].tokens_before + self.runs[-1].n_tokens if self.runs else 0
        self._orders: dict[int, Order] = {}
        self._keys: dict[int, str] = {}

    def order(self, j: int, bad: Order | None = None) -> Order:
        """The memory-mapped order of run j (built on first use by one process; see index.py)."""
        with self._lock:
            o = self._orders.get(j)
            if o is not None and o is not bad:
                return o
            run = self.runs[j]
            part = view(self.bucket, run.first, run.end)
            if j not in self._keys:
                self._keys[j] = bucket_key(part)
            o = open_order(part, self.seed, run.pass_, self._keys[j], bad.inode if bad is not None else None,
                           run.tag)
            for old in [k for k in self._orders if k < j - 1]:  # keep the previous run; older ones are
                del self._orders[old]                           # unmapped when no thread uses them
            self._orders[j] = o
            return o

    def _with_order(self, j: int, fn):
        order = self.order(j)
        try:
            return fn(order)
        except IndexCorrupt:  # a damaged file is never used: rebuild it and read again
            return fn(self.order(j, bad=order))

    @property
    def perm(self) -> np.ndarray:
        return self.order(0).perm

    def close(self) -> None:
        with self._lock:
            for o in getattr(self, "_orders", {}).values():
                o.close()
            self._orders = {}

    def locate(self, pos: int) -> tuple[int, int]:
        """(run, position inside it) of a cursor position; the end of the layout is the end of its last run."""
        j = max(bisect_right(self._positions, pos) - 1, 0)
        return j, pos - self.runs[j].position

    def consumed(self, cursor: list[int]) -> int:
        pos, offset = cursor
        if not self.runs:
            return offset
        j, i = self.locate(pos)
        before = self._with_order(j, lambda o: o.end_before(i)) if i else 0
        return self.runs[j].tokens_before + before + offset

    def remaining(self, cursor: list[int]) -> int:
        return self.total - self.consumed(cursor)

    def take(self, cursor: list[int], n: int) -> tuple[list[Span], list[int]]:
        """Spans covering the next n tokens, and the cursor after them (caller checks remaining() first)."""
        pos, offset = cursor
        spans: list[Span] = []
        while n > 0:
            j, i = self.locate(pos)
            got, pos, offset = self._with_order(j, lambda o: self._take_in_run(o, self.runs[j], i, offset, n, spans))
            n -= got
        return spans, [pos, offset]

    def _take_in_run(self, o: Order, run, i: int, offset: int, n: int, spans: list) -> tuple[int, int, int]:
        nd, p = run.n_docs, run.pass_
        base = o.end_before(i)
        start, goal = base + offset, base + offset + n
        width = 64
        while True:
            hi = min(i + width, nd)
            o.check(i, hi)
            ends = o.ends[i:hi]
            if ends[-1] >= goal or hi == nd:
                break
            width *= 8
        k = min(int(np.searchsorted(ends, goal, side="left")), len(ends) - 1)
        docs = (o.perm[i:i + k + 1] + run.doc_base).tolist() if run.doc_base else o.perm[i:i + k + 1].tolist()
        doc_ends = ends[:k + 1].tolist()
        first = len(spans)
        prev = base
        name = self.bucket.name
        for doc, e in zip(docs, doc_ends):
            size = e - prev
            spans.append((name, doc, 0, size) if p == 0 else (name, doc, 0, size, p))
            prev = e
        last_end = doc_ends[-1]
        stop = min(goal, last_end)
        # the first span starts at the cursor's offset, the last one stops at the goal
        s0 = spans[first]
        spans[first] = (s0[0], s0[1], offset) + s0[3:]
        if goal < last_end:
            lk = spans[-1]
            doc_start = last_end - (lk[3])
            spans[-1] = (lk[0], lk[1], lk[2], goal - doc_start) + lk[4:]
            new_pos, new_off = run.position + i + k, goal - doc_start
        else:
            new_pos, new_off = run.position + i + k + 1, 0
        return stop - start, new_pos, new_off

    def _files(self) -> list[tuple[int, int, np.dtype]]:
        """Per shard: the .idx and .bin file descriptors and the token dtype (opened on first use)."""
        if self._fds is None:
            self._fds = [(os.open(sh.idx_path, os.O_RDONLY), os.open(sh.bin_path, os.O_RDONLY),
                          np.dtype(DTYPES[sh.header.dtype]).newbyteorder("<")) for sh in self.bucket.shards]
        return self._fds

    def tokens(self, spans: list[Span]) -> np.ndarray:
        """The tokens of the spans (EOS included), read with pread: documents are read at random, and a
        memory map would leave every page (and, on kernels with large page-cache folios, megabytes around it)
        mapped in this rank's resident memory; pread leaves them in the shared page cache only."""
        out = np.empty(sum(span[3] - span[2] for span in spans), dtype=np.int64)
        files, starts, one = self._files(), self._starts, len(self._starts) == 2
        at, eos = 0, self.bucket.eos
        for span in spans:
            doc, start, end = span[1], span[2], span[3]
            s = 0 if one else bisect_right(starts, doc) - 1
            fi, fb, dtype = files[s]
            a, b = _TWO_OFFSETS.unpack(os.pread(fi, 16, HEADER_BYTES + 8 * (doc - starts[s])))
            length = b - a
            if end > length + 1:
                raise DataError(f"bucket {self.bucket.name!r}: document {doc} has {length} tokens but its index "
                                f"says more: the order file is stale (delete {self.bucket.folder}/.index)")
            n = min(end, length) - start
            if n > 0:
                size = dtype.itemsize
                out[at:at + n] = np.frombuffer(os.pread(fb, n * size, (a + start) * size), dtype=dtype)
                at += n
            if end > length:
                out[at] = eos
                at += 1
        return out

    def __del__(self):
        for fi, fb, _ in self._fds or ():
            for fd in (fi, fb):
                try:
                    os.close(fd)
                except OSError:
                    pass


_TWO_OFFSETS = struct.Struct("<qq")


@dataclass
class StepPlan:
    """What one optimizer step reads: the spans of each global sequence, and the cursor after it."""
    step: int
    sequences: list[list[Span]]
    state_after: dict
    dropped: list[dict] = field(default_factory=list)  # buckets dropped by this step (exhaustion allowed)


@dataclass
class Batch:
    plan: StepPlan
    inputs: torch.Tensor   # (accumulation steps, micro batch, seq_len) of this rank
    targets: torch.Tensor


class DataStream:
    def __init__(self, buckets: dict[str, Bucket], curriculum: list, seq_len: int, seed: int,
                 allow_exhaustion: bool, global_batch: int, micro_batch: int, rank: int, world_size: int,
                 prefetch: int = 2, epochs: int | dict[str, int] = 1, amend: bool = False):
        """epochs: how many passes each bucket may be read (one number for all, or {bucket: passes}; a bucket
        not named gets 1). amend: a checkpoint taken under another data plan is amended, not refused (amend.py)."""
        self.epochs = {name: (epochs if isinstance(epochs, int) else int(epochs.get(name, 1))) for name in buckets}
        self.readers = {name: BucketReader(b, seed, self.epochs[name]) for name, b in buckets.items()}
        self.phases = resolve_phases(curriculum, {n: r.total for n, r in self.readers.items()})
        self.seq_len, self.allow_exhaustion = seq_len, allow_exhaustion
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.prefetch, self.seed, self.amend = prefetch, seed, amend
        self.amendment: dict | None = None  # the one the last load_state_dict accepted
        self._state = self.initial_state()
        self._worker: _Prefetcher | None = None

    def initial_state(self) -> dict:
        schedule = Schedule(self.phases, self.seq_len)
        return {"step": 0, "sequences": 0, "schedule": schedule.state_dict(),
                "cursors": {name: [0, 0] for name in self.readers},
                "fingerprint": self.fingerprint(), "seed": self.seed, "cursor_version": CURSOR_VERSION,
                "plan": current_plan(self)}

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
        """Continue from a saved cursor; refuses one that was taken over other data or another data.seed.

        Cursor format 1 (no "cursor_version": single pass, [position, offset]) means the same as format 2 in the
        first pass, so it resumes exactly and is saved as format 2 from then on."""
        version = state.get("cursor_version", 1)
        if version not in (1, CURSOR_VERSION):
            raise DataError(f"the checkpointed data cursor has format version {version}, this code reads 1 and "
                            f"{CURSOR_VERSION}: resume it with the gpt-simple release that wrote it, or start a new "
                            f"run (a new training.output_dir, or training.resume = 'scratch')")
        state = {**state, "cursor_version": CURSOR_VERSION}
        self.close()  # no prefetch thread may read while the layouts change
        if state.get("seed") != self.seed:
            raise DataError(f"data.seed changed since this checkpoint ({state.get('seed')} then, {self.seed} now); "
                            f"resuming would not continue the same data stream")
        state, self.amendment = reconcile(self, state, self.amend) if "plan" in state else (adopt(self, state), None)
        if set(self.readers) != set(state["cursors"]):
            raise DataError(f"the checkpointed data cursor has buckets {sorted(state['cursors'])}, data.dir has "
                            f"{sorted(self.readers)}: the buckets in data.dir changed since the checkpoint")
        for name, reader in self.readers.items():
            reader.set_generations(state["plan"]["generations"][name])
        Schedule(self.phases, self.seq_len).load_state_dict(state["schedule"])  # refuses an incompatible one
        for name, (pos, offset) in state["cursors"].items():
            r = self.readers[name]
            if not (0 <= pos <= r.end and offset >= 0) or r.remaining([pos, offset]) < 0:
                more = (f" (past pass {r.passes}, the last that data.max_epochs / data.epochs allows: raise it to "
                        f"continue)") if r.n_docs and pos >= r.end else ""
                raise DataError(f"the checkpointed data cursor of bucket {name!r} ({pos}, {offset}) lies outside "
                                f"its {r.n_docs} documents x {r.passes} pass(es){more}")
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
        sequences, dropped = [], []
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
                dropped.append({"bucket": bucket, "phase": schedule.phase,
                               "step": state["step"] + 1, "tokens_unused": left,
                               "mix": {b: float(w) for b, w in schedule.active_weights().items()}})
                continue
            schedule.advance(bucket)
            spans, state["cursors"][bucket] = reader.take(cursor, need)
            sequences.append(spans)
        state["step"] += 1
        state["sequences"] += len(sequences)
        state["schedule"] = schedule.state_dict()
        return StepPlan(state["step"], sequences, state, dropped)

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

    def passes_used(self, state: dict | None = None) -> dict[str, float]:
        """Passes each bucket has read so far (1.5 = half way through its second pass)."""
        state = self._state if state is None else state
        return {name: (r.consumed(state["cursors"][name]) / r.per_pass if r.per_pass else 0.0)
                for name, r in self.readers.items()}


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
