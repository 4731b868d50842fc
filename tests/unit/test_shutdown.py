"""Graceful shutdown: deadline resolution (config budget, SLURM end time, relative budget), in this process."""
import pytest

from gpt_simple.shutdown import resolve_deadline


def test_config_budget_wins():
    d = resolve_deadline(100, {"SLURM_JOB_END_TIME": "5000", "GPT_SIMPLE_MAX_RUNTIME": "7"}, start=1000)
    assert (d.at, d.source) == (1100, "training.max_runtime_seconds")


def test_slurm_end_time_before_relative_budget():
    d = resolve_deadline(0, {"SLURM_JOB_END_TIME": "5000", "GPT_SIMPLE_MAX_RUNTIME": "7"}, start=1000)
    assert (d.at, d.source) == (5000, "SLURM_JOB_END_TIME")


def test_relative_budget_counts_from_process_start():
    d = resolve_deadline(0, {"GPT_SIMPLE_MAX_RUNTIME": "7"}, start=1000)
    assert (d.at, d.source) == (1007, "GPT_SIMPLE_MAX_RUNTIME")


def test_no_deadline():
    d = resolve_deadline(0, {}, start=1000)
    assert (d.at, d.source, d.warnings) == (None, "none", [])


@pytest.mark.parametrize("bad", ["soon", "-5", "nan", "inf", "0"])
def test_unparsable_value_is_reported_and_next_source_used(bad):
    d = resolve_deadline(0, {"SLURM_JOB_END_TIME": bad, "GPT_SIMPLE_MAX_RUNTIME": "7"}, start=1000)
    assert (d.at, d.source) == (1007, "GPT_SIMPLE_MAX_RUNTIME")
    assert d.warnings == [f"ignoring SLURM_JOB_END_TIME={bad!r}: not a positive number of seconds"]
