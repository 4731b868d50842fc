"""Amending the data plan at a resume (data/amend.py, data/layout.py), in process: the new mix holds from the
amendment on within one sequence, the same amendment gives the same tokens whatever the interruptions and world
sizes, appended documents are read once after the pass's remaining ones without touching the order already
scheduled, and a change that rewrites history is refused with one line."""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from gpt_simple.data.curriculum import DataError, exact_weights
from gpt_simple.data.layout import runs
from gpt_simple.data.shards import ShardWriter, open_buckets
from gpt_simple.data.stream import DataStream, bucket_permutation
from helpers.data import write_bucket

SEQ, G = 16, 8
EVEN = [{"mix": {"a": 1, "b": 1}}]
NINE = [{"mix": {"a": 9, "b": 1}}]


def stream(data, curriculum, *, amend=False, rank=0, world=1, allow=False):
    return DataStream(open_buckets(data), list(curriculum), SEQ, 1, allow, G, G // world, rank, world, 0,
                      amend=amend)


def steps(data, curriculum, n, state=None, *, amend=False, world=1):
    """n steps on `world` rank views resumed from `state`: the global sequences' spans per step, the final state."""
    ranks = [stream(data, curriculum, amend=amend, rank=r, world=world) for r in range(world)]
    for s in ranks:
        if state is not None:
            s.load_state_dict(json.loads(json.dumps(state)))
    out = []
    for _ in range(n):
        batches = [s.next_batch() for s in ranks]
        assert all(b.plan.sequences == batches[0].plan.sequences for b in batches)
        out.append(batches[0].plan.sequences)
        for s, b in zip(ranks, batches):
            s.commit(b)
    return out, ranks[0].state_dict()


def append_shard(data: Path, bucket: str, name: str, lengths, seed: int = 9) -> None:
    rng = np.random.default_rng(seed)
    w = ShardWriter(data / bucket / name, 257, "byte", 256)
    for n in lengths:
        w.add(rng.integers(0, 256, size=n).astype(np.uint16))
    w.close()


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    write_bucket(tmp_path, "a", rng.integers(1, 60, size=200), seed=1, shards=2)
    write_bucket(tmp_path, "b", rng.integers(1, 60, size=200), seed=2)
    return tmp_path


def buckets_of(seqs) -> list[str]:
    return [seq[0][0] for step in seqs for seq in step]


def test_an_amended_mix_holds_within_one_sequence_from_the_amendment_on(data):
    before, state = steps(data, EVEN, 10)
    with pytest.raises(DataError, match=r"data plan differs .*phase 0: \{a = 1, b = 1\} to the end -> "
                                        r"\{a = 9, b = 1\} to the end.*--data.amend true"):
        stream(data, NINE).load_state_dict(state)
    after, later = steps(data, NINE, 12, state, amend=True)
    w = exact_weights({"a": 9, "b": 1})
    counts = {"a": 0, "b": 0}
    for n, b in enumerate(buckets_of(after), 1):
        counts[b] += 1
        assert all(abs(w[x] * n - counts[x]) < 1 for x in w), (n, counts)
    assert later["plan"]["number"] == 1 and later["plan"]["amendments"][0]["step"] == 10
    # later resumes know the plan: no new amendment, nothing asked
    _, again = steps(data, NINE, 1, later)
    assert again["plan"]["number"] == 1 and len(again["plan"]["amendments"]) == 1


def test_an_amendment_reads_the_same_tokens_whatever_the_interruptions_and_world_sizes(data):
    _, state = steps(data, EVEN, 6)
    straight, _ = steps(data, NINE, 8, state, amend=True)
    chained, s = [], state
    for n, world in ((3, 2), (1, 1), (4, 2)):
        got, s = steps(data, NINE, n, s, amend=True, world=world)
        chained += got
    assert chained == straight


def test_a_completed_phase_is_history(data):
    two = [{"tokens": 2 * G * SEQ, "mix": {"a": 1}}, {"mix": {"b": 1}}]
    _, state = steps(data, two, 3)
    changed = [{"tokens": 2 * G * SEQ, "mix": {"a": 1, "b": 1}}, {"mix": {"b": 1}}]
    with pytest.raises(DataError, match=r"data.curriculum\[0\]: phase 0 is complete .*cannot be amended"):
        stream(data, changed, amend=True).load_state_dict(state)
    with pytest.raises(DataError, match=r"phase 0 is complete"):  # without phase 1, phase 0 would run on
        stream(data, two[:1], amend=True).load_state_dict(state)
    # the phase in progress may change, and phases may be added after it
    three = [*two[:1], {"tokens": 3 * G * SEQ, "mix": {"b": 1}}, {"mix": {"a": 1}}]
    seqs, _ = steps(data, three, 3, state, amend=True)
    assert buckets_of(seqs) == ["b"] * (2 * G) + ["a"] * G


def test_a_budget_cannot_end_before_what_its_phase_has_read(data):
    _, state = steps(data, EVEN, 4)
    short = [{"tokens": 3 * G * SEQ, "mix": {"a": 1, "b": 1}}, {"mix": {"a": 1}}]
    with pytest.raises(DataError, match=r"data.curriculum\[0\].tokens = 384: phase 0 has already read 512 tokens"):
        stream(data, short, amend=True).load_state_dict(state)
    exact = [{"tokens": 4 * G * SEQ, "mix": {"a": 1, "b": 1}}, {"mix": {"a": 1}}]  # ends the phase here: the
    seqs, _ = steps(data, exact, 2, state, amend=True)                              # annealing phase starts
    assert buckets_of(seqs) == ["a"] * (2 * G)


def test_appended_documents_are_read_once_after_the_pass_remaining_ones(data):
    only_a = [{"mix": {"a": 1}}]
    first, state = steps(data, only_a, 3)
    append_shard(data, "a", "shard-00002", [30] * 40)
    with pytest.raises(DataError, match=r"bucket 'a': 1 shard\(s\) appended \(40 documents\)"):
        stream(data, only_a).load_state_dict(state)
    total = stream(data, only_a).readers["a"].total
    seqs, after = steps(data, only_a, total // ((SEQ + 1) * G) - 3, state, amend=True)
    read = [span[1] for step in first + seqs for seq in step for span in seq if span[2] == 0]
    original = bucket_permutation("a", 200, 1).tolist()
    assert read[:200] == original  # the order already scheduled, whole, each document once
    assert len(read[200:]) > 30 and len(set(read[200:])) == len(read[200:]) and min(read[200:]) >= 200
    assert after["plan"]["generations"]["a"] == [[2, -1], [3, 0]]
    built = [json.loads(x)["file"] for x in (data / "a" / ".index" / "builds.log").read_text().splitlines()]
    assert built.count("order-seed1-pass0.bin") == 1 and "order-seed1-pass0-from2.bin" in built


def test_a_new_bucket_joins_the_mix(data):
    _, state = steps(data, EVEN, 3)
    write_bucket(data, "c", [40] * 50, seed=5)
    with_c = [{"mix": {"a": 1, "b": 1, "c": 2}}]
    seqs, after = steps(data, with_c, 4, state, amend=True)
    assert buckets_of(seqs).count("c") == 2 * G and after["cursors"]["c"] != [0, 0]
    assert "bucket 'c' added (50 documents)" in after["plan"]["amendments"][0]["changes"]


def test_rewriting_history_is_refused_naming_the_shard(data):
    _, state = steps(data, EVEN, 2)
    shard = data / "a" / "shard-00001"
    for suffix in (".idx", ".bin"):
        shard.with_suffix(suffix).rename(data / f"kept{suffix}")
    with pytest.raises(DataError, match=r"a/shard-00001.idx: removed since the checkpoint"):
        stream(data, EVEN, amend=True).load_state_dict(state)
    append_shard(data, "a", "shard-00001", [5, 6])
    with pytest.raises(DataError, match=r"a/shard-00001.idx: rewritten since the checkpoint"):
        stream(data, EVEN, amend=True).load_state_dict(state)
    for suffix in (".idx", ".bin"):
        (data / f"kept{suffix}").replace(shard.with_suffix(suffix))
    append_shard(data, "a", "shard-0000-early", [5, 6])
    with pytest.raises(DataError, match=r"shard-0000-early.idx: sorts before shard-00000.idx"):
        stream(data, EVEN, amend=True).load_state_dict(state)


def test_layout_of_appended_generations():
    layout = runs([3, 2, 4], [30, 20, 40], [[1, -1], [2, 0], [3, 1]], passes=3)
    assert [(r.pass_, r.first, r.end, r.tag, r.position) for r in layout] == [
        (0, 0, 1, "", 0), (0, 1, 2, "from1", 3), (1, 0, 2, "", 5), (1, 2, 3, "from2", 10), (2, 0, 3, "", 14)]
    assert layout[-1].tokens_before == (30 + 3) + (20 + 2) + (50 + 5) + (40 + 4)


def test_a_checkpoint_from_before_plans_resumes_under_the_config(data):
    _, state = steps(data, EVEN, 2)
    legacy = {k: v for k, v in state.items() if k != "plan"}
    ref, _ = steps(data, EVEN, 2, state)
    got, after = steps(data, EVEN, 2, legacy)
    assert got == ref and after["plan"]["number"] == 0
    assert Fraction(1, 2) == exact_weights({"a": 1, "b": 1})["a"]


@pytest.mark.parametrize("seed", range(6))
def test_the_lag_restarts_at_the_amendment_for_any_mixes(seed):
    """The schedule alone: n sequences under one mix, then another; from the amendment on every bucket's lag
    against the new weights stays inside (-1, 1) at every sequence."""
    from gpt_simple.data.amend import _carry_schedule
    from gpt_simple.data.curriculum import Phase, Schedule
    from helpers.curriculum import next_bucket
    rng = np.random.default_rng(seed)
    names = ["a", "b", "c", "d"][:int(rng.integers(2, 5))]
    old_mix, new_mix = ({b: int(rng.integers(1, 10)) for b in names} for _ in range(2))
    if exact_weights(old_mix) == exact_weights(new_mix):  # an unchanged mix is no amendment of the phase
        new_mix[names[0]] += 1
    old = Schedule([Phase(0, old_mix)], seq_len=1)
    for _ in range(int(rng.integers(1, 200))):
        next_bucket(old)
    old.settle()
    new = Schedule([Phase(0, new_mix)], seq_len=1)
    new.load_state_dict(_carry_schedule(old, new.phases, 1, []))
    w, counts = exact_weights(new_mix), dict.fromkeys(names, 0)
    for n in range(1, 300):
        counts[next_bucket(new)] += 1
        assert all(abs(w[b] * n - counts[b]) < 1 for b in names), (n, counts)


def test_a_bucket_that_ran_dry_reads_its_appended_shard(tmp_path):
    from gpt_simple.data.curriculum import BucketExhausted
    write_bucket(tmp_path, "a", [40] * 10, seed=1)
    write_bucket(tmp_path, "b", [40] * 100, seed=2)
    s = stream(tmp_path, EVEN)
    with pytest.raises(BucketExhausted):
        while True:
            s.commit(s.next_batch())
    state = s.state_dict()
    append_shard(tmp_path, "a", "shard-00001", [40] * 10)
    seqs, after = steps(tmp_path, EVEN, 2, state, amend=True)
    old = [span for step in seqs for seq in step for span in seq if span[0] == "a" and span[1] < 10]
    assert len(old) == 1 and old[0][2] > 0  # only the rest of the document the cursor was in, never a read token
    assert {span[1] for step in seqs for seq in step for span in seq if span[0] == "a"} - {old[0][1]} <= \
        set(range(10, 20))
    assert after["plan"]["generations"]["a"] == [[1, -1], [2, 0]]
