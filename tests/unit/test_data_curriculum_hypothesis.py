"""The schedule's mix bound as a Hypothesis property (runs where hypothesis is installed; the seeded sweep in
test_data_curriculum.py always runs)."""
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from helpers.curriculum import max_lag  # noqa: E402

weight = st.one_of(st.integers(1, 1000), st.floats(1e-6, 1e6, allow_nan=False, allow_infinity=False),
                   st.sampled_from([0.1, 0.2, 0.3, 1 / 3, 0.5]))


@settings(max_examples=300, deadline=None)
@given(st.lists(weight, min_size=1, max_size=12), st.integers(1, 1200))
def test_mix_within_one_sequence_at_every_step(ws, n):
    assert max_lag({f"b{i:02d}": w for i, w in enumerate(ws)}, n) < 1
