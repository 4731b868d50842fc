"""Curriculum helpers: one schedule pick, and the exact worst mix lag of a one-phase schedule."""
from __future__ import annotations

from fractions import Fraction

from gpt_simple.data.curriculum import Phase, Schedule, exact_weights


def next_bucket(sched: Schedule) -> str | None:
    """Schedule.peek() then Schedule.advance(): take the next sequence's bucket (None when every bucket of the phase
    was dropped)."""
    bucket = sched.peek()
    if bucket is not None:
        sched.advance(bucket)
    return bucket


def max_lag(weights: dict, n: int) -> Fraction:
    """Run the schedule for n sequences of one phase; the largest |w_b·t − c_b(t)| over all b and t ≤ n, exact.

    Between two picks of b its lag only grows, and a pick lowers it by 1, so the extremes are just before and
    just after each pick of b, and at the end: checking those is checking every step."""
    sched = Schedule([Phase(0, weights)], seq_len=1)
    w = exact_weights(weights)
    counts = dict.fromkeys(w, 0)
    worst = Fraction(0)
    for t in range(n):
        b = next_bucket(sched)
        before = w[b] * t - counts[b]
        counts[b] += 1
        after = w[b] * (t + 1) - counts[b]
        worst = max(worst, abs(before), abs(after))
    for b in w:
        worst = max(worst, abs(w[b] * n - counts[b]))
    return worst
