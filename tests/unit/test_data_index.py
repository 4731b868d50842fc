"""The on-disk bucket order (data/index.py) and repetition: built once and reused, a damaged file detected and
rebuilt (never used), several passes each in a fresh seeded order up to the limit, resume across passes and
world sizes, and the versioned cursor format."""
from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from gpt_simple.data.curriculum import BucketExhausted, DataError
from gpt_simple.data.index import CHUNK, IndexCorrupt, Order, open_order
from gpt_simple.data.shards import Bucket, open_buckets
from gpt_simple.data.stream import DataStream, bucket_permutation
from helpers.data import exact_lengths, write_bucket

SEQ, G = 16, 8


def stream(data, curriculum=(), *, rank=0, world=1, micro=G, prefetch=0, allow=False, seed=1, epochs=1):
    return DataStream(open_buckets(data), list(curriculum), SEQ, seed, allow, G, micro, rank, world, prefetch,
                      epochs)


def run(data, steps, *, world=1, micro=G, prefetch=0, state=None, **kw):
    ranks = [stream(data, rank=r, world=world, micro=micro, prefetch=prefetch, **kw) for r in range(world)]
    if state is not None:
        for s in ranks:
            s.load_state_dict(json.loads(json.dumps(state)))
    out = []
    for _ in range(steps):
        batches = [s.next_batch() for s in ranks]
        inputs = np.concatenate([b.inputs.reshape(-1, SEQ).numpy() for b in batches])
        out.append((inputs, batches[0].plan.sequences))
        for s, b in zip(ranks, batches):
            s.commit(b)
    final = ranks[0].state_dict()
    assert all(s.state_dict() == final for s in ranks)
    for s in ranks:
        s.close()
    return out, final


def builds(data, bucket):
    log = data / bucket / ".index" / "builds.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    write_bucket(tmp_path, "a", rng.integers(1, 60, size=40), seed=1, shards=2)
    write_bucket(tmp_path, "c", [200, 3, 150, 1, 90, 400, 300, 250], seed=3)
    return tmp_path


def test_index_is_built_once_and_reused(data):
    ref, _ = run(data, 3)
    assert [b["file"] for b in builds(data, "a")] == ["order-seed1-pass0.bin"]
    path = data / "a" / ".index" / "order-seed1-pass0.bin"
    mtime = path.stat().st_mtime_ns
    again, _ = run(data, 3, world=2, micro=2, prefetch=2)
    assert len(builds(data, "a")) == 1 and path.stat().st_mtime_ns == mtime
    assert all(np.array_equal(x, y) and s == t for (x, s), (y, t) in zip(ref, again))
    s = stream(data)
    assert np.array_equal(s.readers["a"].perm, bucket_permutation("a", 40, 1))
    run(data, 1, seed=2)  # another data.seed: its own file
    assert [b["file"] for b in builds(data, "a")] == ["order-seed1-pass0.bin", "order-seed2-pass0.bin"]


def test_concurrent_openers_build_once(data):
    bucket = Bucket(data / "a")
    orders, errors = [], []

    def go():
        try:
            orders.append(open_order(bucket, 5, 0))
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(orders) == 8 and len(builds(data, "a")) == 1
    assert all(np.array_equal(o.perm, orders[0].perm) for o in orders)


def _damage(path, how):
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(raw[: len(raw) - 5]))
    elif how == "header":
        raw[40] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif how == "payload":
        hb = int.from_bytes(raw[8:16], "little")
        raw[hb + 3] ^= 0x01  # the first document of the order
        path.write_bytes(bytes(raw))
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "header", "payload", "empty"])
def test_a_damaged_index_is_detected_and_rebuilt_never_used(data, how):
    ref, ref_state = run(data, 4)
    path = data / "c" / ".index" / "order-seed1-pass0.bin"
    _damage(path, how)
    if how != "payload":
        with pytest.raises(IndexCorrupt):
            Order(path, 8, 1394 + 8, {})
    got, state = run(data, 4)
    assert state == ref_state
    assert all(np.array_equal(x, y) and s == t for (x, s), (y, t) in zip(ref, got))
    assert len(builds(data, "c")) == 2
    Order(path, 8, 1394 + 8, {}).check(0, 8)  # the rebuilt file passes every check


def test_payload_damage_past_the_first_chunk_is_caught_when_read(tmp_path):
    write_bucket(tmp_path, "big", [1] * 200_000, seed=1)
    bucket = Bucket(tmp_path / "big")
    order = open_order(bucket, 1, 0)
    path = order.path
    raw = bytearray(path.read_bytes())
    raw[order.header_bytes + 2 * CHUNK + 10] ^= 0x10
    path.write_bytes(bytes(raw))
    damaged = Order(path, bucket.n_docs, bucket.n_tokens + bucket.n_docs, {})
    damaged.check(0, 1000)  # the first chunks are fine
    with pytest.raises(IndexCorrupt, match="chunk 2"):
        damaged.check(0, bucket.n_docs)


def test_a_leftover_temporary_file_is_ignored_and_a_re_prepared_bucket_gets_a_new_index(data):
    ref, _ = run(data, 2, curriculum=[{"mix": {"c": 1}}])
    folder = data / "c" / ".index"
    (folder / "order-seed1-pass0.bin.tmp-host-1-2").write_bytes(b"GPTSORD\x01" + b"\0" * 100)  # a killed build
    again, _ = run(data, 2, curriculum=[{"mix": {"c": 1}}])
    assert len(builds(data, "c")) == 1 and [s for _, s in again] == [s for _, s in ref]
    write_bucket(data, "c", [200, 3, 150, 1, 90, 400, 300, 250, 7], seed=3)  # re-prepared: one more document
    run(data, 1, curriculum=[{"mix": {"c": 1}}])
    assert len(builds(data, "c")) == 2


def test_read_only_bucket_uses_the_cache_folder(data, tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("GPT_SIMPLE_INDEX_DIR", str(cache))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith(".index") else real_access(p, mode))
    run(data, 1, curriculum=[{"mix": {"c": 1}}])
    assert list(cache.glob("c-*/order-seed1-pass0.bin")) and not (data / "c" / ".index" / "builds.log").exists()


def _token_counts(steps):
    """(bucket, doc, pass) -> tokens read, from the spans."""
    counts = {}
    for _, spans in steps:
        for seq in spans:
            for span in seq:
                p = span[4] if len(span) == 5 else 0
                counts[(span[0], span[1], p)] = counts.get((span[0], span[1], p), 0) + span[3] - span[2]
    return counts


def test_passes_read_every_token_once_per_pass_in_fresh_orders_up_to_the_limit(tmp_path):
    lengths = exact_lengths(8, SEQ, 5, seed=1)  # 8 sequences per pass: 3 passes = 24 sequences = 3 steps
    write_bucket(tmp_path, "a", lengths, seed=1)
    steps, state = run(tmp_path, 3, epochs=3)
    counts = _token_counts(steps)
    assert counts == {("a", d, p): n + 1 for d, n in enumerate(lengths) for p in range(3)}
    first_docs = [[s[1] for seq in spans for s in seq if (s[4] if len(s) == 5 else 0) == p]
                  for p in range(3) for _, spans in [steps[p]]]
    orders = [list(dict.fromkeys(d)) for d in first_docs]
    assert orders[0] == bucket_permutation("a", 5, 1).tolist()
    assert orders[1] == bucket_permutation("a", 5, 1, 1).tolist() != orders[0]
    assert all(len(s) == 4 for seq in steps[0][1] for s in seq)  # pass 0 spans keep the 4-field format
    assert all(len(s) == 5 for seq in steps[1][1] for s in seq)
    with pytest.raises(BucketExhausted):  # past the limit: exhaustion as before
        run(tmp_path, 1, epochs=3, state=state)
    assert run(tmp_path, 1, epochs=4, state=state)[1]["step"] == 4  # a higher limit continues
    with pytest.raises(DataError, match="lies outside .*raise it to continue"):
        stream(tmp_path, epochs=2).load_state_dict(state)


def test_default_is_one_pass(tmp_path):
    write_bucket(tmp_path, "a", exact_lengths(8, SEQ, 5, seed=1), seed=1)
    _, state = run(tmp_path, 1)
    with pytest.raises(BucketExhausted):
        run(tmp_path, 1, state=state)


@pytest.mark.parametrize("cut", [1, 2, 3, 4])
def test_resume_across_passes_and_world_sizes_is_exact(tmp_path, cut):
    write_bucket(tmp_path, "a", exact_lengths(7, SEQ, 6, seed=1), seed=1)  # passes end mid-step
    write_bucket(tmp_path, "b", exact_lengths(5, SEQ, 4, seed=2), seed=2)
    curriculum = [{"tokens": 10 * SEQ, "mix": {"a": 1, "b": 1}}, {"mix": {"a": 2, "b": 1}}]
    epochs = {"a": 4, "b": 4}
    ref, ref_state = run(tmp_path, 5, curriculum=curriculum, epochs=epochs)
    head, state = run(tmp_path, cut, world=2, micro=2, curriculum=curriculum, epochs=epochs)
    tail, final = run(tmp_path, 5 - cut, world=4, micro=1, prefetch=2, state=state, curriculum=curriculum,
                      epochs=epochs)
    assert final == ref_state
    assert all(np.array_equal(x, y) and s == t for (x, s), (y, t) in zip(head + tail, ref))


def test_cursor_format_versions(data):
    ref, ref_state = run(data, 5)
    _, state = run(data, 2)
    assert state["cursor_version"] == 2
    old = {k: v for k, v in state.items() if k != "cursor_version"}  # format 1: single pass, same positions
    tail, final = run(data, 3, state=old)
    assert final == ref_state and all(s == t for (_, s), (_, t) in zip(tail, ref[2:]))
    future = {**state, "cursor_version": 9}
    with pytest.raises(DataError, match="format version 9") as e:
        stream(data).load_state_dict(future)
    assert "\n" not in str(e.value) and "new run" in str(e.value)
