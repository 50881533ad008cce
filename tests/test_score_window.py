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


@given(capacity=st.integers(1, 12), flags=st.lists(st.sampled_from([0.0, 1.0]), max_size=40),
       later=scores)
def test_an_integer_window_holds_what_a_float_one_holds(
    capacity: int, flags: list[float], later: list[float]
) -> None:
    narrow, wide = ScoreWindow(capacity, np.uint8), ScoreWindow(capacity)
    for value in [*flags, *later]:  # flags fit a byte; most later values do not
        narrow.append(value)
        wide.append(value)
        np.testing.assert_array_equal(narrow.values(), wide.values())
    assert narrow.values().dtype == np.float64


def test_an_integer_window_keeps_a_byte_a_flag_until_a_value_does_not_fit() -> None:
    window = ScoreWindow(2016, np.uint8)
    window.extend(np.array([0.0, 1.0, 1.0]))
    assert len(pickle.dumps(window)) < 2016 * 2
    window.append(0.5)
    np.testing.assert_array_equal(window.values(), [0.0, 1.0, 1.0, 0.5])
    times = ScoreWindow(2, np.int32)
    times.extend(np.array([2.0**31 - 1, 2.0**31]))  # the second is past int32
    np.testing.assert_array_equal(times.values(), [2.0**31 - 1, 2.0**31])
