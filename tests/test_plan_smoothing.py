"""The plan's moving average of quantile forecasts and its two-interval floor, against a
reference written from the definition, plus the cases a scaler meets: refits re-forecasting
an origin, gaps between origins, missing forecasts, and a spike against a sustained rise."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forecaster.errors import InvalidInputError
from forecaster.policy import (
    ForecastSmoother,
    planned_load,
    smoothing_weight,
    sustained_demand,
)

NAN = float("nan")
STEP = 300.0

loads = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)


def test_the_weight_halves_the_old_average_every_half_life() -> None:
    weight = smoothing_weight(STEP, 600)
    assert weight == pytest.approx(1 - 2 ** -0.5)
    # After two steps (one half-life) an old average keeps exactly half its weight.
    assert (1 - weight) ** 2 == pytest.approx(0.5)
    assert smoothing_weight(STEP, 0) == 1.0
    with pytest.raises(InvalidInputError, match="plan_half_life"):
        smoothing_weight(STEP, -1)


@given(st.lists(loads, min_size=1, max_size=40), st.floats(min_value=0.01, max_value=1.0))
def test_consecutive_origins_give_the_exponential_moving_average(
    forecasts: list[float], weight: float
) -> None:
    smoother = ForecastSmoother(weight, STEP)
    expected = forecasts[0]
    for k, forecast in enumerate(forecasts):
        if k:
            expected = (1 - weight) * expected + weight * forecast
        assert smoother.smooth(k * STEP, forecast) == pytest.approx(expected, rel=1e-9, abs=1e-6)


@given(st.lists(loads, min_size=2, max_size=20), st.floats(min_value=0.01, max_value=1.0), loads)
def test_a_refit_re_forecasting_an_origin_replaces_its_forecast(
    forecasts: list[float], weight: float, refitted: float
) -> None:
    once, twice = ForecastSmoother(weight, STEP), ForecastSmoother(weight, STEP)
    for k, forecast in enumerate(forecasts[:-1]):
        once.smooth(k * STEP, forecast)
        twice.smooth(k * STEP, forecast)
    last = (len(forecasts) - 1) * STEP
    twice.smooth(last, forecasts[-1])  # published, then a refit lands for the same origin
    assert twice.smooth(last, refitted) == pytest.approx(once.smooth(last, refitted))


def test_a_gap_between_origins_decays_the_average_by_the_steps_missed() -> None:
    weight = 0.5
    smoother = ForecastSmoother(weight, STEP)
    smoother.smooth(0, 100.0)
    # Three steps later: the old average keeps (1 - w)^3 = 1/8 of its weight.
    assert smoother.smooth(3 * STEP, 200.0) == pytest.approx(100.0 / 8 + 200.0 * 7 / 8)


def test_a_missing_forecast_keeps_the_average_and_an_older_origin_starts_over() -> None:
    smoother = ForecastSmoother(0.5, STEP)
    smoother.smooth(0, 100.0)
    assert smoother.smooth(STEP, NAN) == 100.0
    assert smoother.smooth(2 * STEP, 300.0) == pytest.approx(200.0)  # one step on from STEP
    assert smoother.smooth(0, 40.0) == 40.0  # time went back (a new series): no memory


def test_no_half_life_plans_each_forecast_as_it_is() -> None:
    smoother = ForecastSmoother(smoothing_weight(STEP, 0), STEP)
    assert [smoother.smooth(k * STEP, v) for k, v in enumerate([5.0, 50.0, 7.0])] == [5, 50, 7]


@pytest.mark.parametrize("weight", [0.0, -0.1, 1.5, NAN])
def test_a_weight_outside_the_unit_interval_is_refused(weight: float) -> None:
    with pytest.raises(InvalidInputError, match="plan_half_life"):
        ForecastSmoother(weight, STEP)


@given(loads, loads)
def test_the_floor_is_the_demand_held_over_both_readings(current: float, previous: float) -> None:
    floor = sustained_demand(current, previous)
    assert floor == min(current, previous)
    assert sustained_demand(current, NAN) == current
    assert sustained_demand(NAN, previous) == previous
    assert math.isnan(sustained_demand(NAN, NAN))


def test_a_one_interval_spike_does_not_raise_the_plan_but_a_sustained_rise_does() -> None:
    smoother = ForecastSmoother(smoothing_weight(STEP, 600), STEP)
    demand = [100.0, 100.0, 900.0, 100.0, 400.0, 400.0]
    forecasts = [110.0, 110.0, 110.0, 110.0, 110.0, 110.0]  # a model that saw nothing coming
    plans = []
    for k, forecast in enumerate(forecasts):
        floor = sustained_demand(demand[k], demand[k - 1] if k else NAN)
        plans.append(planned_load(smoother.smooth(k * STEP, forecast), floor, reactive_floor=True))
    assert plans[2] == pytest.approx(110.0)  # the spike alone: the forecast is kept
    assert plans[3] == pytest.approx(110.0)  # it has passed
    assert plans[4] == pytest.approx(110.0)  # one interval of a rise: not yet sustained
    assert plans[5] == pytest.approx(400.0)  # two intervals: the floor follows it
