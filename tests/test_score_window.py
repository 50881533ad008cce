"""ScoreWindow keeps the last `capacity` scores in order, like a bounded deque."""

from __future__ import annotations

import pickle
from collections import deque

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from forecaster.models.calibration import ScoreWindow

scores = st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), max_size=40)


@given(capacity=st.integers(1, 12), first=scores, second=scores)
def test_it_holds_what_a_bounded_deque_holds(
    capacity: int, first: list[float], second: list[float]
) -> None:
    window, reference = ScoreWindow(capacity), deque[float](maxlen=capacity)
    for score in first:
        window.append(score)
        reference.append(score)
    window.extend(np.array(second))
    reference.extend(second)
    assert len(window) == len(reference)
    np.testing.assert_array_equal(window.values(), np.array(reference, dtype=float))
    copy = pickle.loads(pickle.dumps(window))
    np.testing.assert_array_equal(copy.values(), window.values())


def test_values_are_a_copy() -> None:
    window = ScoreWindow(3)
    window.extend(np.array([1.0, 2.0, 3.0, 4.0]))
    values = window.values()
    values[:] = 0.0
    np.testing.assert_array_equal(window.values(), [2.0, 3.0, 4.0])
