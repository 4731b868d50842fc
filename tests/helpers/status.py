"""Run-state helpers: a run_state.json written by the real RunState (its writer is this test process)."""
from gpt_simple.run_state import RunState


def write_state(out, **fields):
    out.mkdir(parents=True, exist_ok=True)
    rs = RunState(out)
    rs.update(**fields)
    return rs
