"""Token-bucket curriculum: phases with token budgets and mixes, and the deterministic bucket schedule.

A phase lasts ceil(tokens / seq_len) sequences (a sequence counts seq_len tokens; the last phase runs until the
end of training); its mix gives each bucket a weight, normalised exactly (as fractions) to w_b with sum 1.

The schedule decides which bucket each next sequence comes from, with no random draw. After n sequences of a
phase, bucket b has supplied c_b of them and its lag is w_b·n − c_b. The schedule keeps every lag strictly
inside (−1, 1) at every n: the realised mix is within one sequence of the target at every step. It is a
uniprocessor Pfair schedule (Baruah et al. 1996): the j-th sequence of bucket b has the window
[floor((j−1)/w_b), ceil(j/w_b)) of sequence slots; slot n goes to the bucket whose next sequence is released
(floor(c_b/w_b) ≤ n) and has the earliest deadline ceil((c_b+1)/w_b), ties to the first name. Earliest-deadline
-first meets every deadline because the weights sum to 1, and meeting every window is exactly |lag| < 1.
All arithmetic is on integers (the weights as exact fractions of the decimals written in the config), so the
schedule is the same on every machine and its state is a few integers: phase, sequences so far, per-bucket
counts, dropped buckets.

(The first version chose the bucket with the most accrued credit — nginx's smooth weighted round robin — whose
lag reaches 1.17 sequences for some mixes of 8 buckets; tests/unit/test_data_curriculum.py shows both.)

A bucket that cannot supply its next sequence is exhausted: with allow_bucket_exhaustion it is dropped for the
rest of the run and the others are renormalised from that sequence on (the lag bound restarts there);
otherwise the run halts (see the trainer). An amended plan (amend.py) restarts the bound the same way at the
step boundary where it takes effect.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

SCHEDULE_VERSION = 2


class DataError(ValueError):
    """Data that cannot serve the config (unknown bucket, empty mix, ...): a user-facing one-line error."""


class BucketExhausted(Exception):
    """The scheduled bucket cannot supply its next sequence."""

    def __init__(self, bucket: str, phase: int, tokens_short: int, remaining: list[str], final: bool = False):
        self.bucket, self.phase, self.tokens_short, self.remaining = bucket, phase, tokens_short, remaining
        self.final = final  # True: no bucket of the phase is left, allowing exhaustion cannot continue the run
        if final:
            message = (f"no bucket of phase {phase} can supply the next sequence ({bucket} ran dry, any other was "
                       f"dropped before): nothing is left to train on; lower training.max_steps (more data means "
                       f"a new run)")
        else:
            message = f"bucket {bucket!r} ran dry in phase {phase} ({tokens_short} tokens short of a sequence)"
        super().__init__(message)


@dataclass
class Phase:
    tokens: int  # 0 = until the end of training (last phase only)
    mix: dict[str, float]


def resolve_phases(curriculum: list[dict], bucket_tokens: dict[str, int]) -> list[Phase]:
    """The configured phases, checked against the buckets on disk; none configured = one phase mixed by size."""
    if not curriculum:
        mix = {name: n for name, n in sorted(bucket_tokens.items()) if n > 0}
        if not mix:
            raise DataError("data.dir: every bucket is empty")
        return [Phase(0, mix)]
    phases = []
    for i, raw in enumerate(curriculum):
        for name in raw["mix"]:
            if name not in bucket_tokens:
                known = ", ".join(sorted(bucket_tokens)) or "none"
                raise DataError(f"data.curriculum[{i}].mix: unknown bucket {name!r} (buckets in data.dir: {known})")
        mix = {name: w for name, w in sorted(raw["mix"].items()) if w > 0}
        if not mix:
            raise DataError(f"data.curriculum[{i}].mix: every weight is 0")
        phases.append(Phase(int(raw.get("tokens", 0)), mix))
    return phases


def phase_sequences(phases: list[Phase], i: int, seq_len: int) -> int | None:
    """Sequences in phase i: ceil(tokens / seq_len); None for the last phase (it lasts until the end)."""
    tokens = phases[i].tokens
    return -(-tokens // seq_len) if tokens and i < len(phases) - 1 else None


def exact_weights(mix: dict[str, float]) -> dict[str, Fraction]:
    """Weights normalised exactly, each read as the decimal number it is written as (0.3 is 3/10, not the binary
    float nearest to it: repr() gives the shortest decimal that reads back as the same float)."""
    raw = {b: Fraction(w) if isinstance(w, int) else Fraction(repr(float(w))) for b, w in mix.items() if w > 0}
    total = sum(raw.values())
    return {b: w / total for b, w in sorted(raw.items())}


class Schedule:
    """Which bucket each next sequence comes from (see the module doc). State: phase, sequences in the phase,
    sequences and per-bucket counts in the current segment (a phase, restarted when a bucket is dropped),
    dropped buckets."""

    def __init__(self, phases: list[Phase], seq_len: int):
        self.phases, self.seq_len = phases, seq_len
        self.phase = 0
        self.phase_sequences = 0
        self.segment_sequences = 0
        self.counts: dict[str, int] = {}
        self.dropped: list[str] = []
        self._cache_key = None
        self._ints: list[tuple[str, int]] = []
        self._denominator = 1

    def _phase_limit(self, i: int) -> float:
        n = phase_sequences(self.phases, i, self.seq_len)
        return math.inf if n is None else n

    def _advance_phase(self) -> None:
        while self.phase_sequences >= self._phase_limit(self.phase):
            self.phase += 1
            self.phase_sequences = 0
            self.segment_sequences = 0
            self.counts = {}

    def active_weights(self) -> dict[str, Fraction]:
        """The normalised weights of the current phase's buckets that are not dropped."""
        return exact_weights({b: w for b, w in self.phases[self.phase].mix.items() if b not in self.dropped})

    def _integer_weights(self) -> tuple[list[tuple[str, int]], int]:
        """w_b = a_b / A with integers a_b, A (one common denominator): the schedule's arithmetic is exact."""
        key = (self.phase, tuple(self.dropped))
        if key != self._cache_key:
            weights = self.active_weights()
            denominator = math.lcm(*(w.denominator for w in weights.values())) if weights else 1
            self._ints = [(b, int(w * denominator)) for b, w in weights.items()]
            self._denominator, self._cache_key = denominator, key
        return self._ints, self._denominator

    def peek(self) -> str | None:
        """The bucket of the next sequence, without taking it (None when every bucket of the phase was dropped)."""
        self._advance_phase()
        ints, big_a = self._integer_weights()
        n, best, best_deadline = self.segment_sequences, None, None
        for bucket, a in ints:  # sorted by name: ties go to the first name
            c = self.counts.get(bucket, 0)
            if (c * big_a) // a > n:  # next sequence not released yet: it would run ahead by a whole sequence
                continue
            deadline = -((-(c + 1) * big_a) // a)
            if best_deadline is None or deadline < best_deadline:
                best, best_deadline = bucket, deadline
        return best

    def advance(self, bucket: str) -> None:
        """Record that the next sequence came from `bucket` (the one peek() returned)."""
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self.segment_sequences += 1
        self.phase_sequences += 1

    def drop(self, bucket: str) -> None:
        """The bucket ran dry: the rest of the run goes on without it, the others renormalised from here."""
        self.dropped.append(bucket)
        self.restart()

    def restart(self) -> None:
        """A new segment: the lag accounting starts again from here (a dropped bucket, an amended mix)."""
        self.counts = {}
        self.segment_sequences = 0

    def settle(self) -> int:
        """Move past phases whose budget is spent (peek() does it lazily); the phase in progress."""
        self._advance_phase()
        return self.phase

    def state_dict(self) -> dict:
        return {"version": SCHEDULE_VERSION, "phase": self.phase, "phase_sequences": self.phase_sequences,
                "segment_sequences": self.segment_sequences, "counts": dict(self.counts),
                "dropped": list(self.dropped)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != SCHEDULE_VERSION:
            raise DataError(f"the checkpointed data cursor was written by schedule version "
                            f"{state.get('version', 1)}, this code runs version {SCHEDULE_VERSION}: it cannot "
                            f"continue that data stream (start again in a new training.output_dir, or with "
                            f"training.resume = 'scratch')")
        if state["phase"] >= len(self.phases):
            raise DataError(f"the checkpointed data cursor is in curriculum phase {state['phase']}, but "
                            f"data.curriculum has {len(self.phases)} phase(s)")
        self.phase = state["phase"]
        self.phase_sequences = state["phase_sequences"]
        self.segment_sequences = state["segment_sequences"]
        self.counts = {b: int(c) for b, c in state["counts"].items()}
        self.dropped = list(state["dropped"])


def nothing_left(sched: Schedule) -> BucketExhausted:
    """Every bucket of the current phase was dropped earlier: nothing can supply the next sequence."""
    names = ", ".join(sorted(sched.phases[sched.phase].mix))
    return BucketExhausted(names, sched.phase, 0, [], final=True)


# -- prediction (gpt-simple validate / train.py --dry-run): demand against inventory, without reading tokens ----
@dataclass
class Demand:
    phase: int
    bucket: str
    weight: Fraction          # normalised weight at the start of the phase
    sequences: int            # sequences this bucket supplies in the phase (as far as the run gets)
    available: int            # whole sequences the bucket could still supply when the phase starts
    exact: bool = True        # False: predicted to within one sequence (long runs are not simulated)
    dry_at: int | None = None  # global sequence index at which the bucket ran dry in this phase


@dataclass
class Prediction:
    rows: list[Demand] = field(default_factory=list)
    phase_spans: list[tuple[int, int, int]] = field(default_factory=list)  # (phase, first seq, end seq)
    scheduled: int = 0                  # sequences the data can supply (== the request unless it halts)
    halt: BucketExhausted | None = None  # why it stops short
    halt_at: int | None = None           # global sequence index of the sequence that cannot be supplied
    drops: list[tuple[str, int, int]] = field(default_factory=list)  # (bucket, phase, global sequence index)
    exact: bool = True


def predict(phases: list[Phase], seq_len: int, capacity: dict[str, int], total: int, allow_exhaustion: bool,
            state: dict | None = None, start: int = 0, exact_limit: int = 1_000_000) -> Prediction:
    """Which bucket supplies how many of the next `total` sequences, phase by phase.

    `capacity`: whole sequences each bucket can still supply (remaining tokens // (seq_len + 1)); `state`: the
    schedule state to start from (a checkpoint's), `start`: the global index of the first sequence. Runs of up
    to `exact_limit` sequences are simulated with the real Schedule (exact); longer ones are computed from the
    lag bound (to within one sequence per bucket and phase).
    """
    sched = Schedule(phases, seq_len)
    if state is not None:
        sched.load_state_dict(state)
    if total <= exact_limit:
        return _simulate(sched, dict(capacity), total, allow_exhaustion, start)
    return _estimate(sched, dict(capacity), total, allow_exhaustion, start)


def _row(pred: Prediction, sched: Schedule, bucket: str, available: int, exact: bool) -> Demand:
    key = (sched.phase, bucket)
    for row in reversed(pred.rows):
        if (row.phase, row.bucket) == key:
            return row
    row = Demand(sched.phase, bucket, sched.active_weights().get(bucket, Fraction(0)), 0, available, exact)
    pred.rows.append(row)
    return row


def _open_phase(pred: Prediction, sched: Schedule, capacity: dict[str, int], index: int, exact: bool) -> None:
    if not pred.phase_spans or pred.phase_spans[-1][0] != sched.phase:
        pred.phase_spans.append((sched.phase, index, index))
        for bucket in sched.active_weights():
            _row(pred, sched, bucket, capacity[bucket], exact)


def _close_phase(pred: Prediction, end: int) -> None:
    if pred.phase_spans:
        phase, first, _ = pred.phase_spans[-1]
        pred.phase_spans[-1] = (phase, first, end)


def _exhaust(pred: Prediction, sched: Schedule, bucket: str, capacity: dict, allow: bool, index: int,
             exact: bool) -> bool:
    """The bucket cannot supply sequence `index`: drop it (True: go on) or record the halt (False)."""
    _row(pred, sched, bucket, capacity[bucket], exact).dry_at = index
    remaining = [b for b in sched.active_weights() if b != bucket]
    if allow and remaining:
        sched.drop(bucket)
        pred.drops.append((bucket, sched.phase, index))
        return True
    pred.halt = BucketExhausted(bucket, sched.phase, 0, remaining, final=allow)  # allowed: it was the last
    pred.halt_at = index
    return False


def _simulate(sched: Schedule, capacity: dict[str, int], total: int, allow: bool, start: int) -> Prediction:
    pred = Prediction()
    index = start
    while index < start + total:
        bucket = sched.peek()
        _open_phase(pred, sched, capacity, index, True)
        if bucket is None:
            pred.halt, pred.halt_at = nothing_left(sched), index
            break
        if capacity[bucket] <= 0:
            if _exhaust(pred, sched, bucket, capacity, allow, index, True):
                continue
            break
        sched.advance(bucket)
        capacity[bucket] -= 1
        _row(pred, sched, bucket, 0, True).sequences += 1
        index += 1
        _close_phase(pred, index)
    pred.scheduled = index - start
    return pred


def _estimate(sched: Schedule, capacity: dict[str, int], total: int, allow: bool, start: int) -> Prediction:
    """Segment by segment from the lag bound: after n sequences of a segment, bucket b has supplied
    c_b(0) + (w_b·n rounded one way or the other) sequences."""
    pred = Prediction(exact=False)
    index, end = start, start + total
    while index < end:
        sched.peek()  # moves to the next phase where the current one is complete
        _open_phase(pred, sched, capacity, index, False)
        weights = sched.active_weights()
        if not weights:
            pred.halt, pred.halt_at = nothing_left(sched), index
            break
        limit = sched._phase_limit(sched.phase)
        m = int(min(limit - sched.phase_sequences, end - index))
        n0 = sched.segment_sequences
        # The first bucket that would need more sequences than it has, and where in the segment.
        dry = None
        for b, w in weights.items():
            need_at_end = math.ceil(w * (n0 + m)) - sched.counts.get(b, 0)
            if need_at_end > capacity[b]:
                # its (counts + capacity + 1)-th sequence is released at slot floor((counts + capacity) / w)
                slot = max(n0, math.floor((sched.counts.get(b, 0) + capacity[b]) / w))
                if dry is None or slot < dry[1]:
                    dry = (b, slot)
        stop = dry[1] - n0 if dry else m
        for b, w in weights.items():
            got = min(capacity[b], max(0, math.ceil(w * (n0 + stop)) - sched.counts.get(b, 0)))
            _row(pred, sched, b, 0, False).sequences += got
            capacity[b] -= got
            sched.counts[b] = sched.counts.get(b, 0) + got
        sched.segment_sequences += stop
        sched.phase_sequences += stop
        index += stop
        _close_phase(pred, index)
        if dry:
            if not _exhaust(pred, sched, dry[0], capacity, allow, index, False):
                break
    pred.scheduled = index - start
    return pred
