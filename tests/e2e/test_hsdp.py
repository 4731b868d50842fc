"""Hybrid sharding (parallel.replicate_degree): a 2-D replicate x shard mesh under torchrun with 4 gloo ranks.
Checkpoints stay topology-free: a run moves between a 2x2 mesh, plain FSDP over 4, pure replication over 4 and
1 process and back (2 ranks <-> 1 process: tests/e2e/test_checkpoint.py's elastic test), with the data stream exact and the losses those of one process; on the same
mesh, resuming is bit-identical. A degree that does not divide the world size is a one-line error."""
import json
import subprocess

import pytest
import torch

from gpt_simple.checkpoint import load_model_state
from helpers.paths import PYTHON, ROOT
from helpers.train import TINY, child_env, events, losses, metrics, run_train, status_word

# micro-batch 2: 4 ranks x 2 sequences = the global batch of 8 in one micro-batch; fewer ranks accumulate.
# No evaluation, no periodic saves: each launch ends at its max_steps with a final checkpoint the next resumes.
ARGS = ("--training.micro_batch_size", "2", "--data.audit", "true", "--training.keep_last_k", "0",
        "--training.peak_flops", "1e12", "--eval.every_steps", "0", "--eval.at_end", "false")
KEYS = ("step", "loss", "lr", "grad_norm", "tokens")


def degree(r: int) -> tuple[str, str]:
    return "--parallel.replicate_degree", str(r)


def audit(out) -> list[dict]:
    return [json.loads(line) for line in (out / "data_audit.jsonl").read_text().splitlines()]


def records(out, upto: int) -> list[dict]:
    return [{k: r[k] for k in KEYS} for r in metrics(out) if r["step"] <= upto]


@pytest.mark.slow
def test_hsdp_checkpoints_move_between_meshes(tmp_path, demo_data):
    """2x2 -> 2x2 -> 1x4 -> 4x1 -> 1 process -> 2x2. Each launch trains two more steps
    (max_steps raised: decay_steps is fixed, so the schedule does not move) and resumes from the final
    checkpoint of the one before."""
    ref, same, out = tmp_path / "ref", tmp_path / "same", tmp_path / "run"
    run_train(ref, demo_data, *ARGS, "--training.max_steps", "13")  # one process: the world size does not matter
    first = run_train(same, demo_data, *ARGS, *degree(2), "--training.max_steps", "5", nproc=4)
    assert "world size 4 (gloo, cpu), mesh 2x2 (replicate x shard; HSDP)" in first.stdout

    chain = [(4, 2, 3), (4, 2, 5), (4, 1, 7), (4, 4, 9), (1, 1, 11), (4, 2, 13)]  # nproc, degree, steps
    for nproc, r, steps in chain:
        run_train(out, demo_data, *ARGS, *degree(r), "--training.max_steps", str(steps), nproc=nproc)
    assert status_word(out) == "COMPLETED"
    assert [e["mesh"] for e in events(out) if e["event"] == "launch"] == \
        [[2, 2], [2, 2], [1, 4], [4, 1], [1, 1], [2, 2]]
    assert [e["checkpoint"] for e in events(out) if e["event"] == "resume"] == \
        [f"step-{s}-final" for _, _, s in chain[:-1]]

    # the same mesh, stopped and resumed: bit for bit the uninterrupted 2x2 run, weights included
    assert records(out, 5) == records(same, 5)
    wa = load_model_state(same / "checkpoints" / "step-5-final")
    wb = load_model_state(out / "checkpoints" / "step-5-final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    # across meshes: the same data, step by step, and the one-process losses to float-reduction tolerance
    assert audit(out) == audit(ref) and [a["step"] for a in audit(out)] == list(range(1, 14))
    a, b = losses(ref), losses(out)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 14))
    for (_, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=1e-4, abs=1e-5)
    # the global gradient norm (DTensor over each mesh) that clipping (optimizer.grad_clip 1.0) scales by
    norms = [(r["grad_norm"], o["grad_norm"]) for r, o in zip(metrics(ref), metrics(out))]
    assert all(y == pytest.approx(x, rel=1e-4) for x, y in norms) and max(x for x, _ in norms) > 1.0


def test_replicate_degree_must_divide_the_world_size(tmp_path, demo_data):
    """One line naming the field, exit 2, before anything trains: from train.py and from --dry-run alike."""
    out = tmp_path / "run"
    proc = run_train(out, demo_data, *degree(2), "--training.max_steps", "3", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: parallel.replicate_degree (2) must divide the world size (1)"]
    assert not (out / "checkpoints").exists()

    dry = [PYTHON, str(ROOT / "train.py"), *TINY, "--data.dir", str(demo_data), "--data.demo", "false",
           "--training.output_dir", str(out), "--training.max_steps", "3", "--dry-run"]
    for r, world, expect in ((3, "4", "error: parallel.replicate_degree (3) must divide the world size (4)"),
                             (2, "4", "parallel.replicate_degree = 2: mesh 2x2 (replicate x shard; HSDP) on "
                                      "world size 4"),
                             ("auto", "4", "mesh 2x2 (replicate x shard; HSDP)")):
        proc = subprocess.run([*dry, *degree(r)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env=child_env(WORLD_SIZE=world, LOCAL_WORLD_SIZE="2"))
        assert expect in (proc.stderr if expect.startswith("error") else proc.stdout), proc.stderr
        assert proc.returncode == (2 if expect.startswith("error") else 0), proc.stderr
        if expect.startswith("error"):
            assert [line for line in proc.stderr.splitlines() if line.startswith("error")] == [expect]
