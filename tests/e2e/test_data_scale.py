"""The bucket index and repetition end to end, in real torchrun subprocesses: two 2-rank jobs started at once on
a bucket with no index build it once; a multi-pass curriculum chain stopped by SIGTERM on 2 ranks, resumed on 1,
stopped again and finished on 2 reads exactly the tokens of the uninterrupted run (audit ==), each token once
per pass, and validate predicts the passes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers.data import exact_lengths, read_audit, write_bucket
from helpers.train import PYTHON, ROOT, TINY, child_env, run_train, start_train, status_word

pytestmark = pytest.mark.slow

SEQ, G = 64, 8  # helpers.train.TINY
GPT_SIMPLE = str(Path(PYTHON).with_name("gpt-simple"))


def builds(data: Path, bucket: str) -> list[dict]:
    log = data / bucket / ".index" / "builds.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_two_jobs_of_two_ranks_started_at_once_build_the_index_once(tmp_path):
    data = tmp_path / "data"
    write_bucket(data, "a", exact_lengths(40, SEQ, 300, seed=1), seed=1)
    write_bucket(data, "b", exact_lengths(40, SEQ, 200, seed=2), seed=2)
    args = ("--data.audit", "true", "--training.max_steps", "3")
    jobs = [start_train(tmp_path / f"run{i}", data, *args, nproc=2) for i in range(2)]
    try:
        results = [p.communicate(timeout=120) for p in jobs]
    except BaseException:
        for p in jobs:
            os.killpg(p.pid, signal.SIGKILL)
        raise
    for p, (out, err) in zip(jobs, results):
        assert p.returncode == 0, err[-3000:]
    assert [b["file"] for b in builds(data, "a")] == ["order-seed1234-pass0.bin"]
    assert [b["file"] for b in builds(data, "b")] == ["order-seed1234-pass0.bin"]
    assert read_audit(tmp_path / "run0") == read_audit(tmp_path / "run1")
    assert not list((data / "a" / ".index").glob("*.tmp-*"))


# 40 steps x 8 sequences = 320. Phase 0 (10 steps): a 40, b 40; phase 1 (30 steps): a 160, b 80. a holds 70
# sequences a pass (3 allowed: 210 >= 200), b 65 (2 allowed: 130 >= 120).
STEPS = 40
CURRICULUM = "[{tokens = %d, mix = {a = 1, b = 1}}, {mix = {a = 2, b = 1}}]" % (10 * G * SEQ)
ARGS = ("--data.curriculum", CURRICULUM, "--data.epochs", "{a = 3, b = 2}", "--data.audit", "true",
        "--training.max_steps", str(STEPS))


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    path, deadline = out / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        if path.exists() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached within {timeout}s")


def stop_after(out: Path, data: Path, step: int, nproc: int) -> int:
    proc = start_train(out, data, *ARGS, nproc=nproc)
    try:
        wait_for_step(out, step, proc)
        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
        stdout, stderr = proc.communicate(timeout=120)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert "STOPPED: signal SIGTERM" in stdout, stderr[-3000:]
    stopped = json.loads((out / "run_state.json").read_text())["step"]
    assert step <= stopped < STEPS, "the stop must land mid-run for this test to mean anything"
    return stopped


def test_multi_pass_curriculum_chain_under_sigterm_and_world_size_changes_reads_as_the_uninterrupted_run(tmp_path):
    data, out, ref = tmp_path / "data", tmp_path / "run", tmp_path / "ref"
    sizes = {"a": exact_lengths(70, SEQ, 30, seed=1), "b": exact_lengths(65, SEQ, 20, seed=2)}
    for i, (name, lengths) in enumerate(sizes.items()):
        write_bucket(data, name, lengths, seed=i)

    check = subprocess.run([GPT_SIMPLE, "validate", *TINY, "--data.dir", str(data), "--data.demo", "false",
                            "--training.output_dir", str(out), *ARGS], cwd=ROOT, env=child_env(),
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    assert "passes needed by the run (data.max_epochs / data.epochs): a 2.86 of 3 allowed, b 1.85 of 2 allowed" \
        in check.stdout

    first = stop_after(out, data, 3, nproc=2)                 # 2 ranks
    second = stop_after(out, data, first + 12, nproc=1)       # 1 rank, across a pass boundary of b
    run_train(out, data, *ARGS, nproc=2)                      # 2 ranks to the end
    assert status_word(out) == "COMPLETED" and first < second < STEPS
    run_train(ref, data, *ARGS)                               # uninterrupted, one process
    audit = read_audit(out)
    assert audit == read_audit(ref)

    reads: dict[tuple, list] = {}
    for line in audit:
        for span in line["spans"]:
            bucket, doc, start, end = span[:4]
            reads.setdefault((bucket, doc, span[4] if len(span) == 5 else 0), []).append((start, end))
    for (bucket, doc, p), ranges in reads.items():  # each pass reads each token once, in order
        pos = 0
        for start, end in ranges:
            assert start == pos, (bucket, doc, p, ranges)
            pos = end
        assert pos <= sizes[bucket][doc] + 1
    passes = {b: max(p for (bb, _, p) in reads if bb == b) + 1 for b in sizes}
    assert passes == {"a": 3, "b": 2}
