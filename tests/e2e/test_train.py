"""End to end: train.py / torchrun / the console entry leave a complete run directory; FSDP2 on 2 ranks
follows the 1-process loss trajectory."""
import json
import subprocess
from pathlib import Path

import pytest

from helpers.train import PYTHON, TINY, child_env, losses, metrics, run_train, status_word

pytestmark = pytest.mark.slow


def test_run_directory(tmp_path, demo_data):
    out = tmp_path / "run"
    proc = run_train(out, demo_data, "--training.max_steps", "6", "--training.log_steps", "3",
                     "--training.peak_flops", "0")  # 0: MFU against this CPU's measured matmul rate
    assert "TFLOP/s per device (measured fp32 matmul rate of this CPU)" in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and lines[-1].startswith("step 6/6 | loss ")
    for field in ("| lr ", " tok/s |", "| mfu ", "| elapsed ", "| eta "):
        assert field in lines[-1]
    records = metrics(out)
    assert [r["step"] for r in records] == [3, 6]
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "mfu"):
        assert key in records[-1]
    assert 0 < records[-1]["mfu"] <= 1
    assert records[-1]["tokens"] == 6 * 8 * 64
    assert (out / "config.toml").read_text().count("[model]") == 1
    assert status_word(out) == "COMPLETED"
    assert (out / "checkpoints" / "step-6-final" / "COMMITTED").exists()
    state = json.loads((out / "run_state.json").read_text())
    assert state["step"] == 6 and state["last_checkpoint"] == "step-6-final"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    scalars = acc.Scalars("train/loss")
    assert [s.step for s in scalars] == [3, 6]
    assert scalars[-1].value == pytest.approx(records[-1]["loss"], rel=1e-6)


def test_fsdp_two_ranks_follow_one_process(tmp_path, demo_data):
    one = run_train(tmp_path / "one", demo_data, "--training.max_steps", "8")
    two = run_train(tmp_path / "two", demo_data, "--training.max_steps", "8", nproc=2)
    assert "world size 2 (gloo, cpu)" in two.stdout and "world size 1" in one.stdout
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    for (_, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=1e-4, abs=1e-5)


def test_micro_batch_split_does_not_change_training(tmp_path, demo_data):
    run_train(tmp_path / "m4", demo_data, "--training.max_steps", "4")
    run_train(tmp_path / "m2", demo_data, "--training.max_steps", "4", "--training.micro_batch_size", "2")
    for (_, x), (_, y) in zip(losses(tmp_path / "m4"), losses(tmp_path / "m2")):
        assert y == pytest.approx(x, rel=1e-4, abs=1e-5)


def test_loss_falls_on_the_demo_corpus(tmp_path, demo_data):
    run_train(tmp_path / "run", demo_data, "--training.max_steps", "40", "--optimizer.lr", "3e-3",
              "--optimizer.decay_steps", "0")
    first, last = metrics(tmp_path / "run")[0]["loss"], metrics(tmp_path / "run")[-1]["loss"]
    assert first > 5.0 and last < first - 1.0


@pytest.mark.parametrize("entry", [["gpt-simple", "train"], [PYTHON, "-m", "gpt_simple", "train"]])
def test_console_entries_train(tmp_path, demo_data, entry):
    if entry[0] == "gpt-simple":  # installed next to the interpreter by `pip install -e .`
        entry = [str(Path(PYTHON).with_name("gpt-simple")), "train"]
    out = tmp_path / "run"
    proc = subprocess.run([*entry, *TINY, "--data.dir", str(demo_data), "--data.demo", "false",
                           "--training.output_dir", str(out), "--training.max_steps", "3"],
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert status_word(out) == "COMPLETED"


def test_demo_corpus_has_code_and_prose(demo_data):
    from gpt_simple.data.shards import open_buckets
    buckets = open_buckets(demo_data)
    assert set(buckets) == {"code", "prose"}
    assert buckets["code"].n_tokens > 1_000_000 and buckets["prose"].n_tokens > 100_000
    assert buckets["code"].tokenizer == "byte"
