"""The newer models (transform, gradient boosting, ensemble) and conformal calibration.

The shared contract (shapes, errors, determinism, gaps) runs for every registered model in
tests/test_models.py; these tests check what each of these adds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from forecaster.models import make_model
from forecaster.models.base import ForecastModel
from forecaster.models.calibration import Calibrated
from forecaster.models.ensemble import Ensemble
from forecaster.models.ets import HoltWinters
from forecaster.models.gbm import GradientBoosting
from forecaster.models.naive import Naive
from forecaster.models.transform import Transformed

STEP = pd.Timedelta("5min")
DAY = 288


def grid_series(values: np.ndarray, start: str = "2024-03-04T00:00Z") -> pd.Series:
    index = pd.date_range(start, periods=len(values), freq=STEP, unit="ns", name="timestamp")
    return pd.Series(np.asarray(values, dtype=float), index=index)


def daily_cycle(n: int, noise: float = 3.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return np.maximum(100 + 60 * np.sin(2 * np.pi * t / DAY) + rng.normal(0, noise, n), 0.0)


class ClaimsFixedSpread(ForecastModel):
    """Forecasts the level it is told, claiming whatever spread it is set to claim."""

    name = "claims_fixed_spread"

    def __init__(self, step: pd.Timedelta, level: float, claimed: float, seed: int = 1) -> None:
        super().__init__(step)
        self.level, self.claimed, self.seed = level, claimed, seed

    def min_history(self) -> int:
        return 2

    def _fit(self, values: np.ndarray) -> None:
        self.errors_ = np.random.default_rng(self.seed).normal(0, self.claimed, 500)

    def _update(self, values: np.ndarray) -> None:
        pass

    def _predict(self, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full(horizon, self.level), np.tile(self.errors_, (horizon, 1))


class KnownMean(ClaimsFixedSpread):
    """Forecasts the true mean of white noise but claims a quarter of its spread."""

    name = "known_mean"

    def __init__(self, step: pd.Timedelta, level: float, sigma: float) -> None:
        super().__init__(step, level, sigma / 4, seed=0)


def coverage(model: ForecastModel, future: pd.Series) -> float:
    inside = []
    for k in range(len(future)):
        forecast = model.predict(1, [0.1, 0.9])
        y = future.iloc[k]
        inside.append(forecast.quantile(0.1)[0] <= y <= forecast.quantile(0.9)[0])
        model.update(future.iloc[k : k + 1])
    return float(np.mean(inside))


def test_calibration_brings_a_too_narrow_interval_to_its_nominal_coverage() -> None:
    rng = np.random.default_rng(4)
    series = grid_series(200 + rng.normal(0, 10, 3 * DAY))
    fit, future = series.iloc[: 2 * DAY], series.iloc[2 * DAY :]
    raw = KnownMean(STEP, 200, 10).fit(fit)
    calibrated = Calibrated(STEP, KnownMean(STEP, 200, 10), horizon=2).fit(fit)
    raw_coverage, calibrated_coverage = coverage(raw, future), coverage(calibrated, future)
    assert raw_coverage < 0.4  # the claimed spread is a quarter of the real one
    assert 0.72 <= calibrated_coverage <= 0.88


def test_calibration_holds_when_the_models_claimed_spread_changes() -> None:
    # Scored while the model claimed a spread 50 times the real one, then used after a refit
    # that claims the real one: the interval must still come from what actually happened.
    rng = np.random.default_rng(5)
    series = grid_series(200 + rng.normal(0, 10, 4 * DAY))
    fit, future = series.iloc[: 3 * DAY], series.iloc[3 * DAY :]
    before = Calibrated(STEP, ClaimsFixedSpread(STEP, 200, 500), horizon=2).fit(fit)
    after = Calibrated(STEP, ClaimsFixedSpread(STEP, 200, 10), horizon=2)
    after.warm_start(before)
    after.fit(fit)
    assert 0.72 <= coverage(after, future) <= 0.88


def test_calibration_scales_with_the_square_root_of_the_level() -> None:
    # Poisson counts scored at a level of 100, then forecast at 400: the interval doubles.
    rng = np.random.default_rng(6)
    low = grid_series(rng.poisson(100, 3 * DAY).astype(float))
    model = Calibrated(STEP, ClaimsFixedSpread(STEP, 100, 1), horizon=2).fit(low)
    forecast = model.predict(1, [0.1, 0.9])
    width_low = forecast.quantile(0.9)[0] - forecast.quantile(0.1)[0]
    model.model.level = 400.0  # the same model now forecasting a level four times higher
    forecast = model.predict(1, [0.1, 0.9])
    width_high = forecast.quantile(0.9)[0] - forecast.quantile(0.1)[0]
    assert width_high / width_low == pytest.approx(2.0, rel=1e-6)
    high = grid_series(rng.poisson(400, DAY).astype(float), start="2024-03-07T00:00Z")
    assert 0.72 <= coverage(model, high) <= 0.88


def test_calibration_scores_only_forecasts_whose_target_has_arrived() -> None:
    series = grid_series(daily_cycle(3 * DAY))
    model = Calibrated(STEP, Naive(STEP), horizon=3, validation=pd.Timedelta(0)).fit(series)
    assert [len(s) for s in model.tracker_.scores] == [0, 0, 0]
    model.update(grid_series(daily_cycle(2), start="2024-03-07T00:00Z"))
    # two new values: one 1-step and one 2-step... forecast each could be scored by now
    assert [len(s) for s in model.tracker_.scores] == [2, 1, 0]


@pytest.mark.parametrize("kind", ["sqrt", "log"])
def test_a_transform_maps_quantiles_exactly(kind: str) -> None:
    history = grid_series(daily_cycle(4 * DAY))
    inner = HoltWinters(STEP).fit(history)
    outer = Transformed(STEP, HoltWinters(STEP), kind).fit(history)  # type: ignore[arg-type]
    y = history.to_numpy()
    z = np.sqrt(y) if kind == "sqrt" else np.log(y + outer.offset_)
    reference = HoltWinters(STEP).fit(grid_series(z))
    q90 = reference.predict(3, [0.9]).quantile(0.9)
    expected = q90**2 if kind == "sqrt" else np.exp(q90) - outer.offset_
    # exact up to np.quantile interpolating between two samples on either scale
    np.testing.assert_allclose(outer.predict(3, [0.9]).quantile(0.9), expected, rtol=1e-6)
    assert inner.name == "holt_winters" and outer.name == f"holt_winters_{kind}"


def test_gbm_learns_a_daily_cycle() -> None:
    series = grid_series(daily_cycle(8 * DAY, noise=2.0))
    fit, future = series.iloc[: 7 * DAY], series.iloc[7 * DAY : 7 * DAY + 2]
    forecast = GradientBoosting(STEP, horizon=2).fit(fit).predict(2, [0.5])
    np.testing.assert_allclose(forecast.mean, future.to_numpy(), atol=10.0)


def test_gbm_features_never_look_past_the_origin() -> None:
    model = GradientBoosting(STEP, horizon=2)
    z = np.arange(3 * DAY, dtype=float)
    origins = np.arange(DAY, 3 * DAY - 2)
    time0 = pd.Timestamp("2024-03-04T00:00Z")
    features = model.features(z, origins, 2, time0)[:, :-2]  # drop the calendar
    # every lag feature is a value (or a summary of values) at or before the origin
    assert (np.nan_to_num(features, nan=0.0) <= origins[:, None] + 1e-9).all()


def test_gbm_with_a_quantile_puts_that_quantile_above_the_mean() -> None:
    series = grid_series(daily_cycle(8 * DAY, noise=8.0))
    forecast = GradientBoosting(STEP, horizon=2, quantile=0.9).fit(series).predict(2, [0.5, 0.9])
    assert (forecast.quantile(0.9) > forecast.mean).all()


def test_an_ensemble_averages_its_members() -> None:
    series = grid_series(daily_cycle(4 * DAY))
    ensemble = Ensemble(STEP, [HoltWinters(STEP), Naive(STEP)]).fit(series)
    alone = [HoltWinters(STEP).fit(series), Naive(STEP).fit(series)]
    means = [model.predict(3).mean for model in alone]
    np.testing.assert_allclose(ensemble.predict(3).mean, np.mean(means, axis=0))


def test_an_ensemble_leaves_out_a_member_that_cannot_fit() -> None:
    series = grid_series(daily_cycle(100))  # too short for a daily season
    ensemble = Ensemble(STEP, [HoltWinters(STEP), Naive(STEP)]).fit(series)
    assert [m.name for m in ensemble.fitted_] == ["naive"]
    np.testing.assert_allclose(ensemble.predict(2).mean, Naive(STEP).fit(series).predict(2).mean)


def test_registered_zoo_models_are_deterministic_on_a_trace_with_spikes() -> None:
    values = daily_cycle(5 * DAY, seed=9)
    values[::97] *= 6  # spikes
    series = grid_series(values)
    for name in ("gbm", "gbm_quantile", "ensemble", "holt_winters_sqrt"):
        a = make_model(name, STEP).fit(series).predict(4, [0.9])
        b = make_model(name, STEP).fit(series).predict(4, [0.9])
        np.testing.assert_array_equal(a.quantile(0.9), b.quantile(0.9))


@pytest.mark.parametrize("start", ["2026-03-28T22:55Z", "1969-12-29T23:50Z", "2014-04-20T00:40Z"])
def test_gbm_calendar_in_utc_is_what_the_time_zone_path_gives(start: str) -> None:
    """The UTC fast path (epoch arithmetic) and pandas' time-zone path agree exactly."""
    step = pd.Timedelta("5min")
    fast = GradientBoosting(step, tz="UTC")
    zoned = GradientBoosting(step, tz="Etc/UTC")
    steps = np.arange(0, 3 * 2016, 7)
    time0 = pd.Timestamp(start)
    for a, b in zip(fast.calendar(time0, steps), zoned.calendar(time0, steps), strict=True):
        np.testing.assert_array_equal(a.astype(float), b.astype(float))


def test_an_ensemble_weighs_its_members_means_and_quantiles() -> None:
    history = grid_series(np.full(DAY, 100.0))
    members = [ClaimsFixedSpread(STEP, 100, 10), KnownMean(STEP, 200, 40)]
    weights = {"claims_fixed_spread": 0.75, "known_mean": 0.25}
    ensemble = Ensemble(STEP, members, weights=weights).fit(history)
    forecast = ensemble.predict(2, [0.1, 0.9])
    np.testing.assert_allclose(forecast.mean, 0.75 * 100 + 0.25 * 200)
    # Vincentization: each quantile is the weighted average of the members' quantiles.
    for q in (0.1, 0.9):
        parts = [m.fit(history).predict(2, [q]).quantile(q) for m in members]
        np.testing.assert_allclose(forecast.quantile(q), 0.75 * parts[0] + 0.25 * parts[1],
                                   rtol=1e-3)
    equal = Ensemble(STEP, [ClaimsFixedSpread(STEP, 100, 10), KnownMean(STEP, 200, 40)])
    np.testing.assert_allclose(equal.fit(history).predict(1).mean, 150.0)
