"""Checkpointing and resume, proven with real train.py / torchrun processes, real files and real signals.

The first test checks that malicious pickles in a checkpoint are refused (a child process proves the payloads
live); the end-to-end ones (slow) stop, kill, corrupt and resume real runs and compare them with uninterrupted
ones. CheckpointManager alone, in this process on real files: unit/test_checkpoint.py.
"""
import hashlib
import io
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from gpt_simple.checkpoint import COMMITTED, CheckpointError, list_committed, load_model_state
from helpers.checkpoint import tiny_trained_manager
from helpers.train import PYTHON, ROOT, child_env, events, finish, losses, metrics, start_train, status_word
from helpers.train import run_train as _run_train

GPT_SIMPLE = str(Path(PYTHON).with_name("gpt-simple"))


# -- helpers ----------------------------------------------------------------------------------------------------
FAST = ("--training.peak_flops", "1e12")  # skip measuring the CPU's matmul rate at every launch (MFU only)


def run_train(out, data, *args, **kwargs):
    return _run_train(out, data, *FAST, *args, **kwargs)


def launch(out, data, *args, nproc=1, env=None, **popen):
    return start_train(out, data, *FAST, *args, nproc=nproc, env=env, **popen)


def wait_until(condition, proc, what, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"not {what} within {timeout}s")


def last_step(out) -> int:
    path = Path(out) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def frozen(proc, action) -> None:
    """Pause the whole job (SIGSTOP to its process group), act, resume it: the job cannot run ahead of the test
    between 'it reached step k' and the stop request, so the stop lands within a step of k."""
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        action()
    finally:
        os.killpg(proc.pid, signal.SIGCONT)


def names(out) -> list[str]:
    root = Path(out) / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def committed(out) -> list[str]:
    return [c.name for c in list_committed(Path(out) / "checkpoints")]


def digest(path) -> dict[str, str]:
    """Every file under `path` (relative name -> sha256 of its bytes) plus its mtime: 'untouched' means equal."""
    path = Path(path)
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() + f"@{f.stat().st_mtime_ns}"
            for f in sorted(path.rglob("*")) if f.is_file()}


def kinds(out) -> list[str]:
    return [e["event"] for e in events(out)]


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def assert_same_weights(a, b) -> None:
    wa, wb = load_model_state(a), load_model_state(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    """A checkpoint whose DCP metadata, or one of whose non-tensor entries, is a malicious pickle is refused
    without running it. The payloads are live: plain unpickling runs them (checked in a child process)."""
    from torch.distributed.checkpoint import FileSystemReader
    mgr, _, _ = tiny_trained_manager(tmp_path)
    mgr.save(1)
    good = mgr.last_committed
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    def live(kind, path, offset=0):
        code = (f"import io, pickle; f = open({str(path)!r}, 'rb'); f.seek({offset}); "
                + ("pickle.load(f)" if kind == "pickle" else
                   "import torch; torch.load(io.BytesIO(f.read()), weights_only=False)"))
        subprocess.run([PYTHON, "-c", code], capture_output=True, cwd=ROOT)
        assert marker.exists(), f"the {kind} payload does not run when unpickled: the test would prove nothing"
        marker.unlink()

    # 1. DCP's .metadata replaced by a pickle that runs code when loaded
    bad = tmp_path / "checkpoints" / "step-2"
    shutil.copytree(good.path, bad)
    (bad / ".metadata").write_bytes(pickle.dumps(Payload()))
    live("pickle", bad / ".metadata")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_model_state(bad)
    info = list_committed(tmp_path / "checkpoints")[-1]
    assert info.name == "step-2"
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        mgr.load(info)
    assert not marker.exists()

    # 2. an optimizer hyper-parameter entry (stored by DCP as torch.save bytes) pointed at a malicious payload
    bad = tmp_path / "checkpoints" / "step-3"
    shutil.copytree(good.path, bad)
    md = FileSystemReader(str(bad)).read_metadata()
    key = next(k for k, v in md.state_dict_metadata.items() if k.startswith("optim.") and not hasattr(v, "size"))
    index = next(i for i in md.storage_data if i.fqn == key)
    buf = io.BytesIO()
    torch.save(Payload(), buf)
    shard = bad / md.storage_data[index].relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    md.storage_data[index] = type(md.storage_data[index])(md.storage_data[index].relative_path, offset,
                                                          len(buf.getvalue()))
    (bad / ".metadata").write_bytes(pickle.dumps(md))
    live("torch", shard, offset)
    with pytest.raises(CheckpointError, match="Weights only load failed.*GLOBAL exec"):
        mgr.load(list_committed(tmp_path / "checkpoints")[-1])
    assert not marker.exists()
    # the model weights of that checkpoint are intact and still readable: only the poisoned entry is refused
    assert load_model_state(bad).keys() == load_model_state(good.path).keys()


# -- end to end: same world size ---------------------------------------------------------------------------------
SAME = ("--training.max_steps", "16", "--training.save_steps", "4", "--training.async_save", "true",
        "--training.keep_last_k", "0")


@pytest.mark.slow
def test_stopped_and_resumed_is_bit_identical(tmp_path, demo_data):
    """Three launches of the same command (SIGTERM; SIGTERM while a periodic async save is in flight; run to the
    end) give, step for step, exactly the losses, learning rates, gradient norms and final weights of one
    uninterrupted launch. (The stop file and 2 -> 1 -> 2 ranks: the elastic test.) With 2 OpenMP threads, as a
    CPU user runs it: a resume that changes how a kernel splits its work between threads drifts by an ulp here,
    where one thread would not show it."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    two = {**child_env(), "OMP_NUM_THREADS": "2"}
    # configs/tiny.toml's own model: its ops are large enough that ATen splits them over the 2 threads
    demo = ("--model.n_layer", "4", "--model.n_head", "4", "--model.n_embd", "128", "--model.block_size", "128",
            "--data.seq_len", "128", "--training.global_batch_size", "16", "--training.micro_batch_size", "8")
    same = (*SAME, *demo)
    run_train(ref, demo_data, *same, env=two)

    proc = launch(out, demo_data, *same, env=two)
    wait_until(lambda: last_step(out) >= 2, proc, "step 2")
    frozen(proc, lambda: proc.send_signal(signal.SIGTERM))
    assert finish(proc)[0] == 0
    s1 = last_step(out)

    # every checkpoint write now sleeps 1 s first (a slow filesystem), so the stop comes mid-save
    proc = launch(out, demo_data, *same, env={**two, "GPT_SIMPLE_DRILL": "save=1"})
    in_flight = []

    def periodic_in_flight():
        in_flight[:] = [n for n in names(out) if n.startswith(".tmp-step-") and n[len(".tmp-step-"):].isdigit()]
        return bool(in_flight)

    wait_until(periodic_in_flight, proc, "a periodic save in flight")
    frozen(proc, lambda: proc.send_signal(signal.SIGTERM))
    assert finish(proc)[0] == 0
    s2 = last_step(out)
    flying = in_flight[0][len(".tmp-"):]
    assert flying in committed(out)  # the stop waited for the save in flight and committed it
    launch2 = [e for e in events(out) if e["launch"] == 2]
    assert [e["event"] for e in launch2][-1] == "stop"
    saves = [e for e in launch2 if e["event"] == "save"]
    assert saves[0]["checkpoint"] == flying and saves[0]["async"] is True
    assert [s["checkpoint"] for s in saves[1:]] == ([] if int(flying[5:]) == s2 else [f"step-{s2}-shutdown"])

    run_train(out, demo_data, *same, env=two)
    assert status_word(out) == "COMPLETED"
    resumes = [e for e in events(out) if e["event"] == "resume"]
    assert [e["step"] for e in resumes] == [s1, s2] and 0 < s1 < s2 < 16
    assert all(e["config_changes"] == {} for e in resumes)
    assert kinds(out).count("stop") == 2
    assert not [n for n in names(out) if n.startswith(".")]
    strip = [{k: r[k] for k in ("step", "loss", "lr", "grad_norm", "tokens")} for r in metrics(ref)]
    assert [{k: r[k] for k in ("step", "loss", "lr", "grad_norm", "tokens")} for r in metrics(out)] == strip
    assert [r["step"] for r in metrics(out)] == list(range(1, 17))
    assert_same_weights(ref / "checkpoints" / "step-16-final", out / "checkpoints" / "step-16-final")


@pytest.mark.slow
def test_stopped_before_the_first_step_resumes_bit_identical(tmp_path, demo_data):
    """A job whose deadline has already come when set-up ends stops at step 0 with a shutdown checkpoint; it holds
    no optimizer state (there is none yet: DCP would invent one with AdamW's step count at 1), and the resumed
    run equals the uninterrupted one bit for bit. Seen in the shell-loop test on a loaded machine."""
    args = ("--training.max_steps", "6")
    ref, out = tmp_path / "ref", tmp_path / "run"
    run_train(ref, demo_data, *args)
    first = run_train(out, demo_data, *args, env=child_env(GPT_SIMPLE_MAX_RUNTIME="1"))
    assert "STOPPED" in first.stdout and committed(out) == ["step-0-shutdown"], first.stdout[-2000:]
    meta = json.loads((out / "checkpoints" / "step-0-shutdown" / "meta.json").read_text())
    assert meta["step"] == 0 and meta["model"]["optimizer_state"] is False
    run_train(out, demo_data, *args)
    assert status_word(out) == "COMPLETED"
    assert [e["step"] for e in events(out) if e["event"] == "resume"] == [0]
    keys = ("step", "loss", "lr", "grad_norm", "tokens")
    assert [{k: r[k] for k in keys} for r in metrics(out)] == [{k: r[k] for k in keys} for r in metrics(ref)]
    assert_same_weights(ref / "checkpoints" / "step-6-final", out / "checkpoints" / "step-6-final")


# -- end to end: a different world size --------------------------------------------------------------------------
@pytest.mark.slow
def test_elastic_two_ranks_one_rank_two_ranks(tmp_path, demo_data):
    """2 ranks -> 1 -> 2: DCP reshards model and optimizer, the data stream continues exactly (the audit of
    every step's token spans is identical) and the losses follow the uninterrupted run."""
    from gpt_simple.shutdown import request_stop
    args = ("--training.max_steps", "10", "--data.audit", "true")
    ref, out = tmp_path / "ref", tmp_path / "run"
    run_train(ref, demo_data, *args)  # one process: the stream and the losses do not depend on the world size
    for nproc, more in ((2, 3), (1, 3)):
        proc = launch(out, demo_data, *args, nproc=nproc)
        target = last_step(out) + more
        wait_until(lambda: last_step(out) >= target, proc, f"step {target}")
        frozen(proc, lambda: request_stop(out))
        code, _, stderr = finish(proc)
        assert code == 0, stderr[-3000:]
        assert status_word(out) == "STOPPED"
    run_train(out, demo_data, *args, nproc=2)
    assert status_word(out) == "COMPLETED"
    assert [e["world_size"] for e in events(out) if e["event"] == "launch"] == [2, 1, 2]
    assert [e["step"] for e in events(out) if e["event"] == "resume"] == \
        [e["step"] for e in events(out) if e["event"] == "stop"]
    audit = lambda run: [json.loads(line) for line in (run / "data_audit.jsonl").read_text().splitlines()]
    assert audit(out) == audit(ref) and [a["step"] for a in audit(out)] == list(range(1, 11))
    a, b = losses(ref), losses(out)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 11))
    for (_, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=1e-4, abs=1e-5)
    wa = load_model_state(ref / "checkpoints" / "step-10-final")
    wb = load_model_state(out / "checkpoints" / "step-10-final")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-3, atol=1e-4)


# -- end to end: kill -9 during a save ---------------------------------------------------------------------------
KILL = ("--training.save_steps", "2", "--training.keep_last_k", "0")


@pytest.mark.slow
def test_kill_9_during_saves(tmp_path, demo_data):
    """SIGKILL mid-save, twice (during an async periodic save, then during the final save): each next start
    removes the half-written directory (and an uncommitted one planted at a higher step), resumes from the newest
    committed checkpoint by step (a -final at a lower step, left from before max_steps was raised, does not
    win) and the run ends with exactly the uninterrupted run's losses and weights.

    Also: an async save's staging copy overlaps the next forward/backward and the optimizer step waits for it.
    With that copy slowed down in the reference run (it would otherwise finish long before the step), its
    periodic step-4 checkpoint still holds exactly the weights after step 4: those of a run that ended there."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    run_train(ref, demo_data, *KILL, "--training.max_steps", "8", env=child_env(GPT_SIMPLE_DRILL="stage=0.5"))
    run_train(out, demo_data, *KILL, "--training.max_steps", "4")
    assert committed(out) == ["step-2", "step-4-final"]
    assert_same_weights(ref / "checkpoints" / "step-4", out / "checkpoints" / "step-4-final")
    slow = child_env(GPT_SIMPLE_DRILL="save=2")  # every checkpoint write sleeps 2 s first: a slow filesystem

    def killed_mid_save(partial, also=lambda: True):
        proc = launch(out, demo_data, *KILL, "--training.max_steps", "8", env=slow)
        wait_until(lambda: partial in names(out) and also(), proc, f"{partial} in flight")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert partial in names(out) and status_word(out) == "CRASHED"

    def removed_at(launch_no):
        return {e["name"] for e in events(out) if e["event"] == "partial_checkpoint_removed"
                and e["launch"] == launch_no}

    def resumed_at(launch_no):
        return [e["checkpoint"] for e in events(out) if e["event"] == "resume" and e["launch"] == launch_no]

    killed_mid_save(".tmp-step-6")  # launch 2, resumed from step-4-final
    assert committed(out)[-1] == "step-4-final"
    killed_mid_save(".tmp-step-8-final", also=lambda: "step-6" in committed(out))  # launch 3
    assert removed_at(3) == {".tmp-step-6"} and resumed_at(3) == ["step-4-final"]
    assert committed(out) == ["step-2", "step-4-final", "step-6"]

    planted = out / "checkpoints" / "step-100"  # everything of a checkpoint but the commit marker
    shutil.copytree(out / "checkpoints" / "step-6", planted)
    (planted / COMMITTED).unlink()
    proc = run_train(out, demo_data, *KILL, "--training.max_steps", "8")
    assert "removed uncommitted checkpoint .tmp-step-8-final" in proc.stdout
    assert removed_at(4) == {".tmp-step-8-final", "step-100"} and resumed_at(4) == ["step-6"]
    assert not [n for n in names(out) if n.startswith(".") or n == "step-100"]
    assert status_word(out) == "COMPLETED"
    assert losses(out) == losses(ref)
    assert_same_weights(ref / "checkpoints" / "step-8-final", out / "checkpoints" / "step-8-final")
    # TensorBoard's own reader shows every step once (launches 2 and 3 logged steps that launch 4 trained again)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    shown = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [step for step, _ in shown] == [step for step, _ in losses(out)] == list(range(1, 9))
    assert [value for _, value in shown] == pytest.approx([loss for _, loss in losses(out)], rel=1e-6)
    assert_the_report_accounts_for_every_launch(out, tmp_path / "report.html")


def assert_the_report_accounts_for_every_launch(out: Path, page: Path) -> None:
    """`gpt-simple report` on the chain above: four launches, the two killed ones estimated from their last write
    and charged with the steps the next launch trained again (5-6, then 7-8), the others from their ledgers;
    the HTML page draws them."""
    proc = subprocess.run([GPT_SIMPLE, "report", str(out), "--json", "--html", str(page)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    rows, summary = got["launches"], got["summary"]
    assert [r["launch"] for r in rows] == [1, 2, 3, 4]
    assert [r["estimated"] for r in rows] == [False, True, True, False]
    assert [r["lost_steps"] for r in rows] == [0, 2, 2, 0]
    assert [r["ending"] for r in rows] == ["completed", "killed (no end recorded)", "killed (no end recorded)",
                                           "completed"]
    assert [r["steps"] for r in rows] == [4, None, None, 2]
    for r in rows:
        assert r["end"] > r["start"] and r["total_s"] == pytest.approx(sum(r[k] for k in (
            "setup_s", "train_s", "eval_s", "save_s", "other_s")), abs=1e-6)
        assert 0 <= r["lost_s"] <= r["train_s"]
    assert all(r["gap_before_s"] >= 0 for r in rows[1:])
    assert 0 < summary["goodput"] < 1 and 0 < summary["calendar_goodput"] <= summary["goodput"]
    assert summary["estimated_launches"] == [2, 3]
    html = page.read_text()
    assert html.count("<img") == 2 and html.count("killed (no end recorded)") == 2
    table = html.split("<pre>")[1].split("</pre>")[0].splitlines()
    assert [line.split()[0] for line in table[3:7]] == ["1", "2*", "3*", "4"]  # after the summary and header
    status = subprocess.run([PYTHON, str(ROOT / "status.py"), str(out)], capture_output=True, text=True)
    assert f"goodput   {summary['goodput']:.3f} of 4 launch(es)" in status.stdout


# -- end to end: corrupt checkpoints -----------------------------------------------------------------------------
def corrupt(ckpt: Path, part: str) -> None:
    if part == "shard truncated":
        shard = ckpt / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif part == "meta.json garbled":
        (ckpt / "meta.json").write_text('{"step": 6, "arch')
    elif part == "DCP metadata garbled":
        data = bytearray((ckpt / ".metadata").read_bytes())
        data[len(data) // 3: len(data) // 3 + 64] = b"\xff" * 64
        (ckpt / ".metadata").write_bytes(bytes(data))
    else:
        raise ValueError(part)


@pytest.mark.slow
def test_corrupt_newest_checkpoints_fall_back_to_the_previous(tmp_path, demo_data):
    """The three newest checkpoints are each damaged differently: the next start warns about each, records a
    checkpoint_fallback event for each, moves them aside as corrupt-NAME and resumes from the one before, then
    re-trains exactly as before. With nothing loadable left it refuses (never silently starts afresh)."""
    out = tmp_path / "run"
    args = ("--training.max_steps", "8", "--training.save_steps", "2", "--training.keep_last_k", "0")
    run_train(out, demo_data, *args)
    before = losses(out)
    damage = {"step-8-final": "shard truncated", "step-6": "meta.json garbled", "step-4": "DCP metadata garbled"}
    for name, part in damage.items():
        corrupt(out / "checkpoints" / name, part)

    proc = run_train(out, demo_data, *args)
    assert "Traceback" not in proc.stderr, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: checkpoint ")]
    assert [w.split()[2] for w in warnings] == list(damage), proc.stderr
    assert all(w.endswith("falling back to the one before") for w in warnings)
    fallbacks = [e for e in events(out) if e["event"] == "checkpoint_fallback"]
    assert [e["checkpoint"] for e in fallbacks] == list(damage)
    assert all("\n" not in e["error"] and str(out) in e["error"] for e in fallbacks)
    assert [e["checkpoint"] for e in events(out) if e["event"] == "resume"] == ["step-2"]
    assert sorted(n for n in names(out) if n.startswith("corrupt-")) == sorted(f"corrupt-{n}" for n in damage)
    assert committed(out) == ["step-2", "step-4", "step-6", "step-8-final"]
    assert status_word(out) == "COMPLETED" and losses(out) == before

    for name in committed(out):
        corrupt(out / "checkpoints" / name, "meta.json garbled")
    proc = run_train(out, demo_data, *args, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no checkpoint under ")
    assert status_word(out) == "ERROR"
    assert committed(out) == ["step-2", "step-4", "step-6", "step-8-final"]  # none moved aside


# -- end to end: retention ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_retention_keeps_last_k_and_milestones(tmp_path, demo_data):
    out = tmp_path / "run"
    args = ("--training.save_steps", "2", "--training.keep_last_k", "2", "--training.keep_milestone_every", "4")
    run_train(out, demo_data, *args, "--training.max_steps", "12")
    assert names(out) == ["step-10", "step-12-final", "step-4", "step-8"]  # no .trash-* left behind
    assert [e["checkpoint"] for e in events(out) if e["event"] == "save"] == \
        ["step-2", "step-4", "step-6", "step-8", "step-10", "step-12-final"]
    run_train(out, demo_data, *args, "--training.max_steps", "14")
    assert names(out) == ["step-12-final", "step-14-final", "step-4", "step-8"]


# -- end to end: what a resume accepts and refuses -----------------------------------------------------------------
@pytest.mark.slow
def test_resume_refusals_scratch_force_path_and_config_changes(tmp_path, demo_data):
    out = tmp_path / "run"
    args = ("--training.max_steps", "4", "--training.save_steps", "2", "--training.keep_last_k", "0")
    run_train(out, demo_data, *args)
    first = losses(out)
    before = digest(out / "checkpoints")

    # another architecture: refused in one line naming the field; ERROR; the checkpoint is not touched
    proc = run_train(out, demo_data, *args, "--model.n_layer", "3", check=False)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "architecture differs" in line and "model.n_layer (2 in checkpoint, 3 now)" in line
    assert "model.n_embd" not in line
    assert status_word(out) == "ERROR"
    assert digest(out / "checkpoints") == before and not [n for n in names(out) if n.startswith("corrupt-")]

    # 'scratch' refuses to overwrite a run; --force clears it and starts afresh
    proc = run_train(out, demo_data, *args, "--training.resume", "scratch", check=False)
    assert proc.returncode == 2
    assert "--force" in one_error_line(proc.stderr)
    assert status_word(out) == "ERROR" and digest(out / "checkpoints") == before
    proc = run_train(out, demo_data, *args, "--training.resume", "scratch", "--force")
    assert "starting a fresh run" in proc.stdout
    assert kinds(out)[0] == "launch" and "resume" not in kinds(out) and "error" not in kinds(out)  # cleared
    assert losses(out) == first and committed(out) == ["step-2", "step-4-final"]

    # a path: that checkpoint, even when newer ones exist; non-architecture changes are allowed and logged
    ckpt = str(out / "checkpoints" / "step-2")
    proc = run_train(out, demo_data, *args, "--training.resume", ckpt, "--optimizer.lr", "1e-3",
                     "--training.max_steps", "5")
    assert "resumed from step-2 (step 2" in proc.stdout and "config changed since the checkpoint: " in proc.stdout
    resume = [e for e in events(out) if e["event"] == "resume"][-1]
    assert resume["checkpoint"] == "step-2"
    assert resume["config_changes"] == {"optimizer.lr": [0.003, 0.001], "training.max_steps": [4, 5],
                                        "training.resume": ["scratch", ckpt]}
    now = losses(out)
    assert [s for s, _ in now] == [1, 2, 3, 4, 5]
    assert now[:3] == first[:3]  # step 3's loss is computed before its (new-lr) update
    assert now[3] != first[3] and metrics(out)[2]["lr"] < 1e-3

    proc = run_train(out, demo_data, *args, "--training.resume", str(out / "checkpoints" / "step-3"), check=False)
    assert proc.returncode == 2
    assert "is not a committed checkpoint directory" in one_error_line(proc.stderr)
    assert status_word(out) == "ERROR"


# -- end to end: a save that fails ---------------------------------------------------------------------------------
def _file_size_limit(limit: int):
    def apply():  # in the child, before exec: a per-file size limit even root cannot write past (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_failed_saves_leave_previous_checkpoints_and_fail_loudly(tmp_path, demo_data):
    """A write that fails (here: the shard outgrows a file-size limit, as on a full disk) fails the run with
    ERROR, for an async periodic save and for a synchronous final save; the checkpoints already committed are
    untouched, the partial directory is removed, and the next start resumes from them."""
    out = tmp_path / "run"
    base = ("--training.keep_last_k", "0", "--training.max_steps")
    run_train(out, demo_data, *base, "4", "--training.save_steps", "2")
    assert committed(out) == ["step-2", "step-4-final"]
    before = digest(out / "checkpoints")

    for save_steps, failed in (("2", "step-6"), ("0", "step-8-final")):
        proc = launch(out, demo_data, *base, "8", "--training.save_steps", save_steps,
                      preexec_fn=_file_size_limit(256 * 1024))
        code, stdout, stderr = finish(proc)
        assert code == 2 and "Traceback" not in stderr, stderr
        assert stderr.strip().splitlines()[-1].startswith(f"error: saving {failed} failed ("), stderr
        assert status_word(out) == "ERROR"
        assert [e for e in events(out) if e["event"] == "error"][-1]["message"].startswith(f"saving {failed} failed")
        assert committed(out) == ["step-2", "step-4-final"]
        assert {k: v for k, v in digest(out / "checkpoints").items() if not k.startswith(".tmp-")} == before
        assert not [n for n in names(out) if n.startswith(".tmp-")]  # the failed save removed its partial

    proc = run_train(out, demo_data, *base, "8", "--training.save_steps", "0")
    assert "removed uncommitted checkpoint" not in proc.stdout
    assert [e["checkpoint"] for e in events(out) if e["event"] == "resume"] == ["step-4-final"] * 3
    assert status_word(out) == "COMPLETED" and committed(out) == ["step-2", "step-4-final", "step-8-final"]


# -- end to end: no state is saved twice ---------------------------------------------------------------------------
@pytest.mark.slow
def test_halt_right_after_a_periodic_save_does_not_save_again(tmp_path):
    """A bucket that runs dry right after a periodic save: the halt commits that save instead of writing the
    same state again as step-N-shutdown. (A stop right after one: test_shutdown's save-in-flight test.)"""
    from helpers.data import write_bucket
    data = tmp_path / "data"
    write_bucket(data, "a", [3000] * 20, seed=1)
    write_bucket(data, "b", [300] * 3, seed=2)
    args = ("--data.curriculum", "[{mix = {a = 1, b = 1}}]", "--training.max_steps", "50")
    first = tmp_path / "first"
    run_train(first, data, *args)
    assert status_word(first) == "HALTED"
    halt = json.loads((first / "HALTED").read_text())["step"]
    assert halt >= 2 and committed(first) == [f"step-{halt}-shutdown"]

    out = tmp_path / "run"
    run_train(out, data, *args, "--training.save_steps", str(halt))
    assert status_word(out) == "HALTED" and committed(out) == [f"step-{halt}"]
    assert [e["event"] for e in events(out) if e["event"] != "ledger"][-2:] == ["save", "halt"]  # ledger: issue 19
    assert len([e for e in events(out) if e["event"] == "save"]) == 1

