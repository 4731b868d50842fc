"""Data end to end, in real subprocesses: a 3-bucket curriculum prepared with `gpt-simple prepare`, stopped on
2 ranks and resumed on 1, reads every document exactly once; a bucket that runs dry HALTs (and halts again,
and continues when allowed); validate / --dry-run predict it; bad shards are a one-line ERROR."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from gpt_simple.data.shards import open_buckets
from helpers.data import assert_each_token_once, exact_lengths, read_audit, write_bucket
from helpers.train import PYTHON, ROOT, TINY, child_env, events, metrics, run_train, status_word, train_cmd

pytestmark = pytest.mark.slow

SEQ, G = 64, 8  # helpers.train.TINY's data.seq_len and training.global_batch_size
GPT_SIMPLE = str(Path(PYTHON).with_name("gpt-simple"))
LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz      \n", dtype=np.uint8)


def texts(lengths, seed: int) -> list[str]:
    """ASCII documents of exactly these lengths (one byte-level token per character), none blank."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        raw = LETTERS[rng.integers(0, len(LETTERS), size=n)]
        raw[0] = ord("x")
        out.append(raw.tobytes().decode())
    return out


def prepare(data: Path, src: Path, bucket: str, lengths, fmt: str, seed: int) -> None:
    """Write the documents as .txt files / one .jsonl / one .jsonl.gz under src, then `gpt-simple prepare` them."""
    docs = texts(lengths, seed)
    src.mkdir(parents=True)
    if fmt == "txt":
        for i, doc in enumerate(docs):
            (src / f"doc-{i:04d}.txt").write_text(doc)
    else:
        body = "".join(json.dumps({"text": doc}) + "\n" for doc in docs).encode()
        if fmt == "jsonl":
            (src / "docs.jsonl").write_bytes(body)
        else:
            (src / "docs.jsonl.gz").write_bytes(gzip.compress(body))
    proc = subprocess.run([GPT_SIMPLE, "prepare", str(src), "--out", str(data), "--bucket", bucket,
                           "--workers", "2", "--quiet"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(docs):,} documents" in proc.stdout and "skipped 0" in proc.stdout


def checkpoints(out: Path) -> list[str]:
    folder = out / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if (p / "COMMITTED").exists()) if folder.is_dir() else []


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# -- the "done when" scenario ---------------------------------------------------------------------------------------
# 60 steps x 8 sequences = 480 sequences. Phase 0 (20 steps): prose and comments 80 each; phase 1 (40 steps):
# code 160, prose 80, comments 80. Every bucket holds exactly its 160 sequences: budget = inventory.
STEPS, PER_BUCKET = 60, 160
CURRICULUM = ("[{tokens = %d, mix = {prose = 1, comments = 1}}, {mix = {code = 2, prose = 1, comments = 1}}]"
              % (20 * G * SEQ))


def curriculum_data(tmp_path: Path) -> tuple[Path, dict[str, list[int]]]:
    data, sizes = tmp_path / "data", {}
    for i, (bucket, fmt, n_docs) in enumerate((("code", "txt", 23), ("prose", "jsonl", 61),
                                                ("comments", "jsonl.gz", 40))):
        sizes[bucket] = exact_lengths(PER_BUCKET, SEQ, n_docs, seed=10 + i)
        prepare(data, tmp_path / "src" / bucket, bucket, sizes[bucket], fmt, seed=20 + i)
    buckets = open_buckets(data)
    assert {b: [int(n) for n in buckets[b].lengths] for b in sizes} == sizes  # every document kept, in order
    return data, sizes


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    path, deadline = out / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        if path.exists() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached within {timeout}s")


def test_curriculum_stopped_on_two_ranks_resumed_on_one_reads_every_document_once(tmp_path):
    data, sizes = curriculum_data(tmp_path)
    common = ("--data.curriculum", CURRICULUM, "--data.audit", "true", "--training.max_steps", str(STEPS))
    out, ref = tmp_path / "run", tmp_path / "ref"

    cmd = train_cmd(*TINY, "--data.dir", str(data), "--data.demo", "false", "--training.output_dir", str(out),
                    *common, nproc=2)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        wait_for_step(out, 2, proc)
        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks: save at the step boundary, exit
        stdout, stderr = proc.communicate(timeout=120)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert "world size 2 (gloo, cpu)" in stdout and "STOPPED: signal SIGTERM" in stdout, stderr[-3000:]
    assert status_word(out) == "STOPPED"
    stopped = json.loads((out / "run_state.json").read_text())["step"]
    assert 2 <= stopped < STEPS, "the stop must land mid-run for this test to mean anything"
    assert len(read_audit(out)) == stopped

    resumed = run_train(out, data, *common)  # one process: the same command, another world size
    assert f"resumed from step-{stopped}-shutdown" in resumed.stdout and "world size 1" in resumed.stdout
    assert status_word(out) == "COMPLETED"
    assert [e["world_size"] for e in events(out) if e["event"] == "launch"] == [2, 1]

    audit = read_audit(out)
    assert_each_token_once(audit, sizes, complete=True)  # budget = inventory: every document, each token once
    for line in audit:  # each step reads G whole sequences (seq_len + 1 tokens each)
        assert sum(end - start for _, _, start, end in line["spans"]) == G * (SEQ + 1)
    first_phase = {b for line in audit[:20] for b, *_ in line["spans"]}
    assert first_phase == {"prose", "comments"} and "code" in {b for b, *_ in audit[20]["spans"]}

    run_train(ref, data, *common)  # uninterrupted, one process
    assert read_audit(ref) == audit


# -- exhaustion → HALTED ----------------------------------------------------------------------------------------------
def test_exhaustion_halts_halts_again_and_continues_when_allowed(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    write_bucket(data, "a", exact_lengths(12, SEQ, 5, seed=1), seed=1)   # 12 sequences: 3 steps at half the mix
    write_bucket(data, "b", exact_lengths(40, SEQ, 9, seed=2), seed=2)
    args = ("--data.curriculum", "[{mix = {a = 1, b = 1}}]", "--data.audit", "true", "--training.max_steps", "6")

    first = run_train(out, data, *args)  # exit 0: HALTED is a decision for a person, not a failure
    assert status_word(out) == "HALTED"
    marker = json.loads((out / "HALTED").read_text())
    assert {k: marker[k] for k in ("bucket", "phase", "step", "tokens_short")} == \
        {"bucket": "a", "phase": 0, "step": 3, "tokens_short": SEQ + 1}
    assert marker["reason"].startswith("bucket 'a' ran dry in phase 0 at step 4 (65 tokens short")
    assert "--data.allow_bucket_exhaustion true" in marker["reason"]
    assert "--training.max_steps 3" in marker["reason"]
    assert "HALTED: bucket 'a'" in first.stdout
    assert checkpoints(out) == ["step-3-shutdown"]
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    state = json.loads((out / "run_state.json").read_text())
    assert (state["step"], state["last_checkpoint"]) == (3, "step-3-shutdown")
    saved = (out / "checkpoints" / "step-3-shutdown" / "COMMITTED").stat().st_mtime_ns

    again = run_train(out, data, *args)  # the same command: halts at once, trains nothing, saves nothing
    assert status_word(out) == "HALTED" and (out / "HALTED").exists()
    assert not [line for line in again.stdout.splitlines() if line.startswith("step ")]
    assert [m["step"] for m in metrics(out)] == [1, 2, 3] and len(read_audit(out)) == 3
    assert checkpoints(out) == ["step-3-shutdown"]
    assert (out / "checkpoints" / "step-3-shutdown" / "COMMITTED").stat().st_mtime_ns == saved
    last_launch = events(out)[[e["event"] for e in events(out)].index("launch", 3):]
    assert [e["event"] for e in last_launch if e["event"] in ("save", "halt")] == ["halt"]

    dry = subprocess.run(train_cmd(*TINY, "--data.dir", str(data), "--data.demo", "false",
                                   "--training.output_dir", str(out), *args, "--dry-run"),
                         cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    assert dry.returncode == 2 and "resuming from step-3-shutdown (step 3)" in dry.stdout
    assert error_lines(dry.stderr) == [line for line in error_lines(dry.stderr) if "bucket 'a' runs dry" in line]
    assert len(error_lines(dry.stderr)) == 1

    allowed = run_train(out, data, *args, "--data.allow_bucket_exhaustion", "true")
    assert status_word(out) == "COMPLETED" and not (out / "HALTED").exists()
    assert "resumed from step-3-shutdown" in allowed.stdout and "bucket 'a' exhausted at step 4" in allowed.stdout
    dropped = [e for e in events(out) if e["event"] == "bucket_dropped"]
    assert [(e["bucket"], e["step"], e["mix"]) for e in dropped] == [("a", 4, {"b": 1.0})]
    assert "halt_overridden" in [e["event"] for e in events(out)]
    assert [m["step"] for m in metrics(out)] == list(range(1, 7))
    audit = read_audit(out)
    assert [line["step"] for line in audit] == list(range(1, 7))
    assert {b for line in audit[3:] for b, *_ in line["spans"]} == {"b"}
    assert checkpoints(out) == ["step-3-shutdown", "step-6-final"]

    # Longer than b can carry alone: with no bucket of the phase left, allowing exhaustion cannot help.
    run_train(out, data, *args, "--data.allow_bucket_exhaustion", "true", "--training.max_steps", "8")
    assert status_word(out) == "HALTED" and checkpoints(out) == ["step-3-shutdown", "step-6-final"]
    marker = json.loads((out / "HALTED").read_text())
    assert (marker["bucket"], marker["step"]) == ("b", 6) and "nothing is left" in marker["reason"]
    assert "allow_bucket_exhaustion" not in marker["reason"]

    # Ending the run at the halted step completes it at once; the marker goes with the HALTED status.
    ended = run_train(out, data, *args, "--data.allow_bucket_exhaustion", "true", "--training.max_steps", "6")
    assert "COMPLETED" in ended.stdout and status_word(out) == "COMPLETED" and not (out / "HALTED").exists()
    assert checkpoints(out) == ["step-3-shutdown", "step-6-final"]


# -- validate / --dry-run ----------------------------------------------------------------------------------------------
def test_validate_and_dry_run_print_the_table_and_refuse_a_shortfall(tmp_path):
    data = tmp_path / "data"
    write_bucket(data, "a", exact_lengths(12, SEQ, 5, seed=1), seed=1)
    write_bucket(data, "b", exact_lengths(40, SEQ, 9, seed=2), seed=2)
    config = tmp_path / "run.toml"
    config.write_text((ROOT / "configs" / "tiny.toml").read_text().replace('dir = "data/demo"', f'dir = "{data}"')
                      .replace("demo = true", "demo = false")
                      .replace('output_dir = "outputs/tiny"', f'output_dir = "{tmp_path / "out"}"')
                      + '\n[[data.curriculum]]\nmix = { a = 1, b = 1 }\n')
    small = ("--data.seq_len", str(SEQ), "--model.block_size", str(SEQ), "--training.global_batch_size", str(G),
             "--training.micro_batch_size", "4", "--training.max_steps", "6", "--optimizer.warmup_steps", "2",
             "--eval.every_steps", "0", "--eval.at_end", "false")

    def run(cmd, *extra) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, "--config", str(config), *small, *extra], cwd=tmp_path, env=child_env(),
                              capture_output=True, text=True, timeout=120)

    for cmd in ([GPT_SIMPLE, "validate"], [PYTHON, str(ROOT / "train.py"), "--dry-run"]):
        proc = run(cmd)
        assert proc.returncode == 2, proc.stderr
        assert error_lines(proc.stderr) == [
            "error: bucket 'a' runs dry in phase 0 at step 4 (the run needs 780 more tokens from it): the run "
            "would HALT there; set data.allow_bucket_exhaustion = true to drop it and go on with b, add data to "
            "it, or lower training.max_steps to 3"]
        table = proc.stdout.splitlines()
        assert "phase 0: steps 1-6, 48 sequences = 3,072 tokens; mix data.curriculum[0]" in table
        # the phase table's rows: bucket, weight, sequences, tokens read, available, left after, status
        rows = {line.split()[0]: line.split() for line in table if "%" in line}
        assert rows["a"][:3] == ["a", "50.0%", "24"] and "SHORT" in rows["a"]
        assert rows["b"][:3] == ["b", "50.0%", "24"] and rows["b"][-1] == "ok"
    assert not (tmp_path / "out").exists()  # neither trained nor created the run

    allowed = run([GPT_SIMPLE, "validate"], "--data.allow_bucket_exhaustion", "true")
    assert allowed.returncode == 0, allowed.stderr
    assert "ok: the data covers the run to step 6, dropping a on the way" in allowed.stdout
    assert "warning: bucket 'a' runs dry in phase 0 at step 4" in allowed.stderr

    enough = run([PYTHON, str(ROOT / "train.py"), "--dry-run"], "--training.max_steps", "3")
    assert enough.returncode == 0 and "ok: the data covers the run to step 3" in enough.stdout

    missing = run([GPT_SIMPLE, "validate"], "--data.dir", str(tmp_path / "nope"))
    assert missing.returncode == 2 and len(error_lines(missing.stderr)) == 1
    assert "data.dir" in missing.stderr and "does not exist" in missing.stderr


# -- shards the run cannot use: one line naming the file, exit 2, ERROR ----------------------------------------------
def test_mismatched_shards_are_a_one_line_error_with_status_error(tmp_path):
    from gpt_simple.data.shards import ShardWriter
    data = tmp_path / "data"
    write_bucket(data, "a", [300, 200, 100])
    w = ShardWriter(data / "a" / "shard-00001", 1000, "hf:tok.json:0123456789ab", 999)
    w.add(np.arange(50))
    w.close()
    out = tmp_path / "run"
    proc = run_train(out, data, "--training.max_steps", "3", check=False)
    assert proc.returncode == 2
    [line] = error_lines(proc.stderr)
    assert str(data / "a" / "shard-00001.idx") in line and "hf:tok.json:0123456789ab" in line
    assert status_word(out) == "ERROR"
    assert json.loads((out / "run_state.json").read_text())["error"] == line.removeprefix("error: ")

