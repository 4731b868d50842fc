"""Amending the data plan mid-run (data.amend), in real subprocesses on real files: the measured case (a mix
changed at a resume holds within one sequence from there on, instead of catching up), a SIGKILL chain through the
amendment with a 2 -> 1 rank change reading the same tokens as two launches, a new bucket, an appended shard and an
annealing phase each reading the same through interruptions and each visible in events, status.py and validate,
and changes that rewrite history refused with one line and nothing written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from gpt_simple.data.shards import ShardWriter
from helpers.data import read_audit, write_bucket
from helpers.train import (PYTHON, ROOT, TINY, child_env, events, metrics, run_train, start_train, status_word,
                           train_cmd)

pytestmark = pytest.mark.slow

SEQ, G = 64, 8  # helpers.train.TINY's data.seq_len and training.global_batch_size
EVEN = ("--data.curriculum", "[{mix = {code = 1, prose = 1}}]", "--data.audit", "true")
NINE = ("--data.curriculum", "[{mix = {code = 9, prose = 1}}]", "--data.audit", "true", "--data.amend", "true")
SLOW = child_env(GPT_SIMPLE_DRILL="step=0.25")  # so that a kill lands mid-run whatever the machine


def make_data(folder: Path, prose_docs: int = 200) -> Path:
    rng = np.random.default_rng(0)
    write_bucket(folder, "code", rng.integers(20, 200, size=200), seed=1)
    write_bucket(folder, "prose", [49] * prose_docs, seed=2)
    return folder


def append_shard(bucket: Path, name: str, n_docs: int) -> None:
    rng = np.random.default_rng(7)
    w = ShardWriter(bucket / name, 257, "byte", 256)
    for _ in range(n_docs):
        w.add(rng.integers(0, 256, size=49).astype(np.uint16))
    w.close()


def sequence_buckets(line: dict) -> list[str]:
    """The bucket of each of the step's G sequences (spans run sequence after sequence, SEQ + 1 tokens each)."""
    out, filled = [], 0
    for bucket, _doc, start, end, *_ in line["spans"]:
        if filled == 0:
            out.append(bucket)
        filled = (filled + end - start) % (SEQ + 1)
    assert len(out) == G
    return out


def committed(out: Path) -> list[str]:
    folder = out / "checkpoints"
    return sorted((p.name for p in folder.iterdir() if p.name.startswith("step-") and (p / "COMMITTED").exists()),
                  key=lambda n: int(n.split("-")[1])) if folder.is_dir() else []


def status_text(out: Path) -> str:
    return subprocess.run([PYTHON, str(ROOT / "status.py"), str(out)], capture_output=True, text=True).stdout


def kill_after_checkpoint(out: Path, data: Path, past: int, *args: str) -> None:
    """Start a slowed one-process launch, SIGKILL it once a checkpoint after step `past` is committed. (One
    process: torchrun's workers live in their own process group, a SIGKILL of torchrun's would orphan them.)"""
    proc = start_train(out, data, *args, "--training.save_steps", "2", env=SLOW)
    try:
        while not any(int(n.split("-")[1]) > past for n in committed(out)):
            assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)


def refused(out: Path, data: Path, *args: str, match: str) -> None:
    """One `error:` line containing `match`, exit 2, status ERROR, and nothing else written."""
    before = (committed(out), (out / "data_audit.jsonl").read_text(), (out / "metrics.jsonl").read_text())
    proc = run_train(out, data, *args, check=False)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and match in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and status_word(out) == "ERROR"
    assert (committed(out), (out / "data_audit.jsonl").read_text(), (out / "metrics.jsonl").read_text()) == before


def amendments(out: Path) -> list[dict]:
    return [e for e in events(out) if e["event"] == "plan_amended"]


def test_a_changed_mix_holds_from_the_amendment_and_a_killed_chain_reads_the_same(tmp_path):
    data, ref, out = make_data(tmp_path / "data"), tmp_path / "ref", tmp_path / "run"
    run_train(ref, data, *EVEN, "--training.max_steps", "10")
    refused(ref, data, *NINE[:4], "--training.max_steps", "22",
            match="the data plan differs from the checkpoint's (step 10): phase 0: {code = 1, prose = 1} to the end "
                  "-> {code = 9, prose = 1} to the end; to amend the plan from there on, resume with --data.amend true")
    second = run_train(ref, data, *NINE, "--training.max_steps", "22")
    assert "data plan amended (plan 1, from step 11 on)" in second.stdout
    audit = read_audit(ref)
    assert [line.get("plan", 0) for line in audit] == [0] * 10 + [1] * 12
    counts, w = {"code": 0, "prose": 0}, {"code": Fraction(9, 10), "prose": Fraction(1, 10)}
    for n, bucket in enumerate((b for line in audit[10:] for b in sequence_buckets(line)), 1):
        counts[bucket] += 1  # every sequence after the amendment, not just every step: within one sequence
        assert all(abs(w[b] * n - counts[b]) < 1 for b in w), (n, counts)
    assert [(e["number"], e["step"]) for e in amendments(ref)] == [(1, 10)]
    assert "plan 1: amendment 1 after step 10: phase 0: {code = 1, prose = 1}" in status_text(ref)

    # The same amendment at the same step through SIGKILLs (one before it, one in the launch that makes it), then
    # 2 ranks and 1.
    kill_after_checkpoint(out, data, 2, *EVEN, "--training.max_steps", "10")
    assert 2 < int(committed(out)[-1].split("-")[1]) < 10, "the kill must land mid-run"
    run_train(out, data, *EVEN, "--training.max_steps", "10")
    kill_after_checkpoint(out, data, 10, *NINE, "--training.max_steps", "22")
    last = int(committed(out)[-1].split("-")[1])
    assert 10 < last < 18 and status_word(out) != "COMPLETED", "the kill must land mid-run, after the amendment"
    two = run_train(out, data, *NINE, "--training.max_steps", "18", nproc=2)
    assert f"resumed from step-{last}" in two.stdout and "world size 2" in two.stdout
    final = run_train(out, data, *NINE, "--training.max_steps", "22")
    assert "resumed from step-18" in final.stdout and "world size 1" in final.stdout
    assert "data plan amended" not in two.stdout + final.stdout  # the checkpoint holds the plan: not asked again
    assert read_audit(out) == audit and status_word(out) == "COMPLETED"
    assert {(e["number"], e["step"]) for e in amendments(out)} == {(1, 10)}


ADD_C = ("--data.curriculum", "[{mix = {code = 1, prose = 1, comments = 2}}]")
ANNEAL = ("--data.curriculum", "[{tokens = %d, mix = {code = 1, prose = 1, comments = 2}}, {mix = {code = 1, "
          "prose = 1}}]" % (12 * G * SEQ))
MORE = ("--data.audit", "true", "--data.amend", "true")


def amend_chain(out: Path, data: Path, interrupted: bool) -> None:
    """Steps 1-4 on code and prose; a new bucket from step 5; a shard appended to prose from step 9; an annealing
    phase from step 13. Interrupted: a SIGKILL inside the third segment, 2 ranks in the fourth."""
    run_train(out, data, *EVEN, "--training.max_steps", "4")
    write_bucket(data, "comments", [59] * 50, seed=3)
    run_train(out, data, *ADD_C, *MORE, "--training.max_steps", "8")
    append_shard(data / "prose", "shard-00001", 40)
    if interrupted:
        kill_after_checkpoint(out, data, 8, *ADD_C, *MORE, "--training.max_steps", "12")
        assert 8 < int(committed(out)[-1].split("-")[1]) < 12, "the kill must land mid-run, after the amendment"
    run_train(out, data, *ADD_C, *MORE, "--training.max_steps", "12")
    run_train(out, data, *ANNEAL, *MORE, "--training.max_steps", "16", nproc=2 if interrupted else 1)


def test_a_new_bucket_an_appended_shard_and_an_annealing_phase_read_the_same_through_interruptions(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "run"
    amend_chain(ref, make_data(tmp_path / "d1", prose_docs=40), interrupted=False)
    data = make_data(tmp_path / "d2", prose_docs=40)
    amend_chain(out, data, interrupted=True)
    audit = read_audit(ref)
    assert read_audit(out) == audit and status_word(out) == "COMPLETED"
    assert [line.get("plan", 0) for line in audit] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert "comments" not in str(audit[:4]) and "comments" in str(audit[4])
    new_docs = [doc for line in audit for b, doc, *_ in line["spans"] if b == "prose" and doc >= 40]
    assert new_docs and all(doc >= 40 for line in audit[12:] for b, doc, *_ in line["spans"] if b == "prose")
    assert {b for line in audit[12:] for b in sequence_buckets(line)} == {"code", "prose"}
    built = [json.loads(x)["file"] for x in (data / "prose" / ".index" / "builds.log").read_text().splitlines()]
    assert built.count("order-seed1234-pass0.bin") == 1, built  # the order already scheduled is never rebuilt
    for run in (ref, out):
        got = {(e["number"], e["step"], "; ".join(e["changes"])) for e in amendments(run)}
        assert got == {(1, 4, "bucket 'comments' added (50 documents); phase 0: {code = 1, prose = 1} to the end -> "
                               "{code = 1, comments = 2, prose = 1} to the end"),
                       (2, 8, "bucket 'prose': 1 shard(s) appended (40 documents)"),
                       (3, 12, "phase 0: {code = 1, comments = 2, prose = 1} to the end -> {code = 1, comments = 2, "
                               "prose = 1} for 6,144 tokens; phase 1 added: {code = 1, prose = 1} to the end")}
    text = status_text(out)
    assert "plan 3: amendment 1 after step 4" in text and "amendment 3 after step 12" in text

    dry = subprocess.run(train_cmd(*TINY, "--data.dir", str(data), "--data.demo", "false", "--training.output_dir",
                                   str(out), *ANNEAL, *MORE, "--training.max_steps", "20", "--dry-run"),
                         cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    # predicted under the amended plan: the annealing phase's demand on prose (its appended shard counted) runs dry
    assert dry.returncode == 2 and "error: bucket 'prose' runs dry in phase 1 at step 20" in dry.stderr, dry.stderr
    assert "data plan 3 (amended" in dry.stdout and "amendment 2 after step 8: bucket 'prose'" in dry.stdout
    assert "phase 1: steps 17-20" in dry.stdout

    # history cannot be rewritten: a completed phase, a shard already read
    refused(out, data, "--data.curriculum", "[{tokens = %d, mix = {code = 1}}, {mix = {code = 1, prose = 1}}]"
            % (12 * G * SEQ), *MORE, "--training.max_steps", "20", match="data.curriculum[0]: phase 0 is complete")
    for suffix in (".idx", ".bin"):
        (data / "prose" / f"shard-00001{suffix}").rename(tmp_path / f"kept{suffix}")
    refused(out, data, *ANNEAL, *MORE, "--training.max_steps", "20",
            match="prose/shard-00001.idx: removed since the checkpoint")
    assert [m["step"] for m in metrics(out)][-1] == 16
