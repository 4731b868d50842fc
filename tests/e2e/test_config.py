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
