"""`auto` selects afresh once a day at each target's own second of the day, so targets fitted
together spread their reselections over the day's refit rounds; the service and the
backtest decide it in one place (forecaster.models.reselection)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pandas as pd
import pytest

from forecaster.backtest.simulate import BacktestConfig, simulate
from forecaster.errors import InvalidInputError
from forecaster.models import MODEL_FACTORIES, make_model
from forecaster.models.reselection import (
    RESELECT_SECONDS,
    passed_since,
    reselection_due,
    reselection_phase,
)
from forecaster.series import RegularSeries, to_grid
from forecaster.spec import TriggerSpec
from forecaster.target import Target
from tests.support.models import fast_auto
from tests.support.sources import NoSource

STEP = pd.Timedelta("5min")
ADOPTED = pd.Timestamp("2026-11-01T07:23Z")  # every target's first fit, in the same minute
TARGETS = 1_000
ROUNDS_A_DAY = 24  # hourly refits: refitInterval's default
# A hash spreads phases like chance: a round's count is binomial(1,000, 1/24), whose standard
# deviation is 6.3; no round may carry more than its share plus three of those.
SHARE = TARGETS / ROUNDS_A_DAY
MARGIN = 3 * math.sqrt(TARGETS * (1 / ROUNDS_A_DAY) * (1 - 1 / ROUNDS_A_DAY))



def test_a_thousand_targets_fitted_together_reselect_spread_over_the_day() -> None:
    phases = [reselection_phase(f"shop-{k % 37}/app-{k}/http_requests") for k in range(TARGETS)]
    selected = [ADOPTED.timestamp()] * TARGETS
    rounds = np.zeros(2 * ROUNDS_A_DAY, dtype=int)  # two days of hourly refit rounds
    for k in range(len(rounds)):
        now = ADOPTED.timestamp() + 3_600 * (k + 1)
        for n, phase in enumerate(phases):
            if passed_since(phase, selected[n], now):
                rounds[k] += 1
                selected[n] = now
    # Each target reselects once a day, and no round carries much more than its share
    # (under the age rule alone, all 1,000 fell in the 24th round).
    assert rounds[:ROUNDS_A_DAY].sum() == rounds[ROUNDS_A_DAY:].sum() == TARGETS
    assert rounds.max() <= SHARE + MARGIN, rounds
    assert rounds.min() >= SHARE - MARGIN, rounds


def test_the_phase_is_a_stable_second_of_the_day() -> None:
    phase = reselection_phase("shop/web/http_requests")
    assert 0 <= phase < RESELECT_SECONDS
    assert reselection_phase("shop/web/http_requests") == phase  # not Python's salted hash
    assert len({reselection_phase(f"shop/web-{k}/http_requests") for k in range(100)}) > 90


@pytest.mark.parametrize("phase", [0, 3_600, 86_399])
def test_due_when_the_phase_passes_and_not_before(phase: int) -> None:
    day = math.floor(ADOPTED.timestamp() / RESELECT_SECONDS) * RESELECT_SECONDS
    after = day + phase + 60.0  # selected just after its second of the day
    assert not passed_since(phase, after, after + RESELECT_SECONDS - 61)
    assert passed_since(phase, after, after + RESELECT_SECONDS - 60)
    before = day + phase - 60.0  # selected just before it: due as it comes
    assert not passed_since(phase, before, before + 59)
    assert passed_since(phase, before, before + 60)


def daily_history(days: float, start: pd.Timestamp | None = None) -> pd.Series:
    start = ADOPTED.floor(STEP) if start is None else start
    steps = int(days * 288)
    rng = np.random.default_rng(1)
    values = 100 + 40 * np.sin(np.arange(steps) * 2 * np.pi / 288) + rng.normal(0, 5, steps)
    return pd.Series(values, index=pd.date_range(start, periods=steps, freq=STEP))


def test_without_a_phase_it_is_due_a_day_after_the_selection() -> None:
    model = fast_auto(STEP, horizon=2).fit(daily_history(3))
    selected = model.selection_.selected_at
    assert not reselection_due(model, None, selected + pd.Timedelta(days=1) - STEP)
    assert reselection_due(model, None, selected + pd.Timedelta(days=1))
    naive = make_model("naive", STEP).fit(daily_history(3))  # selects nothing: never due
    assert not reselection_due(naive, 0, selected + pd.Timedelta(days=9))


def test_a_target_sends_its_model_until_its_phase_and_leaves_it_out_after() -> None:
    target_id = "shop/web/http_requests"
    spec = TriggerSpec(server_address="http://replay.demo", query="q", target_value=10.0,
                       model="auto", history_window_seconds=14 * 86_400)
    target = Target(target_id, spec, NoSource())  # type: ignore[arg-type]
    history = daily_history(3)
    target.buffer.extend(history)
    model = fast_auto(STEP, quantile=spec.quantile, horizon=1 + target.lead_steps)
    target.model = model.fit(history)
    request = target.fit_request()
    assert request.previous is not None  # selected on this very bin: kept
    assert pickle.loads(request.previous).selection_.selected_at == model.selection_.selected_at
    # The first bin at or after the target's second of the day, counted from the selection.
    selected = model.selection_.selected_at.timestamp()
    phase = reselection_phase(target_id)
    due = math.floor((selected - phase) / RESELECT_SECONDS + 1) * RESELECT_SECONDS + phase
    crossing = pd.Timestamp(due, unit="s", tz="UTC").ceil(STEP)
    later = pd.date_range(history.index[-1] + STEP, crossing - STEP, freq=STEP)
    target.buffer.extend(pd.Series(100.0, index=later))
    assert target.fit_request().previous is not None  # one bin short of its phase
    target.buffer.extend(pd.Series(100.0, index=[crossing]))
    assert target.fit_request().previous is None  # the worker selects afresh


def test_the_backtest_reselects_at_the_first_refit_after_its_phase(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(MODEL_FACTORIES, "auto", fast_auto)  # three cheap candidates
    history = daily_history(4, pd.Timestamp("2026-11-01T00:00Z"))
    grid: RegularSeries = to_grid(history, STEP)
    phase = 9 * 3_600 + 1_234  # 09:20:34 UTC
    config = BacktestConfig(target=20.0, eval_days=2.0, refit=pd.Timedelta("1h"),
                            max_under_provisioned=None, reselection_phase=phase)
    stamps = [pd.Timestamp(str(s["selected_at"])) for s in simulate(grid, config).selections]
    # The first fit's, then one a day: the last bin before the first hourly refit after
    # 09:20:34 (refits on the evaluation's grid: on the hour here, so the 10:00 refit).
    assert len(stamps) == 3
    assert all(s.strftime("%H:%M") == "09:55" for s in stamps[1:]), stamps
    assert stamps[2] - stamps[1] == pd.Timedelta(days=1)


def test_a_phase_outside_the_day_is_refused() -> None:
    with pytest.raises(InvalidInputError, match=r"reselection-phase.*86400.*got 86400"):
        BacktestConfig(target=1.0, reselection_phase=RESELECT_SECONDS)
