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


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first, the unit tests last: xdist deals the tests out in this order, so the long
    ones start early and the short ones fill the end, instead of a long test picked up last running alone on one
    worker while the others idle. (Deterministic: every worker must collect the same order.)"""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, "/unit/" in item.nodeid))
