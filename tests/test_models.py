"""The model contract, for every registered model, plus reference checks for the baselines and
Holt-Winters, and fitting with a named fallback."""

from __future__ import annotations

import copy
import itertools
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from statsmodels.tsa.holtwinters import ExponentialSmoothing

from forecaster.errors import (
    ForecasterError,
    InsufficientHistoryError,
    InvalidInputError,
    NotFittedError,
)
from forecaster.fitting import fit_job
from forecaster.models import (
    MODEL_FACTORIES,
    Forecast,
    ForecastModel,
    fit_with_fallback,
    make_model,
)
from forecaster.models.ets import HoltWinters
from forecaster.refreshing import read_since_last
from forecaster.sources.replay import ReplaySource
from forecaster.spec import MIN_STEPS_IN_HISTORY, TriggerSpec
from forecaster.target import Target
from tests.support.models import fast_auto

STEP = pd.Timedelta("5min")
DAY_STEPS = 288
MODEL_NAMES = sorted(MODEL_FACTORIES)
QUANTILES = (0.1, 0.5, 0.9)


def grid_series(values: np.ndarray, start: str = "2024-03-04T00:00Z") -> pd.Series:
    index = pd.date_range(start, periods=len(values), freq=STEP, unit="ns", name="timestamp")
    return pd.Series(np.asarray(values, dtype=float), index=index, name="filled")


def seasonal(n: int, seed: int = 0) -> pd.Series:
    """A daily cycle with a slow trend and noise, like a request rate."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    values = 60 + 40 * np.sin(2 * np.pi * t / DAY_STEPS) + 0.005 * t + rng.normal(0, 4, n)
    return grid_series(np.maximum(values, 0.0))


def sparse(n: int, seed: int = 0) -> pd.Series:
    """Mostly zero with rare bursts: an unclipped lower quantile would be negative."""
    rng = np.random.default_rng(seed)
    values = np.where(rng.random(n) < 0.05, rng.uniform(20, 80, n), 0.0)
    return grid_series(values)


def enough(name: str) -> int:
    """History long enough for the model to fit properly: three days, or a day past its need."""
    return max(3 * DAY_STEPS, make_model(name, STEP).min_history() + DAY_STEPS)


@pytest.fixture(autouse=True)
def cheap_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """The contract tests fit every model many times: `auto` chooses among three cheap
    candidates here (the full selection is tested in test_selection and test_backtest)."""
    monkeypatch.setitem(MODEL_FACTORIES, "auto", fast_auto)


@pytest.fixture(params=MODEL_NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Fitted:
    """One fit per model and kind of history, shared by the tests that only read it (some
    models take seconds to fit); a test that changes it works on a deep copy."""

    series: pd.Series  # history plus 20 more steps
    history: pd.Series
    model: ForecastModel
    returned: ForecastModel


_FITTED: dict[tuple[str, str], Fitted] = {}
HISTORIES = {"seasonal": seasonal, "sparse": sparse}


def fitted(name: str, kind: str = "seasonal") -> Fitted:
    if (name, kind) not in _FITTED:
        series = HISTORIES[kind](enough(name) + 20)
        history = series.iloc[:-20]
        model = make_model(name, STEP)
        _FITTED[name, kind] = Fitted(series, history, model, model.fit(history))
    return _FITTED[name, kind]


# --- the contract -------------------------------------------------------------------------


def test_fit_returns_the_model_itself(name: str) -> None:
    fit = fitted(name)
    assert fit.returned is fit.model


def test_predict_and_update_before_fit_raise(name: str) -> None:
    model = make_model(name, STEP)
    with pytest.raises(NotFittedError) as caught:
        model.predict(1)
    assert caught.value.model == model.name
    with pytest.raises(NotFittedError):
        model.update(seasonal(2))


def test_too_little_history_raises(name: str) -> None:
    model = make_model(name, STEP)
    needed = model.min_history()
    with pytest.raises(InsufficientHistoryError) as caught:
        model.fit(seasonal(needed - 1))
    assert (caught.value.needed, caught.value.available) == (needed, needed - 1)


def test_missing_values_do_not_count_as_history(name: str) -> None:
    model = make_model(name, STEP)
    needed = model.min_history()
    values = seasonal(needed + 5).to_numpy(copy=True)
    values[:6] = np.nan  # now needed - 1 observed
    with pytest.raises(InsufficientHistoryError):
        model.fit(grid_series(values))


@pytest.mark.parametrize("kind", sorted(HISTORIES))
def test_predict_returns_the_one_forecast_shape(name: str, kind: str) -> None:
    fit = fitted(name, kind)
    last = fit.history.index[-1]
    for horizon in (1, 3, 14):
        forecast = fit.model.predict(horizon, quantiles=QUANTILES)
        assert isinstance(forecast, Forecast)
        assert forecast.model == name
        assert forecast.horizon == horizon
        assert forecast.mean.shape == (horizon,)
        assert sorted(forecast.quantiles) == list(QUANTILES)
        assert forecast.origin == last
        expected = [last + k * STEP for k in range(1, horizon + 1)]
        assert list(forecast.timestamps) == expected
        bands = [forecast.quantile(q) for q in QUANTILES]
        for band in [forecast.mean, *bands]:
            assert band.shape == (horizon,)
            assert np.isfinite(band).all()
            assert (band >= 0).all()
        for lower, upper in itertools.pairwise(bands):
            assert (lower <= upper).all()


def test_predict_rejects_bad_arguments(name: str) -> None:
    model = fitted(name).model
    with pytest.raises(InvalidInputError) as caught:
        model.predict(0)
    assert caught.value.field == "horizon"
    with pytest.raises(InvalidInputError) as caught:
        model.predict(2, quantiles=[1.5])
    assert caught.value.field == "quantiles"
    with pytest.raises(InvalidInputError) as caught:
        model.predict(2, quantiles=[0.9]).quantile(0.5)
    assert caught.value.field == "quantile"


def test_an_irregular_history_is_rejected(name: str) -> None:
    history = seasonal(enough(name))
    with pytest.raises(InvalidInputError) as caught:
        make_model(name, STEP).fit(history.drop(history.index[100]))
    assert caught.value.field == "history"


def test_update_must_continue_the_series(name: str) -> None:
    fit = fitted(name)
    series, model = fit.series, copy.deepcopy(fit.model)
    for skipped in (series.iloc[-19:], series.iloc[-25:]):  # a hole, an overlap
        with pytest.raises(InvalidInputError) as caught:
            model.update(skipped)
        assert caught.value.field == "observations"
    model.update(series.iloc[-20:-10]).update(series.iloc[-10:]).update(series.iloc[:0])
    forecast = model.predict(2, QUANTILES)
    assert forecast.origin == series.index[-1]
    assert forecast.timestamps[0] == series.index[-1] + STEP
    assert np.isfinite(forecast.quantile(0.9)).all()


def test_fits_are_deterministic_and_need_no_fallback(name: str) -> None:
    fit = fitted(name)
    again = fit_with_fallback(name, fit.history, STEP)
    assert not again.fell_back
    assert again.failures == ()
    first = fit.model.predict(6, QUANTILES)
    second = again.model.predict(6, QUANTILES)
    np.testing.assert_array_equal(first.mean, second.mean)
    for q in QUANTILES:
        np.testing.assert_array_equal(first.quantile(q), second.quantile(q))


def test_a_long_gap_in_history_is_fitted_or_refused_cleanly(name: str) -> None:
    values = seasonal(enough(name) + DAY_STEPS).to_numpy(copy=True)
    values[DAY_STEPS // 2 : DAY_STEPS] = np.nan
    model = make_model(name, STEP)
    try:
        model.fit(grid_series(values))
    except InsufficientHistoryError:
        return
    assert np.isfinite(model.predict(3, QUANTILES).quantile(0.9)).all()


# --- baselines: exact references ------------------------------------------------------------


@pytest.mark.parametrize("baseline", ["naive", "seasonal_naive"])
def test_update_then_predict_equals_a_fit_on_more_data(baseline: str) -> None:
    series = seasonal(3 * DAY_STEPS + 40, seed=5)
    split = 3 * DAY_STEPS
    updated = make_model(baseline, STEP).fit(series.iloc[:split])
    for k in range(split, len(series), 7):
        updated.update(series.iloc[k : min(k + 7, len(series))])
    refitted = make_model(baseline, STEP).fit(series)
    horizon = DAY_STEPS + 5  # past one season: the lag wraps
    np.testing.assert_array_equal(updated.predict(horizon).mean, refitted.predict(horizon).mean)
    # The bands come from the residuals of the last fit (update is O(1)), not asserted equal.


def test_seasonal_naive_repeats_yesterday_then_last_week() -> None:
    two_days = seasonal(2 * DAY_STEPS, seed=1)
    forecast = make_model("seasonal_naive", STEP).fit(two_days).predict(DAY_STEPS + 2)
    values = two_days.to_numpy()
    expected = np.r_[values[-DAY_STEPS:], values[-DAY_STEPS:][:2]]
    np.testing.assert_array_equal(forecast.mean, expected)

    two_weeks = seasonal(14 * DAY_STEPS, seed=1)
    forecast = make_model("seasonal_naive", STEP).fit(two_weeks).predict(3)
    np.testing.assert_array_equal(forecast.mean, two_weeks.to_numpy()[-7 * DAY_STEPS :][:3])


def test_seasonal_naive_uses_yesterday_where_last_week_is_missing() -> None:
    values = seasonal(14 * DAY_STEPS + 2, seed=2).to_numpy(copy=True)
    week = 7 * DAY_STEPS
    values[-week : -week + 2] = np.nan  # last week's values for steps 1 and 2 (still 2 weeks)
    forecast = make_model("seasonal_naive", STEP).fit(grid_series(values)).predict(3)
    np.testing.assert_array_equal(
        forecast.mean, [values[-DAY_STEPS], values[-DAY_STEPS + 1], values[-week + 2]]
    )


def test_naive_repeats_the_last_observation() -> None:
    values = seasonal(50).to_numpy(copy=True)
    values[-3:] = np.nan
    forecast = make_model("naive", STEP).fit(grid_series(values)).predict(4)
    np.testing.assert_array_equal(forecast.mean, [values[-4]] * 4)


# --- Holt-Winters against statsmodels --------------------------------------------------------

HW_CASES = [(False, False), (True, True), (True, False)]


def _statsmodels(values: np.ndarray, trend: bool, damped: bool, **kwargs: object) -> object:
    return ExponentialSmoothing(
        values,
        trend="add" if trend else None,
        damped_trend=trend and damped,
        seasonal="add",
        seasonal_periods=DAY_STEPS,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(("trend", "damped"), HW_CASES, ids=["level", "damped", "trend"])
def test_holt_winters_recursion_matches_statsmodels(trend: bool, damped: bool) -> None:
    series = seasonal(3 * DAY_STEPS + 30, seed=7)
    fitted, later = series.iloc[: 3 * DAY_STEPS], series.iloc[3 * DAY_STEPS :]
    model = HoltWinters(STEP, trend=trend, damped=damped).fit(fitted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _statsmodels(
            fitted.to_numpy(), trend, damped, initialization_method="heuristic"
        ).fit()  # type: ignore[attr-defined]
    assert model.alpha_ == reference.params["smoothing_level"]
    np.testing.assert_allclose(
        model.predict(DAY_STEPS + 3).mean, reference.forecast(DAY_STEPS + 3), rtol=1e-10
    )

    # update(): statsmodels run over the longer series from the same initial state and
    # parameters gives the state our O(1) recursion reached.
    model.update(later)
    p = reference.params
    known = {"initial_level": p["initial_level"], "initial_seasonal": p["initial_seasons"]}
    fixed = {"smoothing_level": p["smoothing_level"], "smoothing_seasonal": p["smoothing_seasonal"]}
    if trend:
        known["initial_trend"] = p["initial_trend"]
        fixed["smoothing_trend"] = p["smoothing_trend"]
    if trend and damped:
        fixed["damping_trend"] = p["damping_trend"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        longer = _statsmodels(
            series.to_numpy(), trend, damped, initialization_method="known", **known
        ).fit(optimized=False, **fixed)  # type: ignore[attr-defined]
    np.testing.assert_allclose(model.predict(12).mean, longer.forecast(12), rtol=1e-10)


# --- fitting with a fallback -----------------------------------------------------------------


def test_a_history_too_short_for_holt_winters_falls_back_to_seasonal_naive() -> None:
    history = seasonal(DAY_STEPS + 20)
    fit = fit_with_fallback("holt_winters", history, STEP)
    assert fit.fell_back
    assert (fit.requested, fit.model.name) == ("holt_winters", "seasonal_naive")
    assert [m for m, _ in fit.failures] == ["holt_winters"]
    assert "needs at least" in fit.failures[0][1]
    assert fit.model.predict(1).model == "seasonal_naive"


@pytest.mark.parametrize("requested", ["holt_winters", "seasonal_naive"])
def test_a_history_too_short_for_a_season_falls_back_to_naive(requested: str) -> None:
    fit = fit_with_fallback(requested, seasonal(30), STEP)
    assert fit.model.name == "naive"
    assert [m for m, _ in fit.failures] == (
        ["holt_winters", "seasonal_naive"] if requested == "holt_winters" else ["seasonal_naive"]
    )
    assert all(reason for _, reason in fit.failures)


def test_a_history_exactly_min_history_long_fits_that_model(name: str) -> None:
    needed = make_model(name, STEP).min_history()
    fit = fit_with_fallback(name, seasonal(needed), STEP)
    assert not fit.fell_back, fit.failures


# Off the step grid on purpose: a refresh happens at any second.
REPLAY_NOW = 1_717_171_717.25


def test_a_history_window_of_exactly_min_history_steps_fits_that_model(name: str) -> None:
    """Through the engine's own fetch (Target.read into its buffer, then the fit request a
    worker gets): a window of min_history steps must hold min_history observed bins."""
    source = ReplaySource.from_folder(
        Path(__file__).parent.parent / "data", clock=lambda: REPLAY_NOW
    )
    step_seconds = int(STEP.total_seconds())
    spec = TriggerSpec(server_address="http://replay.demo", query="aws_elb_request_count_8c0756",
                       target_value=10.0, model=name, step_seconds=step_seconds)
    horizon = 1 + Target("probe", spec, source).lead_steps
    needed = max(make_model(name, STEP, horizon=horizon).min_history(), MIN_STEPS_IN_HISTORY)
    target = Target("t", replace(spec, history_window_seconds=needed * step_seconds), source)
    points, _ = read_since_last(target, REPLAY_NOW)
    target.buffer.extend(points)
    request = target.fit_request()
    assert request.horizon == horizon
    assert int(np.isfinite(request.values).sum()) == needed
    fit = fit_job(request)
    assert not fit.fell_back, fit.failures


def test_no_model_fits_one_point() -> None:
    with pytest.raises(ForecasterError) as caught:
        fit_with_fallback("holt_winters", seasonal(1), STEP)
    for model in ("holt_winters", "seasonal_naive", "naive"):
        assert model in str(caught.value)


def test_an_unknown_model_is_named() -> None:
    with pytest.raises(InvalidInputError) as caught:
        fit_with_fallback("prophet", seasonal(100), STEP)
    assert caught.value.field == "model"
    assert "holt_winters" in caught.value.reason


def test_a_nan_gapped_history_fits_holt_winters_on_its_trailing_run() -> None:
    values = seasonal(4 * DAY_STEPS).to_numpy(copy=True)
    values[DAY_STEPS // 2 : DAY_STEPS] = np.nan  # 2.5 days follow the gap: enough
    fit = fit_with_fallback("holt_winters", grid_series(values), STEP)
    assert not fit.fell_back
    assert np.isfinite(fit.model.predict(3, QUANTILES).quantile(0.9)).all()


def test_a_gap_near_the_end_falls_back_with_the_reason() -> None:
    values = seasonal(4 * DAY_STEPS).to_numpy(copy=True)
    values[-DAY_STEPS // 2 : -DAY_STEPS // 4] = np.nan  # only 72 steps after the gap
    fit = fit_with_fallback("holt_winters", grid_series(values), STEP)
    assert fit.model.name == "seasonal_naive"
    assert "without a long gap" in fit.failures[0][1]
    forecast = fit.model.predict(DAY_STEPS, QUANTILES)
    assert np.isfinite(forecast.mean).all()
    assert np.isfinite(forecast.quantile(0.1)).all()
