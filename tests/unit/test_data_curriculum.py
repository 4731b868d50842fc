"""The curriculum schedule: the realised mix stays within one sequence of the target at every step (a seeded
property sweep over many random weight sets), phase boundaries, drops, resumable state, demand prediction."""
from __future__ import annotations

import json
import random
from fractions import Fraction

import pytest

from gpt_simple.data.curriculum import (DataError, Phase, Schedule, exact_weights, predict, resolve_phases)
from helpers.curriculum import max_lag, next_bucket


def random_weights(rng: random.Random) -> dict:
    k = rng.choice([1, 2, 2, 3, 3, 4, 5, 6, 8, 10, 13])
    kind = rng.choice(["float", "int", "decimal", "skewed", "equal", "mixed"])
    if kind == "float":
        ws = [rng.random() + 1e-9 for _ in range(k)]
    elif kind == "int":
        ws = [rng.randint(1, 100) for _ in range(k)]
    elif kind == "decimal":
        ws = [rng.randint(1, 9) / 10 for _ in range(k)]
    elif kind == "skewed":
        ws = [10 ** rng.uniform(-6, 6) for _ in range(k)]
    elif kind == "equal":
        ws = [1.0] * k
    else:
        ws = [rng.choice([rng.random(), rng.randint(1, 10), rng.random() ** 4]) for _ in range(k)]
    return {f"b{i}": w for i, w in enumerate(ws)}


def test_mix_within_one_sequence_at_every_step_seeded_sweep():
    """1,500 random weight sets x up to 1,500 sequences each: every lag stays strictly below one sequence."""
    rng = random.Random(20240601)
    worst, worst_case, worst_short = Fraction(0), None, Fraction(0)
    for _ in range(1500):
        weights = random_weights(rng)
        n = rng.choice([1, 7, 64, 333, 1000, 1500])
        lag = max_lag(weights, n)
        assert lag < 1, (weights, n)
        if lag > worst:
            worst, worst_case = lag, (weights, n)
        # weights with short decimals (common denominator q) stay within 1 - 1/q
        q = sum(exact_weights(weights).values(), Fraction(0)).denominator * \
            max(w.denominator for w in exact_weights(weights).values())
        if q < 10**6:
            assert lag <= 1 - Fraction(1, q)
            worst_short = max(worst_short, lag)
    print(f"worst lag over the sweep: 1 - {float(1 - worst):.3g} sequences ({worst_case}); "
          f"{float(worst_short):.4f} over weight sets with short decimals")


# The first version of the schedule: most accrued credit wins (smooth weighted round robin). Kept here to show
# that the bound needs the earliest-deadline rule: its lag exceeds one sequence for this mix.
def greedy_credit_lag(weights: dict, n: int) -> float:
    total = sum(weights.values())
    w = {b: x / total for b, x in weights.items()}
    credits, counts, worst = dict.fromkeys(w, 0.0), dict.fromkeys(w, 0), 0.0
    for t in range(1, n + 1):
        for b in w:
            credits[b] += w[b]
        best = max(sorted(w), key=lambda b: credits[b])
        credits[best] -= 1.0
        counts[best] += 1
        worst = max(worst, max(abs(w[b] * t - counts[b]) for b in w))
    return worst


def test_the_old_credit_schedule_broke_the_bound_the_new_one_keeps_it():
    mix = {"b0": 6, "b1": 0.19506914199575745, "b2": 9, "b3": 0.19786760703784745, "b4": 0.04883441946352805,
           "b5": 0.8617859861812829, "b6": 6, "b7": 0.864029038158375}
    assert greedy_credit_lag(mix, 200) > 1.1
    assert max_lag(mix, 2000) < 1


def test_exact_counts_at_the_end_of_an_integral_phase():
    sched = Schedule([Phase(0, {"a": 1, "b": 2, "c": 0.5})], seq_len=8)  # 2/7, 4/7, 1/7
    picks = [next_bucket(sched) for _ in range(700)]
    assert (picks.count("a"), picks.count("b"), picks.count("c")) == (200, 400, 100)
    assert picks[:7].count("b") == 4  # exact after every 7


def test_phase_boundaries_at_exact_token_counts():
    seq_len = 16
    phases = [Phase(100 * seq_len, {"a": 1}), Phase(50 * seq_len + 1, {"b": 1, "a": 1}), Phase(0, {"c": 1})]
    sched = Schedule(phases, seq_len)
    picks = [next_bucket(sched) for _ in range(300)]
    assert picks[:100] == ["a"] * 100
    # 50 x 16 + 1 tokens: the phase ends at the first sequence boundary at or after its budget (51 sequences)
    assert set(picks[100:151]) == {"a", "b"} and abs(picks[100:151].count("a") - 25.5) < 1
    assert picks[151:] == ["c"] * 149


def test_each_phase_restarts_the_mix_account():
    phases = [Phase(3, {"a": 1, "b": 1}), Phase(0, {"a": 1, "b": 1})]
    sched = Schedule(phases, seq_len=1)
    picks = [next_bucket(sched) for _ in range(5)]
    assert picks == ["a", "b", "a", "a", "b"]  # phase 1 starts afresh: "a" (first name) leads again


def test_state_round_trip_continues_identically():
    phases = [Phase(137 * 4, {"x": 0.3, "y": 0.7}), Phase(0, {"x": 1, "y": 1, "z": 3})]
    ref = Schedule(phases, 4)
    expected = [next_bucket(ref) for _ in range(400)]
    for cut in (0, 1, 136, 137, 138, 399):
        a = Schedule(phases, 4)
        head = [next_bucket(a) for _ in range(cut)]
        b = Schedule(phases, 4)
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        assert head + [next_bucket(b) for _ in range(400 - cut)] == expected


def test_drop_renormalises_and_restarts_the_bound():
    sched = Schedule([Phase(0, {"a": 1, "b": 1, "c": 2})], seq_len=1)
    for _ in range(10):
        next_bucket(sched)
    sched.drop("c")
    assert sched.active_weights() == {"a": Fraction(1, 2), "b": Fraction(1, 2)}
    picks = [next_bucket(sched) for _ in range(10)]
    assert picks.count("a") == picks.count("b") == 5
    sched.drop("a")
    sched.drop("b")
    assert sched.peek() is None


def test_old_state_is_refused():
    sched = Schedule([Phase(0, {"a": 1})], 8)
    with pytest.raises(DataError, match="schedule version 1"):
        sched.load_state_dict({"phase": 0, "phase_sequences": 3, "credits": {"a": 0.0}, "dropped": []})


def test_resolve_phases():
    assert resolve_phases([], {"a": 30, "b": 0, "c": 10}) == [Phase(0, {"a": 30, "c": 10})]
    with pytest.raises(DataError, match="unknown bucket 'd' .*buckets in data.dir: a, b"):
        resolve_phases([{"tokens": 5, "mix": {"d": 1}}], {"a": 1, "b": 1})
    phases = resolve_phases([{"tokens": 5, "mix": {"b": 1, "a": 0}}, {"mix": {"a": 2}}], {"a": 1, "b": 1})
    assert phases == [Phase(5, {"b": 1}), Phase(0, {"a": 2})]


def test_prediction_estimate_agrees_with_the_exact_simulation():
    """Long runs are estimated from the lag bound: within one sequence per bucket and phase where no bucket runs
    dry, and conservative where one does (it never predicts a halt later than the exact schedule has it)."""
    rng = random.Random(7)
    for _ in range(60):
        k = rng.randint(1, 5)
        names = [f"b{i}" for i in range(k)]
        phases = [Phase(rng.randint(1, 400) * 8, {b: rng.randint(1, 9) for b in rng.sample(names, rng.randint(1, k))})
                  for _ in range(rng.randint(1, 3))]
        capacity = {b: rng.choice([rng.randint(0, 600), 10**9]) for b in names}
        total = rng.randint(1, 1500)
        exact = predict(phases, 8, capacity, total, False)
        est = predict(phases, 8, capacity, total, False, exact_limit=0)
        assert exact.exact and not est.exact
        if est.halt is None:
            assert exact.halt is None
            rows = {(r.phase, r.bucket): r.sequences for r in exact.rows}
            for r in est.rows:
                assert abs(rows.get((r.phase, r.bucket), 0) - r.sequences) <= 1, (phases, capacity, total)
        elif exact.halt is not None:
            assert est.halt_at <= exact.halt_at


def test_prediction_matches_the_schedule():
    phases = [Phase(40, {"a": 1, "b": 3}), Phase(0, {"a": 1, "c": 1})]
    pred = predict(phases, 4, {"a": 100, "b": 100, "c": 100}, 30, False)
    sched = Schedule(phases, 4)
    picks = [next_bucket(sched) for _ in range(30)]
    got = {(r.phase, r.bucket): r.sequences for r in pred.rows}
    assert got == {(0, "a"): picks[:10].count("a"), (0, "b"): picks[:10].count("b"),
                   (1, "a"): picks[10:].count("a"), (1, "c"): picks[10:].count("c")}
    assert pred.phase_spans == [(0, 0, 10), (1, 10, 30)]
    short = predict(phases, 4, {"a": 100, "b": 5, "c": 100}, 30, False)
    assert short.halt is not None and short.halt.bucket == "b" and short.halt_at == picks.index("b") + \
        [i for i, p in enumerate(picks) if p == "b"][5] - picks.index("b")
    allowed = predict(phases, 4, {"a": 100, "b": 5, "c": 100}, 30, True)
    assert allowed.halt is None and allowed.drops == [("b", 0, short.halt_at)] and allowed.scheduled == 30
