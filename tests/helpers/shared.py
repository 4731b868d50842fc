"""Uninterrupted reference runs computed once per test session and shared by every xdist worker (a module fixture
would compute one per worker that runs a test of the module). Tests only read them."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from filelock import FileLock


def session_dir(tmp_path_factory) -> Path:
    """A folder of this session that every worker sees: under xdist the workers' base temp dirs share a parent
    (the session's); without xdist the base temp dir is the session's own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_run(tmp_path_factory, name: str, make) -> Path:
    """`make(out)` once per session (whichever worker asks first; the others wait), then its folder."""
    root = session_dir(tmp_path_factory) / "shared-runs"
    root.mkdir(parents=True, exist_ok=True)
    out, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            make(out)
            done.touch()
    return out
