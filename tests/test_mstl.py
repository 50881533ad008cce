"""MSTL: seasonal periods from the step and the data, outliers kept out of the profiles."""

from __future__ import annotations

import numpy as np
import pandas as pd

from forecaster.models.mstl import MSTLModel, detect_period
from forecaster.models.robust import clip_outliers

STEP = pd.Timedelta("5min")
DAY = 288
WEEK = 7 * DAY


def grid_series(values: np.ndarray) -> pd.Series:
    index = pd.date_range("2024-03-04T00:00Z", periods=len(values), freq=STEP, unit="ns")
    return pd.Series(np.asarray(values, dtype=float), index=index)


def daily(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 100 + 50 * np.sin(2 * np.pi * t / DAY) + rng.normal(0, 3, n)


def test_clipping_removes_a_spike_and_keeps_the_cycle() -> None:
    values = daily(3 * DAY)
    spiked = values.copy()
    spiked[500:503] += 1000
    clipped = clip_outliers(spiked, 12)
    assert clipped[500:503].max() < values[500:503].max() + 30
    untouched = np.ones(len(values), dtype=bool)
    untouched[500:503] = False
    assert np.allclose(clipped[untouched], spiked[untouched], atol=15)


def test_a_one_off_spike_does_not_repeat_the_next_day() -> None:
    values = daily(5 * DAY)
    at = len(values) - DAY + 10  # the spike's time of day, tomorrow, is 11 steps ahead
    values[at : at + 3] += 2000
    errors = {}
    for clip in (True, False):
        model = MSTLModel(STEP, clip=clip).fit(grid_series(values[: at + 3 + 20]))
        model.update(grid_series(values)[at + 3 + 20 :])
        tomorrow = model.predict(20).mean[10:]
        expected = daily(6 * DAY)[at + DAY : at + DAY + 10]
        errors[clip] = float(np.max(np.abs(tomorrow - expected)))
    assert errors[True] < 15.0
    assert errors[False] > 2 * errors[True]  # unclipped, the spike leaks into the profile


def test_periods_are_a_day_then_a_week_once_two_fit() -> None:
    model = MSTLModel(STEP)
    assert model.periods_for(daily(10 * DAY)) == [DAY]
    assert model.periods_for(daily(15 * DAY)) == [DAY, WEEK]


def test_a_clear_cycle_that_does_not_divide_the_day_is_detected() -> None:
    rng = np.random.default_rng(1)
    t = np.arange(10 * DAY)
    values = 50 + 20 * np.sin(2 * np.pi * t / 84) + rng.normal(0, 5, len(t))
    found = detect_period(values, longest=DAY - 1)
    assert found is not None and abs(found - 84) <= 2
    assert MSTLModel(STEP).periods_for(values) == sorted([found, DAY])


def test_noise_and_cycles_within_the_day_add_no_period() -> None:
    rng = np.random.default_rng(2)
    assert detect_period(rng.normal(0, 1, 10 * DAY), longest=DAY - 1) is None
    t = np.arange(10 * DAY)
    eight_hours = 50 + 20 * np.sin(2 * np.pi * t / 96) + rng.normal(0, 5, len(t))
    assert MSTLModel(STEP).periods_for(eight_hours) == [DAY]


def test_update_moves_the_level_like_a_refit_would() -> None:
    values = daily(6 * DAY)
    values[-DAY:] += 40  # the level shifts for the last day
    refit = MSTLModel(STEP).fit(grid_series(values)).predict(1).mean[0]
    model = MSTLModel(STEP).fit(grid_series(values[:-DAY // 2]))
    updated = model.update(grid_series(values)[-DAY // 2 :]).predict(1).mean[0]
    assert abs(updated - refit) < 15
