"""Shared fixtures. Helper functions live in the helpers package (tests/helpers/), imported as modules."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from filelock import FileLock


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The embedded demo corpus, built once for all xdist workers (they share the base temp dir's parent)."""
    shared = Path(os.environ.get("GPT_SIMPLE_TEST_DATA", tmp_path_factory.getbasetemp().parent / "demo-data"))
    shared.mkdir(parents=True, exist_ok=True)
    with FileLock(str(shared) + ".lock"):
        from gpt_simple.data.prepare import ensure_demo
        ensure_demo(str(shared))
    return shared
