"""`auto`: selection by rolling-origin validation on the history before the fit time only,
its schedule (warm start), and the pinball loss it scores by."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from forecaster.errors import InvalidInputError
from forecaster.models import RunCost, ValidationRun, fit_with_fallback, make_model
from forecaster.models.base import ForecastModel
from forecaster.models.calibration import (
    MIN_SCORES,
    ScoreTracker,
    calibrated_path,
    scale_floor,
)
from forecaster.models.ensemble import Ensemble
from forecaster.models.selection import Auto, pinball_loss, plan_cost
from tests.support.models import FAST_CANDIDATES, fast_auto

STEP = pd.Timedelta("5min")
DAY = 288
FAST = ("naive", "seasonal_naive", "holt_winters")


def grid_series(values: np.ndarray, start: str = "2024-03-04T00:00Z") -> pd.Series:
    index = pd.date_range(start, periods=len(values), freq=STEP, unit="ns", name="timestamp")
    return pd.Series(np.asarray(values, dtype=float), index=index)


def daily_cycle(n: int, noise: float = 1.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 100 + 60 * np.sin(2 * np.pi * t / DAY) + rng.normal(0, noise, n)


def random_walk(n: int, start: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.maximum(start + np.cumsum(rng.normal(0, 15, n)), 0.0)


def test_pinball_loss_matches_its_definition() -> None:
    actual = np.array([10.0, 20.0, 30.0])
    predicted = np.array([12.0, 15.0, 30.0])
    # under-forecast by 5 costs q * 5; over-forecast by 2 costs (1 - q) * 2
    assert pinball_loss(actual, predicted, 0.9) == pytest.approx((0.1 * 2 + 0.9 * 5) / 3)


def test_a_clear_daily_cycle_selects_a_seasonal_model() -> None:
    model = Auto(STEP, candidates=FAST).fit(grid_series(daily_cycle(5 * DAY)))
    assert model.selection_.chosen in {"holt_winters", "seasonal_naive"}
    scores = {s.name: s.plan_cost for s in model.selection_.scores}
    assert scores["naive"] is not None
    assert scores[model.selection_.chosen] < scores["naive"]


def test_selection_ignores_everything_after_the_fit_time() -> None:
    """Two traces share the history before tau and differ after it; the second turns into a
    random walk, where the last value is the best forecast. Fitted at tau, both choose the
    same (seasonal) model with the same scores: nothing after tau can reach the choice."""
    tau = 5 * DAY
    past = daily_cycle(tau)
    same_future = daily_cycle(tau + 2 * DAY)
    other_future = np.r_[past, random_walk(2 * DAY, start=past[-1])]
    chosen = []
    for trace in (same_future, other_future):
        full = grid_series(trace)
        selection = Auto(STEP, candidates=FAST).fit(full.iloc[:tau]).selection_
        chosen.append((selection.chosen, [(s.name, s.pinball, s.mae) for s in selection.scores]))
    assert chosen[0] == chosen[1]  # identical choice and scores (only fit times may differ)
    assert chosen[0][0] != "naive"
    # Fitted after the change, on the random walk, naive beats the season (and holt_winters,
    # whose level then follows the walk, may tie with it): the test can tell.
    walk = grid_series(other_future)
    late = Auto(STEP, candidates=FAST, validation=pd.Timedelta(days=1)).fit(walk)
    pinball = {s.name: s.pinball for s in late.selection_.scores}
    assert late.selection_.chosen in {"naive", "holt_winters"}
    assert pinball["naive"] < pinball["seasonal_naive"]


@pytest.mark.parametrize("calibrate", [True, False])
def test_calibration_scores_survive_a_refit_and_are_kept_only_to_calibrate(
    calibrate: bool,
) -> None:
    series = grid_series(daily_cycle(6 * DAY, seed=2))
    first = Auto(STEP, candidates=FAST, calibrate=calibrate).fit(series.iloc[: 5 * DAY])
    first.update(series.iloc[5 * DAY : 5 * DAY + 12])
    second = Auto(STEP, candidates=FAST, calibrate=calibrate)
    second.warm_start(first)
    second.fit(series.iloc[: 5 * DAY + 12])
    assert second.selection_ is first.selection_
    assert second.selection_.calibrated is calibrate
    if calibrate:  # the scores gathered by update() carried over
        assert len(second.tracker_.scores[0]) >= len(first.tracker_.scores[0]) > 12
    else:  # a model serving its own interval never reads them
        assert first.tracker_.scores == second.tracker_.scores == []
    second.update(series.iloc[5 * DAY + 12 : 5 * DAY + 24])
    assert np.isfinite(second.predict(2, [0.1, 0.9]).quantile(0.9)).all()


def test_a_refit_within_the_reselect_interval_keeps_the_choice() -> None:
    series = grid_series(daily_cycle(6 * DAY, seed=2))
    first = Auto(STEP, candidates=FAST).fit(series.iloc[: 5 * DAY])
    first.update(series.iloc[5 * DAY : 5 * DAY + 12])
    fit = fit_with_fallback(
        "auto", series.iloc[: 5 * DAY + 12], STEP, quantile=0.9, horizon=2, previous=first
    )
    second = fit.model
    assert isinstance(second, Auto)
    assert second.selection_ is first.selection_  # not re-run
    later = Auto(STEP, candidates=FAST)
    later.warm_start(second)
    later.fit(series)  # a day after the selection: selects again
    assert later.selection_.selected_at == series.index[-1]


def test_the_forecast_names_auto_and_notes_the_chosen_model() -> None:
    model = Auto(STEP, candidates=FAST).fit(grid_series(daily_cycle(4 * DAY)))
    forecast = model.predict(3, [0.1, 0.9])
    assert forecast.model == "auto"
    assert f"chosen={model.selection_.chosen}" in forecast.notes
    assert (forecast.quantile(0.1) <= forecast.quantile(0.9)).all()


def test_auto_names_the_model_it_chose_for_operators() -> None:
    model = Auto(STEP, candidates=FAST).fit(grid_series(daily_cycle(4 * DAY)))
    assert model.chosen_name == model.selection_.chosen == model.model_.name
    assert model.chosen_name in FAST and model.name == "auto"
    assert Auto(STEP, candidates=FAST).chosen_name == "auto"  # nothing chosen before a fit


def test_short_history_skips_validation_and_falls_back_by_preference() -> None:
    model = Auto(STEP, candidates=FAST).fit(grid_series(daily_cycle(40)))
    assert model.selection_.scores == ()
    assert model.model_.name == "naive"  # holt_winters and seasonal_naive need a season
    assert np.isfinite(model.predict(2, [0.9]).quantile(0.9)).all()


def test_make_model_passes_the_planning_quantile_and_horizon() -> None:
    model = make_model("auto", STEP, quantile=0.95, horizon=4)
    assert isinstance(model, Auto)
    assert (model.quantile, model.horizon) == (0.95, 4)
    # simple models accept and ignore them
    assert make_model("naive", STEP, quantile=0.95, horizon=4).name == "naive"


@pytest.mark.parametrize(
    "kwargs",
    [{"quantile": 1.0}, {"horizon": 0}, {"candidates": ()}, {"candidates": ("auto",)}],
)
def test_bad_parameters_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError):
        Auto(STEP, **kwargs)  # type: ignore[arg-type]


def test_plan_cost_is_scale_free_and_one_for_a_perfect_plan() -> None:
    rng = np.random.default_rng(3)
    actual = rng.uniform(50, 150, 500)
    assert plan_cost(actual, actual) == pytest.approx(1.0)
    assert plan_cost(actual, 3.0 * actual) == pytest.approx(1.0)  # a multiple is rescaled
    flat = np.full_like(actual, actual.mean())
    # a flat plan must be raised to the 95th percentile of the demand
    expected = np.quantile(actual / flat, 0.95) * flat.sum() / actual.sum()
    assert plan_cost(actual, flat) == pytest.approx(expected)
    assert plan_cost(actual, flat) > 1.0
    assert plan_cost(np.array([np.nan]), np.array([1.0])) == float("inf")


def test_the_default_is_kept_unless_another_candidate_wins_by_the_margin() -> None:
    series = grid_series(daily_cycle(5 * DAY))
    free = Auto(STEP, candidates=FAST, default=None).fit(series).selection_
    costs = {s.name: s.plan_cost for s in free.scores}
    assert free.chosen == min(costs, key=lambda n: costs[n] or np.inf)
    loser = max(costs, key=lambda n: costs[n] or 0.0)
    # naive loses to the seasonal models on a clean cycle by far more than 10%
    kept = Auto(STEP, candidates=FAST, default=loser, margin=0.0).fit(series).selection_
    assert kept.chosen == free.chosen
    sticky = Auto(STEP, candidates=FAST, default=loser, margin=0.99).fit(series).selection_
    assert sticky.chosen == loser


def test_an_interval_is_calibrated_only_when_its_own_coverage_is_off() -> None:
    series = grid_series(daily_cycle(5 * DAY))
    auto = Auto(STEP, candidates=FAST).fit(series)
    chosen = next(s for s in auto.selection_.scores if s.name == auto.selection_.chosen)
    assert chosen.coverage_80 is not None
    assert auto.selection_.calibrated == (abs(chosen.coverage_80 - 0.8) > 0.05)
    assert Auto(STEP, candidates=FAST, calibrate=True).fit(series).selection_.calibrated
    assert not Auto(STEP, candidates=FAST, calibrate=False).fit(series).selection_.calibrated


def test_the_fast_auto_is_a_model_factory_with_cheap_candidates() -> None:
    model = fast_auto(STEP, quantile=0.95, horizon=3)
    assert (model.quantile, model.horizon, model.candidates) == (0.95, 3, FAST_CANDIDATES)
    assert model.validation == pd.Timedelta(days=1)
    fitted = model.fit(grid_series(daily_cycle(4 * DAY)))
    assert fitted.predict(3, [0.1, 0.95]).quantile(0.95).shape == (3,)


def test_an_ensemble_is_validated_from_its_members_runs() -> None:
    """Composed from the members' runs, each weighted by the inverse of its validation MAE,
    the ensemble scores as if that weighted ensemble had been run itself."""
    series = grid_series(daily_cycle(5 * DAY))
    members = ("holt_winters", "holt_winters_sqrt", "gbm")
    composed = Auto(STEP, candidates=(*members, "ensemble")).fit(series).selection_
    weights = composed.weights_for("ensemble")
    inverse = {s.name: 1 / s.mae for s in composed.scores if s.name in members and s.mae}
    assert list(weights) == list(members)
    for name in members:
        assert weights[name] == pytest.approx(inverse[name] / sum(inverse.values()), rel=1e-9)
    assert composed.as_dict()["ensemble_weights"] == {"ensemble": weights}

    def weighted(name: str) -> ForecastModel:
        model = make_model(name, STEP, quantile=0.9, horizon=2)  # Auto's defaults
        assert isinstance(model, Ensemble)
        model.weights = weights
        return model

    alone = Auto(STEP, candidates=("ensemble",), make=weighted).fit(series).selection_
    got = next(s for s in composed.scores if s.name == "ensemble")
    want = next(s for s in alone.scores if s.name == "ensemble")
    assert [s.name for s in composed.scores] == [*members, "ensemble"]
    assert got.plan_cost == pytest.approx(want.plan_cost, rel=1e-9)
    assert got.mae == pytest.approx(want.mae, rel=1e-9)


def test_the_chosen_ensemble_keeps_its_weights_through_refits() -> None:
    series = grid_series(daily_cycle(5 * DAY))
    candidates = ("holt_winters", "holt_winters_sqrt", "gbm", "ensemble")
    first = Auto(STEP, candidates=candidates, margin=1.0)  # the ensemble is always kept
    first.fit(series.iloc[:-12])
    assert first.selection_.chosen == "ensemble"
    weights = first.selection_.weights_for("ensemble")
    assert set(weights) == set(candidates[:3]) and sum(weights.values()) == pytest.approx(1)
    assert len(set(weights.values())) == 3  # not equal: the members err differently
    assert isinstance(first.model_, Ensemble) and first.model_.weights == weights
    refit = Auto(STEP, candidates=candidates, margin=1.0)
    refit.warm_start(first)
    refit.fit(series)  # within the reselection interval: the selection is reused
    assert refit.selection_ is first.selection_
    assert isinstance(refit.model_, Ensemble) and refit.model_.weights == weights


class RecordingScorer:
    """A PlanScorer that keeps every run it is given and prices each by `prices[model]`,
    times `calibrated[model]` (default 1) for the calibrated band."""

    def __init__(self, prices: dict[str, float], calibrated: dict[str, float] | None = None):
        self.prices = prices
        self.calibrated = calibrated or {}
        self.runs: list[ValidationRun] = []

    def __call__(self, run: ValidationRun) -> RunCost:
        self.runs.append(run)
        factor = self.calibrated.get(run.model, 1.0) if run.calibrated else 1.0
        return RunCost(self.prices[run.model] * factor, 0.05)


def test_a_scorer_chooses_the_model_and_the_band_that_is_served() -> None:
    """The scorer ranks the candidates, each priced with the band its coverage calls for
    (its own, or the calibrated one); the default and the cheapest are priced with the other
    band too and take it when it is cheaper by the margin (switching has a cost)."""
    series = grid_series(daily_cycle(5 * DAY))
    scorer = RecordingScorer(
        {"naive": 1.0, "seasonal_naive": 3.0, "holt_winters": 2.0},
        calibrated={"naive": 0.5, "seasonal_naive": 1.5, "holt_winters": 0.95},
    )
    auto = Auto(STEP, candidates=FAST, default="holt_winters", margin=0.1, scorer=scorer)
    selection = auto.fit(series).selection_
    assert selection.chosen == "naive"  # the scorer's choice, not the plan_cost's
    assert selection.scored_by == "scorer"
    assert selection.calibrated  # its calibrated band was priced at half its own
    scores = {s.name: s for s in selection.scores}
    assert (scores["naive"].cost, scores["naive"].calibrated) == (0.5, True)
    for name, price, factor in (("seasonal_naive", 3.0, 1.5), ("holt_winters", 2.0, 0.95)):
        score = scores[name]  # the coverage rule's band: the other is not 10% cheaper
        off = abs((score.coverage_80 or 0.0) - 0.8) > auto.coverage_tolerance
        assert score.calibrated == off and score.cost == (price * factor if off else price)
    shown = selection.as_dict()["scores"]
    assert isinstance(shown, dict) and shown["naive"]["cost"] == 0.5
    assert all(s.plan_cost is not None and s.mae is not None for s in selection.scores)
    # The cheapest and the default were priced both ways, the other once.
    priced = sorted((r.model, r.calibrated) for r in scorer.runs)
    rule = scores["seasonal_naive"].calibrated
    assert priced == sorted(
        [("naive", False), ("naive", True), ("holt_winters", False), ("holt_winters", True),
         ("seasonal_naive", rule)]
    )
    assert plan_cost_chosen(series) != "naive"  # without the scorer another one wins


@pytest.mark.parametrize("horizon", [2, 3])
def test_each_run_is_what_the_model_serves_taking_one_value_at_a_time(horizon: int) -> None:
    """A candidate's run (computed in one batch where the model allows it) holds at every
    origin the mean and band that predict gives when the model, fitted on the history before
    the window, takes the window's values one at a time: a gap in the window included."""
    values = daily_cycle(5 * DAY, noise=6.0, seed=3)
    values[-300:-280] = np.nan
    series = grid_series(values)
    candidates = (
        "naive", "seasonal_naive", "holt_winters", "holt_winters_sqrt", "holt_winters_damped",
    )
    scorer = RecordingScorer(dict.fromkeys(candidates, 1.0))
    auto = Auto(STEP, candidates=candidates, horizon=horizon, calibrate=False, scorer=scorer)
    held = auto.fit(series).selection_.validation_steps
    assert sorted(run.model for run in scorer.runs) == sorted(candidates)
    for run in scorer.runs:
        model = make_model(run.model, STEP, horizon=horizon).fit(series.iloc[:-held])
        means, bands = [], []
        for k in range(len(series) - held, len(series)):
            forecast = model.predict(horizon, [auto.quantile])
            means.append(forecast.mean)
            bands.append(forecast.quantile(auto.quantile))
            model.update(series.iloc[k : k + 1])
        np.testing.assert_array_equal(run.mean, np.array(means), err_msg=run.model)
        np.testing.assert_array_equal(run.band, np.array(bands), err_msg=run.model)


def plan_cost_chosen(series: pd.Series) -> str:
    return Auto(STEP, candidates=FAST, default=None).fit(series).selection_.chosen


def test_the_scorer_sees_each_run_as_the_plan_takes_it() -> None:
    """Origin k of the run has seen everything before held[k]: its forecast is dated at the
    value before held[k], its current demand is that value, and its band is the model's
    own quantile (or the calibrated one), never below zero."""
    values = daily_cycle(5 * DAY)
    series = grid_series(values)
    scorer = RecordingScorer({"naive": 1.0, "seasonal_naive": 1.0, "holt_winters": 1.0})
    auto = Auto(STEP, candidates=FAST, quantile=0.95, horizon=3, scorer=scorer).fit(series)
    held = auto.selection_.validation_steps
    assert held == len(values) // 2  # on a short history the window shrinks to half of it
    for run in scorer.runs:
        assert len(run) == held and run.horizon == 3 and run.quantile == 0.95
        np.testing.assert_array_equal(run.actual, values[-held:])
        np.testing.assert_array_equal(run.before, values[-held - 2 : -held])
        first = run.forecast(0)
        assert first.origin == series.index[-held - 1]
        assert run.forecast(5).origin == series.index[-held + 4]
        assert run.current(5) == values[-held + 4] and run.last_point(5) == values[-held + 3]
        assert run.current(0) == values[-held - 1] and run.last_point(0) == values[-held - 2]
        assert (run.band >= 0).all() and (run.band >= run.mean - 1e-9).mean() > 0.5
    naive = [r for r in scorer.runs if r.model == "naive"]
    assert {r.calibrated for r in naive} == {False, True}
    own, calibrated = sorted(naive, key=lambda r: r.calibrated)
    np.testing.assert_array_equal(own.mean, calibrated.mean)
    assert not np.array_equal(own.band, calibrated.band)


def test_a_changed_scorer_selects_again() -> None:
    series = grid_series(daily_cycle(5 * DAY))
    first = Auto(STEP, candidates=FAST, scorer=RecordingScorer(dict.fromkeys(FAST, 1.0)))
    first.fit(series.iloc[:-12])
    same = Auto(STEP, candidates=FAST, scorer=first.scorer)
    same.warm_start(first)
    same.fit(series)
    assert same.selection_ is first.selection_
    other = Auto(STEP, candidates=FAST, scorer=RecordingScorer(dict.fromkeys(FAST, 2.0)))
    other.warm_start(first)
    other.fit(series)
    assert other.selection_ is not first.selection_


def test_the_calibrated_path_is_what_a_score_tracker_serves() -> None:
    """Once every horizon's window is full, the path's band at each origin is the band the
    tracker (the calibration the model is served with) gives at that origin."""
    values = daily_cycle(4 * DAY, noise=8.0, seed=4)
    train, held = values[: 3 * DAY], values[3 * DAY :]
    model = make_model("holt_winters", STEP)
    model.fit(grid_series(train))
    horizon, window, floor, q = 2, 100, scale_floor(train), 0.9
    tracker = ScoreTracker(model, horizon, window, floor)
    means, bands = [], []
    for k in range(len(held)):
        mean, errors = tracker.calibrated(horizon, MIN_SCORES)
        level = np.maximum(mean, 0.0)
        means.append(mean)
        bands.append(np.maximum(level + np.quantile(errors, q, axis=1), 0.0))
        tracker.observe(held[k : k + 1])
    path = calibrated_path(np.array(means), held, q, window, floor, MIN_SCORES)
    full = window + horizon  # from here every horizon holds `window` scores
    np.testing.assert_allclose(path[full:], np.array(bands)[full:], rtol=1e-9)
    assert np.isnan(path[:MIN_SCORES]).all()  # too few scores yet: the model's own band
