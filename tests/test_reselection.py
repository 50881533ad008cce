"""Daily model selection falls due at each target's own hour of the day, so targets fitted
together spread their reselections over the day's refit rounds."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pandas as pd

from forecaster.models import Auto
from forecaster.spec import TriggerSpec
from forecaster.target import (
    RESELECT_SECONDS,
    Target,
    reselection_due,
    reselection_phase,
)
from tests.support.models import fast_auto

STEP = pd.Timedelta("5min")
START = pd.Timestamp("2026-11-01T00:00Z")


class NoSource:
    """The target here is filled by hand: a source that is never read."""

    def query_range(self, *args: object) -> pd.Series:
        raise AssertionError("not read")

    def query_instant(self, *args: object) -> tuple[object, float]:
        raise AssertionError("not read")


def test_a_thousand_targets_fitted_together_reselect_spread_over_the_day() -> None:
    ids = [f"shop/app-{k}/fc-{k:04d}" for k in range(1_000)]
    fitted = START.timestamp()  # every first fit in the same minute, as at adoption
    rounds = np.zeros(48, dtype=int)  # hourly refit rounds over two days
    selected = dict.fromkeys(ids, fitted)
    for hour in range(1, 49):
        now = fitted + 3_600 * hour
        for target_id in ids:
            if reselection_due(target_id, selected[target_id], now):
                rounds[hour - 1] += 1
                selected[target_id] = now
    # The first day: each target reselects once at its own hour; the second day, again.
    assert rounds[:24].sum() == 1_000 and rounds[24:].sum() == 1_000
    share = 1_000 / 24
    assert rounds.max() <= 1.5 * share, rounds  # no round carries much more than its share
    assert rounds.min() >= 0.5 * share, rounds
    # Under the age rule alone every target reselected in one round a day later.


def test_the_phase_is_a_stable_second_of_the_day() -> None:
    phase = reselection_phase("shop/web/fc-1")
    assert 0 <= phase < RESELECT_SECONDS
    assert reselection_phase("shop/web/fc-1") == phase  # not Python's salted hash()
    assert len({reselection_phase(f"shop/web/fc-{k}") for k in range(100)}) > 90


def test_due_once_the_targets_hour_passes_and_not_before() -> None:
    target_id = "shop/web/fc-1"
    phase = reselection_phase(target_id)
    day = math.floor(START.timestamp() / RESELECT_SECONDS) * RESELECT_SECONDS
    selected = day + phase + 60.0  # just after its hour
    assert not reselection_due(target_id, selected, selected + RESELECT_SECONDS - 120)
    assert reselection_due(target_id, selected, selected + RESELECT_SECONDS - 60)
    before = day + phase - 60.0  # just before its hour: due as the hour passes
    assert not reselection_due(target_id, before, before + 59)
    assert reselection_due(target_id, before, before + 60)


def _target_with_auto(target_id: str, days: float) -> tuple[Target, Auto]:
    spec = TriggerSpec(server_address="http://replay.demo", query="q", target_value=10.0,
                       model="auto", history_window_seconds=14 * 86_400)
    target = Target(target_id, spec, NoSource())  # type: ignore[arg-type]
    steps = int(days * 86_400 / STEP.total_seconds())
    index = pd.date_range(START, periods=steps, freq=STEP)
    rng = np.random.default_rng(1)
    values = 100 + 40 * np.sin(np.arange(steps) * 2 * np.pi / 288) + rng.normal(0, 5, steps)
    series = pd.Series(values, index=index)
    target.buffer.extend(series)
    model = fast_auto(STEP, quantile=spec.quantile, horizon=1 + target.lead_steps)
    model.fit(series)
    target.model = model
    return target, model


def test_a_refit_sends_the_model_until_the_hour_and_drops_it_after() -> None:
    target, model = _target_with_auto("shop/web/fc-1", days=3)
    selected = model.selection_.selected_at.timestamp()
    request = target.fit_request()
    assert request.previous is not None  # the same bin: not due
    assert pickle.loads(request.previous).selection_.selected_at == model.selection_.selected_at
    # A day's new bins bring the target's hour past: the worker gets no model and selects.
    later = pd.date_range(model.selection_.selected_at + STEP, periods=288, freq=STEP)
    target.buffer.extend(pd.Series(100.0, index=later))
    assert reselection_due(target.target_id, selected, later[-1].timestamp())
    assert target.fit_request().previous is None


def test_a_model_without_a_selection_is_always_sent() -> None:
    target, _ = _target_with_auto("shop/web/fc-2", days=3)
    target.model = pickle.loads(pickle.dumps(target.model)).model_  # the chosen model alone
    later = pd.date_range(target.buffer.last + STEP, periods=2 * 288, freq=STEP)
    target.buffer.extend(pd.Series(100.0, index=later))
    assert target.fit_request().previous is not None
