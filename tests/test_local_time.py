"""Models on the target's wall clock: local-time traffic keeps its shape across daylight-saving
changes, forecasts stay on the UTC grid, and nothing after a cut changes what came before."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from forecaster.backtest import BacktestConfig, run_backtest
from forecaster.errors import InsufficientHistoryError, InvalidInputError
from forecaster.models import make_model
from forecaster.models.local_time import LocalTime, in_time_zone
from forecaster.models.naive import SeasonalNaive
from forecaster.series import to_grid

STEP = pd.Timedelta("5min")
PARIS = "Europe/Paris"


def office_hours(start: str, end: str, zone: str = PARIS) -> pd.Series:
    """100 from 09:00 to 18:00 local time, 10 otherwise, on a UTC 5-minute grid."""
    index = pd.date_range(start, end, freq=STEP, inclusive="left", unit="ns")
    local = index.tz_convert(zone)
    hour = local.hour + local.minute / 60
    return pd.Series(np.where((hour >= 9) & (hour < 18), 100.0, 10.0), index=index)


def rolling_errors(model_name: str, series: pd.Series, first: pd.Timestamp, zone: str,
                   steps: int) -> np.ndarray:
    """Two-step-ahead absolute errors, refitting never: fit before `first`, then update."""
    model = make_model(model_name, STEP, time_zone=zone)
    cut = series.index.get_loc(first)
    model.fit(series.iloc[:cut])
    errors = []
    for i in range(cut, cut + steps):
        forecast = model.predict(2)
        assert forecast.timestamps[1] == series.index[i + 1]  # UTC intervals, as asked
        errors.append(abs(forecast.mean[1] - series.iloc[i + 1]))
        model.update(series.iloc[i : i + 1])
    return np.array(errors)


@pytest.mark.parametrize("model_name", ["seasonal_naive", "holt_winters"])
@pytest.mark.parametrize(
    ("start", "end", "first"),
    [
        # spring forward on 2026-03-29: fit the morning after, or the day before and update
        ("2026-03-15T00:00Z", "2026-04-05T00:00Z", "2026-03-30T06:00Z"),
        ("2026-03-10T00:00Z", "2026-04-05T00:00Z", "2026-03-28T12:00Z"),
        # fall back on 2026-10-25: fit the day before, update through the change
        ("2026-10-05T00:00Z", "2026-11-05T00:00Z", "2026-10-24T12:00Z"),
    ],
)
def test_local_time_traffic_is_forecast_on_its_wall_clock_across_a_change(
    model_name: str, start: str, end: str, first: str
) -> None:
    series = office_hours(start, end)
    days = 3 * 288
    local = rolling_errors(model_name, series, pd.Timestamp(first), PARIS, days)
    utc = rolling_errors(model_name, series, pd.Timestamp(first), "UTC", days)
    assert local.mean() < 0.1, "on its wall clock the pattern repeats exactly"
    assert utc.mean() > 1.0, "on UTC the pattern moves by an hour at the change"


def test_utc_needs_no_wrapper_and_other_zones_get_one() -> None:
    plain = SeasonalNaive(STEP)
    assert in_time_zone(plain, "UTC") is plain
    wrapped = make_model("seasonal_naive", STEP, time_zone=PARIS)
    assert isinstance(wrapped, LocalTime) and wrapped.name == "seasonal_naive"


def test_no_observed_history_is_insufficient_so_the_fallback_applies() -> None:
    series = office_hours("2026-03-01T00:00Z", "2026-03-02T00:00Z") * np.nan
    with pytest.raises(InsufficientHistoryError):
        make_model("seasonal_naive", STEP, time_zone=PARIS).fit(series)


def test_updates_must_continue_the_utc_grid() -> None:
    series = office_hours("2026-03-01T00:00Z", "2026-03-10T00:00Z")
    model = make_model("seasonal_naive", STEP, time_zone=PARIS).fit(series.iloc[:-10])
    with pytest.raises(InvalidInputError) as caught:
        model.update(series.iloc[-5:])
    assert caught.value.field == "observations"


@pytest.mark.parametrize("model_name", ["seasonal_naive", "holt_winters"])
def test_no_look_ahead_through_the_wall_clock(model_name: str) -> None:
    series = office_hours("2026-10-05T00:00Z", "2026-10-28T00:00Z")
    noise = np.random.default_rng(7).normal(0, 3, len(series))
    series = (series + noise).clip(lower=0)
    config = BacktestConfig(
        target=10.0, model=model_name, time_zone=PARIS, refit=pd.Timedelta("3h"),
        eval_start=pd.Timestamp("2026-10-24T18:00Z"),
    )
    cut_at = pd.Timestamp("2026-10-25T03:25Z")  # just after the change, off the refit schedule
    full = run_backtest(to_grid(series, STEP), config).simulation
    cut = run_backtest(to_grid(series[series.index < cut_at + STEP], STEP), config).simulation
    columns = ["timestamp", "forecast", "replicas"]
    before = full.decisions[full.decisions["timestamp"] <= cut_at][columns].reset_index(drop=True)
    pd.testing.assert_frame_equal(before, cut.decisions[columns].reset_index(drop=True),
                                  check_exact=True)
