"""The global sequence stream: packing, independence from world size / micro-batch / prefetch, resumable
cursor (also mid-document), curriculum phases continuing each bucket's cursor, exhaustion."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from gpt_simple.data.curriculum import BucketExhausted, DataError, predict
from gpt_simple.data.shards import open_buckets
from gpt_simple.data.stream import DataStream, bucket_permutation
from helpers.data import assert_each_token_once, exact_lengths, write_bucket

SEQ, G = 16, 8


def stream(data, curriculum=(), *, rank=0, world=1, micro=G, prefetch=0, allow=False, seed=1, seq=SEQ, g=G):
    return DataStream(open_buckets(data), list(curriculum), seq, seed, allow, g, micro, rank, world, prefetch)


def run(data, steps, *, world=1, micro=G, prefetch=0, state=None, **kw):
    """Step `world` rank views together; per step the global (inputs, targets, spans), and the final state."""
    ranks = [stream(data, rank=r, world=world, micro=micro, prefetch=prefetch, **kw) for r in range(world)]
    if state is not None:
        for s in ranks:
            s.load_state_dict(json.loads(json.dumps(state)))
    out = []
    for _ in range(steps):
        batches = [s.next_batch() for s in ranks]
        assert all(b.plan.sequences == batches[0].plan.sequences for b in batches)
        assert batches[0].inputs.shape == (G // world // micro, micro, SEQ)
        inputs = np.concatenate([b.inputs.reshape(-1, SEQ).numpy() for b in batches])
        targets = np.concatenate([b.targets.reshape(-1, SEQ).numpy() for b in batches])
        out.append((inputs, targets, batches[0].plan.sequences))
        for s, b in zip(ranks, batches):
            s.commit(b)
    final = ranks[0].state_dict()
    assert all(s.state_dict() == final for s in ranks)
    for s in ranks:
        s.close()
    return out, final


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    write_bucket(tmp_path, "a", rng.integers(1, 60, size=40), seed=1, shards=2)
    write_bucket(tmp_path, "b", rng.integers(1, 9, size=120), seed=2)
    write_bucket(tmp_path, "c", [200, 3, 150, 1, 90, 400, 300, 250], seed=3)
    return tmp_path


CURRICULUM = [{"tokens": 5 * SEQ, "mix": {"a": 1, "c": 1}}, {"tokens": 13 * SEQ, "mix": {"a": 1, "b": 2, "c": 1}},
              {"mix": {"b": 1, "c": 3}}]


@pytest.mark.parametrize("curriculum", [(), CURRICULUM], ids=["by-size", "curriculum"])
def test_global_batches_do_not_depend_on_world_size_micro_batch_or_prefetch(data, curriculum):
    ref, ref_state = run(data, 6, curriculum=curriculum)
    for world, micro, prefetch in [(1, 1, 0), (1, 2, 3), (2, 1, 0), (2, 4, 2), (4, 1, 1), (4, 2, 0), (8, 1, 2)]:
        got, state = run(data, 6, world=world, micro=micro, prefetch=prefetch, curriculum=curriculum)
        assert state == ref_state
        for (x, y, spans), (rx, ry, rspans) in zip(got, ref):
            assert np.array_equal(x, rx) and np.array_equal(y, ry) and spans == rspans


def test_packing_follows_the_seeded_document_order(data):
    buckets = open_buckets(data)
    (x, y, spans), = run(data, 1, curriculum=[{"mix": {"c": 1}}])[0]
    perm = bucket_permutation("c", 8, seed=1)
    flat = np.concatenate([np.append(buckets["c"].document(int(d)), 256) for d in perm])
    rows = np.concatenate([x[:, :1], y], axis=1)  # the seq_len + 1 tokens each sequence read
    assert np.array_equal(rows.reshape(-1), flat[: G * (SEQ + 1)])
    assert np.array_equal(x[:, 1:], y[:, :-1])
    assert spans[0][0] == ("c", int(perm[0]), 0, SEQ + 1)


def test_seed_orders_each_bucket_independently(data, tmp_path_factory):
    assert not np.array_equal(bucket_permutation("a", 40, 1), bucket_permutation("a", 40, 2))
    assert np.array_equal(bucket_permutation("a", 40, 1), bucket_permutation("a", 40, 1))
    s = stream(data)
    assert np.array_equal(s.readers["a"].perm, bucket_permutation("a", 40, 1))


@pytest.mark.parametrize("cut", [1, 2, 3, 5])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_resume_from_a_mid_document_cursor(data, cut, world):
    ref, ref_state = run(data, 7, curriculum=CURRICULUM)
    head, state = run(data, cut, world=2, micro=2, curriculum=CURRICULUM)
    assert any(offset > 0 for _, offset in state["cursors"].values()), "the cut should fall inside a document"
    tail, final = run(data, 7 - cut, world=world, micro=1, prefetch=2, state=state, curriculum=CURRICULUM)
    assert final == ref_state
    for (x, y, spans), (rx, ry, rspans) in zip(head + tail, ref):
        assert np.array_equal(x, rx) and np.array_equal(y, ry) and spans == rspans


def test_prefetch_never_advances_the_saved_cursor(data):
    s = stream(data, prefetch=3)
    start = s.state_dict()
    batch = s.next_batch()
    time.sleep(0.2)  # let the thread fill its queue
    assert s.state_dict() == start
    s.commit(batch)
    assert s.state_dict() == batch.plan.state_after and s.state_dict()["step"] == 1
    again = s.next_batch()
    assert again.plan.step == 2 and s.state_dict()["step"] == 1
    s.load_state_dict(start)  # rewinding drops the prefetched batches
    assert s.next_batch().plan.sequences == batch.plan.sequences
    s.close()


def test_close_ends_a_prefetch_thread_blocked_on_its_full_queue(data):
    s = stream(data, prefetch=1)
    s.next_batch()
    worker = s._worker
    while not worker.queue.full():  # the thread has its next batch ready and sleeps in put()
        time.sleep(0.01)
    s.close()
    assert not worker.thread.is_alive() and s._worker is None


def test_phases_continue_every_buckets_cursor_and_budget_equal_to_inventory_reads_every_token_once(tmp_path):
    sizes = {"a": exact_lengths(28, SEQ, 9, seed=1), "b": exact_lengths(12, SEQ, 30, seed=2),
             "c": exact_lengths(8, SEQ, 3, seed=3)}
    for name, lengths in sizes.items():
        write_bucket(tmp_path, name, lengths)
    # 48 sequences = 6 steps: phase 0 = 12 sequences (a 1/3, b 2/3: 4 + 8), ends inside step 2;
    # phase 1 = 36 sequences a 2/3, b 1/9, c 2/9: 24 + 4 + 8. Every bucket ends exactly empty.
    curriculum = [{"tokens": 12 * SEQ, "mix": {"a": 1, "b": 2}}, {"mix": {"a": 6, "b": 1, "c": 2}}]
    steps, state = run(tmp_path, 6, world=2, micro=2, prefetch=2, curriculum=curriculum)
    audit = [{"step": i + 1, "spans": [list(s) for seq in spans for s in seq]} for i, (_, _, spans) in enumerate(steps)]
    assert_each_token_once(audit, sizes, complete=True)
    assert [seq[0][0] for _, _, spans in steps[:2] for seq in spans][:12].count("a") == 4
    assert all(r.remaining(state["cursors"][n]) == 0 for n, r in stream(tmp_path).readers.items())
    with pytest.raises(BucketExhausted):
        run(tmp_path, 1, state=state, curriculum=curriculum)


def test_exhaustion_halts_at_the_predicted_step_or_drops_the_bucket(data):
    # c holds 1,394 tokens + 8 EOS = 82 sequences of 17: at 3/4 of the mix it runs dry in step 14
    curriculum = [{"mix": {"b": 1, "c": 3}}]
    s = stream(data, curriculum)
    pred = predict(s.phases, SEQ, s.capacity(), 30 * G, False)
    assert pred.halt.bucket == "c"
    halt_step = pred.halt_at // G + 1
    for prefetch in (0, 2):
        steps, state = run(data, halt_step - 1, prefetch=prefetch, curriculum=curriculum)
        with pytest.raises(BucketExhausted) as e:
            run(data, 1, prefetch=prefetch, state=state, curriculum=curriculum)
        assert (e.value.bucket, e.value.phase, e.value.remaining, e.value.final) == ("c", 0, ["b"], False)
        assert 0 < e.value.tokens_short <= SEQ + 1
    # allowed: dropped at that step, logged, and the rest comes from b alone
    s = stream(data, curriculum, allow=True)
    for _ in range(halt_step - 1):
        s.commit(s.next_batch())
    batch = s.next_batch()
    (event,) = batch.plan.dropped
    assert event["bucket"] == "c" and event["step"] == halt_step
    assert event["mix"] == {"b": 1.0} and event["tokens_unused"] < SEQ + 1
    s.commit(batch)
    later = s.next_batch()
    assert {seq[0][0] for seq in later.plan.sequences} == {"b"} and not later.plan.dropped
    s.close()


def test_every_bucket_of_a_phase_dry_is_final(data):
    s = stream(data, [{"mix": {"c": 1}}], allow=True)
    with pytest.raises(BucketExhausted) as e:
        for _ in range(30):
            s.commit(s.next_batch())
    assert e.value.final and e.value.bucket == "c" and "nothing is left" in str(e.value)


def test_incompatible_cursors_are_refused(data):
    s = stream(data)
    state = s.state_dict()
    bad = json.loads(json.dumps(state))
    del bad["cursors"]["b"]
    with pytest.raises(DataError, match="buckets in data.dir changed"):
        s.load_state_dict(bad)
    old = json.loads(json.dumps(state))
    old["schedule"] = {"phase": 0, "phase_sequences": 0, "credits": {}, "dropped": []}
    with pytest.raises(DataError, match="schedule version 1"):
        s.load_state_dict(old)
    far = json.loads(json.dumps(state))
    far["cursors"]["c"] = [8, 3]
    with pytest.raises(DataError, match="lies outside"):
        s.load_state_dict(far)
