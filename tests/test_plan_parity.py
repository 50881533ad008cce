"""One plan: the live target and the backtest plan the same load, interval by interval.

The backtest's simulation and a live Target are driven over the same trace: the target folds
in one grid point per interval with the current value equal to it, as a refresh would, and
refits at the backtest's refit times with the fit workers' own function, run in this
process. Their planned loads must agree to a relative 1e-9.

With a maxUnderProvisioned, `auto` ranks its candidates by the cost of holding the share
with each one's plan: the worker's scorer (from the target's controller) and the backtest's
must choose alike. What is compared then is the plan before the controller's factor (the
served load over exp(level)): the backtest calibrates its level on a warm-up the live
target does not have."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from forecaster.backtest.simulate import BacktestConfig, evaluation_start, simulate
from forecaster.fitting import fit_job
from forecaster.models import MODEL_FACTORIES, ModelFactory
from forecaster.models.reselection import reselection_phase
from forecaster.models.selection import Auto, PlanScorer
from forecaster.series import read_csv, to_grid
from forecaster.spec import TriggerSpec
from forecaster.target import Target
from tests.support.models import FAST_CANDIDATES, FAST_VALIDATION, fast_auto
from tests.support.sources import NoSource

TRACE = Path(__file__).parent.parent / "data" / "twitter_volume_aapl.csv"  # no gaps
STEP = pd.Timedelta("5min")
TARGET_VALUE = 26.98
TARGET_ID = "t/t/m"  # its second of the day falls inside the compared half day



def calibrated_fast_auto(
    step: pd.Timedelta, *, quantile: float = 0.9, horizon: int = 2,
    scorer: PlanScorer | None = None,
) -> Auto:
    """The cheap `auto`, always serving its conformal interval: every refit then carries
    the scores its predecessor made up to the refit's last bin."""
    return Auto(step, quantile=quantile, horizon=horizon, candidates=FAST_CANDIDATES,
                validation=FAST_VALIDATION, scorer=scorer, calibrate=True)


@pytest.mark.parametrize(
    ("model", "share", "auto"),
    [
        ("seasonal_naive", None, fast_auto),
        ("holt_winters", None, fast_auto),
        ("auto", 0.05, fast_auto),
        ("auto", 0.05, calibrated_fast_auto),
    ],
    ids=["seasonal_naive", "holt_winters", "auto", "auto-calibrated"],
)
def test_the_live_target_plans_what_the_backtest_plans(
    model: str, share: float | None, auto: ModelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(MODEL_FACTORIES, "auto", auto)  # three cheap candidates
    grid = to_grid(read_csv(TRACE).iloc[: 6 * 288 * 5], STEP)  # six days of the trace
    lead, refit = 2, 12
    start = evaluation_start(grid, BacktestConfig(target=TARGET_VALUE, eval_days=0.5))
    first = start - 1 - lead
    refit_times = {start + k * refit for k in range(-((start - first) // refit) - 1, 200)}
    first_refit = max(t for t in refit_times if t <= first + 1)
    config = BacktestConfig(
        target=TARGET_VALUE, step=STEP, startup=pd.Timedelta("10min"), eval_days=0.5,
        refit=pd.Timedelta("1h"), model=model, quantile=0.9, max_under_provisioned=share,
        plan_half_life=pd.Timedelta(0),
        # Decisions from the target's first (after its first fit) on, so that both refit at
        # the same times from the same model, and select afresh at the target's own hour.
        warmup=(first - first_refit + 1) * STEP,
        reselection_phase=reselection_phase(TARGET_ID),
    )
    assert (config.lead_steps, int(config.refit / STEP)) == (lead, refit)
    replay = simulate(grid, config)
    decisions = replay.decisions

    spec = TriggerSpec(
        server_address="http://replay.demo", query="q", target_value=TARGET_VALUE,
        startup_seconds=600, quantile=0.9, max_under_provisioned=share,
        plan_half_life_seconds=0, history_window_seconds=90 * 86_400, step_seconds=300,
        model=model,
    )
    target = Target(TARGET_ID, spec, NoSource())  # type: ignore[arg-type]
    values = grid.demand

    def fold(upto: int, position: int) -> None:  # points [position, upto) as one refresh
        points = values.iloc[position:upto]
        stamp = points.index[-1]
        with target.lock:
            target.fold_in(points, (stamp.timestamp(), float(points.iloc[-1])), math.inf)

    def refit_through(position: int) -> None:  # the backtest's fit: the grid before position
        with target.lock:
            request = target.fit_request()
        fitted = fit_job(request).model
        with target.lock:
            target.catch_up(fitted)
            target.adopt(fitted, 0.0, math.inf)

    fold(first_refit, 0)
    refit_through(first_refit)
    planned = []
    for t in range(first_refit, first + len(decisions)):
        fold(t + 1, t)
        if t + 1 in refit_times:  # the backtest refits before deciding at t
            refit_through(t + 1)
        if t >= first:
            made = target.snapshot.planned
            assert made is not None
            planned.append(made.value / math.exp(made.slo_level or 0.0))

    if model == "auto":  # chosen by the scorer on both sides
        assert isinstance(target.model, Auto) and target.model.selection_.scored_by == "scorer"
        # Both selected afresh once inside the compared window, at the same bin.
        reselected = pd.Timestamp(str(replay.selections[-1]["selected_at"]))
        assert len(replay.selections) == 2 and replay.eval_start <= reselected
        assert target.model.selection_.selected_at == reselected
        if auto is calibrated_fast_auto:  # the conformal band, from scores carried over
            assert target.model.selection_.calibrated
    expected = (decisions["forecast"] / (decisions["slo_level"].fillna(0.0)).map(math.exp))
    expected = expected.to_numpy()
    assert len(planned) == len(expected) == 144
    for interval, (live, replayed) in enumerate(zip(planned, expected, strict=True)):
        assert live == pytest.approx(replayed, rel=1e-9), f"interval {interval}"
