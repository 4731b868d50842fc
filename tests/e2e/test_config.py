"""Config errors through the real train.py: one clear line on stderr, exit 2, no traceback."""
import subprocess

import pytest

from helpers.paths import PYTHON, ROOT


@pytest.mark.parametrize("args, message", [
    (["--config", "missing.toml"], "error: missing.toml: cannot read config file"),
    (["--model.n_head", "7"], "error: model.n_embd (768) must be divisible by model.n_head (7)"),
    (["--bogus"], "error: command line: expected --section.field value, got '--bogus'"),
])
def test_cli_prints_one_line_and_exits_2(tmp_path, args, message):
    proc = subprocess.run([PYTHON, str(ROOT / "train.py"), *args], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == message.strip() or proc.stderr.strip().startswith(message)
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_a_malformed_drill_is_refused_before_anything_is_built(tmp_path, demo_data):
    """The test seam is validated at start-up: one line naming GPT_SIMPLE_DRILL, exit 2, ERROR in an existing run
    folder, no training."""
    from helpers.train import child_env, run_train
    out = tmp_path / "run"
    out.mkdir()
    proc = run_train(out, demo_data, "--training.max_steps", "3", env=child_env(GPT_SIMPLE_DRILL="step=fast"),
                     check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: GPT_SIMPLE_DRILL='step=fast': step needs a number of "
                                                "seconds >= 0, not 'fast'"]
    assert (out / "run_state.json").exists() and not (out / "metrics.jsonl").exists()
    import json
    assert json.loads((out / "run_state.json").read_text())["status"] == "ERROR"
