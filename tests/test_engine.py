"""Engine rules that need no Prometheus: the bundled trace replayed as the source."""

from __future__ import annotations

import gc
import queue
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from forecaster.config import EngineSettings
from forecaster.engine import Engine
from forecaster.fitting import FitPool, FitRequest
from forecaster.sources.replay import ReplaySource
from forecaster.spec import TriggerSpec
from forecaster.target import freshness_limit
from forecaster.windows import Window
from tests.support.waiting import wait_for

DATA = Path(__file__).parent.parent / "data"
AWS = "aws_elb_request_count_8c0756"
SPEC = TriggerSpec(server_address="http://replay.demo", query=AWS, target_value=10.0,
                   model="seasonal_naive")
NO_POINTS = pd.Series(dtype=float)  # a reading of the current value with no new grid point


class Clock:
    """Wall time, moved on by `ahead` seconds: the engine's clock in these tests."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(clock: Clock) -> Iterator[Engine]:
    engine = Engine(EngineSettings(refresh_seconds=3600, idle_seconds=60),
                    clock=clock, fit_pool=ThreadPoolExecutor(1))
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def source() -> ReplaySource:
    return ReplaySource.from_folder(DATA)



def test_a_configured_target_keeps_its_spec_when_a_request_differs(
    engine: Engine, source: ReplaySource, caplog: pytest.LogCaptureFixture
) -> None:
    configured = engine.ensure_target("demo/aws/m", SPEC, source, configured=True)
    other = replace(SPEC, target_value=20.0)
    for _ in range(3):
        assert engine.ensure_target("demo/aws/m", other, source) is configured
    assert engine.get("demo/aws/m").spec == SPEC
    assert caplog.text.count("differs from the config file's") == 1


def test_a_request_spec_change_replaces_an_unconfigured_target_and_says_so(
    clock: Clock, source: ReplaySource, caplog: pytest.LogCaptureFixture
) -> None:
    heard = Heard()
    engine = Engine(EngineSettings(refresh_seconds=3600), clock=clock,
                    fit_pool=ThreadPoolExecutor(1), listener=heard)
    try:
        first = engine.ensure_target("demo/aws/m", SPEC, source)
        assert engine.ensure_target("demo/aws/m", SPEC, source) is first
        assert heard.spec_changes == []
        taken = replace(SPEC, step_seconds=600, query="twitter_volume_aapl")
        second = engine.ensure_target("demo/aws/m", taken, source)
    finally:
        engine.stop()
    assert second is not first
    assert engine.get("demo/aws/m").spec.step_seconds == 600
    assert heard.spec_changes == ["demo/aws/m"]
    (record,) = [r for r in caplog.records if "trigger changed" in r.getMessage()]
    assert record.levelname == "WARNING"
    message = record.getMessage()
    assert "(query, step)" in message
    assert f"query was {AWS!r}, now 'twitter_volume_aapl'" in message


def test_a_changed_query_is_quoted_by_its_start_only(
    engine: Engine, source: ReplaySource, caplog: pytest.LogCaptureFixture
) -> None:
    engine.ensure_target("demo/aws/m", SPEC, source)
    engine.ensure_target("demo/aws/m", replace(SPEC, query="x" * 5_000), source)
    (record,) = [r for r in caplog.records if "trigger changed" in r.getMessage()]
    assert "x" * 41 not in record.getMessage()
    assert len(record.getMessage()) < 400


def test_idle_targets_are_dropped_and_configured_ones_kept(
    engine: Engine, clock: Clock, source: ReplaySource
) -> None:
    engine.ensure_target("demo/aws/idle", SPEC, source)
    engine.ensure_target("demo/aws/kept", SPEC, source, configured=True)
    wait_for(lambda: engine.get("demo/aws/idle").snapshot.forecast is not None, timeout=30)
    clock.ahead = 120
    engine.tick()
    assert [t.target_id for t in engine.targets()] == ["demo/aws/kept"]


def test_a_dropped_targets_memory_is_handed_back_at_the_next_trim(
    clock: Clock, source: ReplaySource
) -> None:
    fits = FitPool(1, executor=ThreadPoolExecutor(1), trim_interval_seconds=0.0)
    engine = Engine(EngineSettings(refresh_seconds=3600, idle_seconds=60), clock=clock,
                    fit_pool=fits)
    try:
        engine.ensure_target("demo/aws/idle", SPEC, source)
        wait_for(lambda: engine.get("demo/aws/idle").snapshot.forecast is not None, timeout=30)
        assert fits.trim_if_due()  # the fit that landed
        engine.tick()
        assert not fits.trim_if_due()  # nothing let go since
        gc.disable()  # no automatic collection: only the trim after the drop may free it
        cycle = Cycle()
        freed = weakref.ref(cycle)
        del cycle
        clock.ahead = 120
        engine.tick()
        assert len(engine) == 0
        assert fits.trim_if_due()  # the dropped target's model and history
        assert freed() is None  # collected first, so that its blocks keep no page
    finally:
        gc.enable()
        engine.stop()


def test_a_failed_read_is_handed_back_at_the_next_trim(
    clock: Clock, source: ReplaySource
) -> None:
    """A refused reply may have been read and parsed whole (up to maxReplyBytes) by a target
    that never fits, so no model is let go to trigger the trim."""
    fits = FitPool(1, executor=ThreadPoolExecutor(1), trim_interval_seconds=0.0)
    engine = Engine(EngineSettings(refresh_seconds=3600), clock=clock, fit_pool=fits)
    try:
        assert not fits.trim_if_due()  # nothing let go yet
        target = engine.ensure_target("demo/aws/unknown", replace(SPEC, query="no_such_series"),
                                      source)
        wait_for(lambda: target.refresh_failures > 0 and not target.refreshing, timeout=30)
        assert target.model is None and not target.fit_pending
        assert fits.trim_if_due()  # the refused read's memory
        assert not fits.trim_if_due()  # once
    finally:
        engine.stop()


class Cycle:
    """An object that refers to itself: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_a_forecast_from_history_that_stopped_advancing_is_not_served(
    engine: Engine, source: ReplaySource
) -> None:
    target = engine.ensure_target("demo/aws/m", SPEC, source)
    wait_for(lambda: engine.get("demo/aws/m").snapshot.forecast is not None, timeout=30)
    assert engine.serve("demo/aws/m").mode == "forecast"
    # The current value keeps arriving but the grid does not: past the freshness limit the
    # model's origin is too far behind, so the engine plans reactively and says why.
    current = target.snapshot.current_time
    assert current is not None
    later = current + freshness_limit(engine.settings, SPEC) + 2 * SPEC.step_seconds
    engine.observe("demo/aws/m", NO_POINTS, (later, 42.0))
    snapshot = target.snapshot
    assert snapshot.forecast is None and snapshot.planned is not None
    assert snapshot.planned.mode == "reactive" and snapshot.planned.value == 42.0
    assert snapshot.last_error is not None and "behind" in snapshot.last_error


def test_a_refresh_without_new_points_reuses_the_forecast_and_floors_at_the_load_held(
    engine: Engine, source: ReplaySource
) -> None:
    target = engine.ensure_target("demo/aws/m", SPEC, source)
    wait_for(lambda: engine.get("demo/aws/m").snapshot.forecast is not None, timeout=30)
    before = target.snapshot
    assert before.forecast is not None and before.current_time is not None
    assert before.planned is not None
    last_point = float(target.buffer.values[-1])
    engine.observe("demo/aws/m", NO_POINTS, (before.current_time + 30, 1e6))
    after = target.snapshot
    assert after.forecast is before.forecast  # no new point: not predicted again
    assert after.planned is not None
    assert after.planned.smoothed == before.planned.smoothed  # same origin: same average
    # A spike in one reading does not raise the floor: the last grid point is lower.
    assert after.planned.floor == last_point
    assert after.planned.value == max(before.planned.smoothed or 0.0, last_point) < 1e6
    # A reading below the last point lowers it (the lower of the two is the load held).
    low = last_point / 2
    engine.observe("demo/aws/m", NO_POINTS, (before.current_time + 60, low))
    assert target.snapshot.planned is not None and target.snapshot.planned.floor == low

    model = target.model
    assert model is not None
    step = pd.Timedelta(seconds=SPEC.step_seconds)
    newer = pd.Series([5.0], index=[model.last_timestamp_ + step])
    engine.observe("demo/aws/m", newer, (before.current_time + 330, 5.0))
    moved = target.snapshot.forecast
    assert moved is not None and moved is not before.forecast
    assert moved.timestamps[0] == before.forecast.timestamps[0] + step


def test_a_scheduled_minimum_raises_the_plan_only_while_its_window_meets_the_lead_time(
    engine: Engine, source: ReplaySource
) -> None:
    now = time.time()
    lead = 2 * SPEC.step_seconds  # the plan covers now .. the end of the served interval
    soon = Window(now + lead - 60, now + 3600, replicas=40)
    later = Window(now + lead + 600, now + 7200, replicas=90)
    spec = replace(SPEC, scheduled_min_replicas=(soon, later))
    target = engine.ensure_target("demo/aws/event", spec, source)
    wait_for(lambda: engine.get("demo/aws/event").snapshot.forecast is not None, timeout=30)
    engine.observe("demo/aws/event", NO_POINTS, (now, 1.0))
    planned = target.snapshot.planned
    assert planned is not None and planned.scheduled_minimum == 40 * SPEC.target_value
    assert planned.value == 40 * SPEC.target_value
    assert engine.is_active("demo/aws/event")
    engine.observe("demo/aws/event", NO_POINTS, (now - 3600, 1.0))  # an hour earlier: none near
    planned = target.snapshot.planned
    assert planned is not None and planned.scheduled_minimum is None
    assert planned.value < 40 * SPEC.target_value


class RecordingPool(ThreadPoolExecutor):
    """Fits in a thread, keeping what each fit was given."""

    def __init__(self) -> None:
        super().__init__(1)
        self.requests: list[FitRequest] = []

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        self.requests.extend(a for a in args if isinstance(a, FitRequest))
        return super().submit(fn, *args, **kwargs)


def test_excluded_windows_reach_the_model_as_missing_and_only_those(source: ReplaySource) -> None:
    pool = RecordingPool()
    engine = Engine(EngineSettings(refresh_seconds=3600), fit_pool=pool)
    try:
        plain = engine.ensure_target("demo/aws/plain", SPEC, source)
        wait_for(lambda: engine.get("demo/aws/plain").snapshot.forecast is not None, timeout=30)
        history = plain.buffer.series()
        start, end = history.index[-100], history.index[-90]
        window = Window(start.timestamp(), end.timestamp())
        spec = replace(SPEC, exclude_from_training=(window,))
        engine.ensure_target("demo/aws/excluded", spec, source)
        wait_for(lambda: engine.get("demo/aws/excluded").snapshot.forecast is not None, timeout=30)
    finally:
        engine.stop()
    by_length = {len(r.values): r for r in pool.requests}
    assert len(pool.requests) == 2 and len(by_length) == 1, "both fits saw the same grid"
    plain_values, excluded_values = (r.values for r in pool.requests)
    hidden = np.isnan(excluded_values) & ~np.isnan(plain_values)
    assert hidden.sum() == 10  # the ten bins from `start` up to `end`
    assert np.flatnonzero(hidden)[0] == len(plain_values) - 100
    same = ~hidden
    np.testing.assert_array_equal(excluded_values[same], plain_values[same])


def test_the_target_time_zone_reaches_its_fits(source: ReplaySource) -> None:
    pool = RecordingPool()
    engine = Engine(EngineSettings(refresh_seconds=3600), fit_pool=pool)
    try:
        target = engine.ensure_target("demo/aws/paris", replace(SPEC, time_zone="Europe/Paris"),
                                      source)
        wait_for(lambda: engine.get("demo/aws/paris").snapshot.forecast is not None, timeout=30)
    finally:
        engine.stop()
    assert [r.time_zone for r in pool.requests] == ["Europe/Paris"]
    assert type(target.model).__name__ == "LocalTime"


class Heard:
    """An EngineListener that queues what it is told, so a test waits on it, not on time."""

    def __init__(self) -> None:
        self.fits: queue.Queue[tuple[str, bool]] = queue.Queue()
        self.refreshes: queue.Queue[tuple[str, bool]] = queue.Queue()
        self.spec_changes: list[str] = []

    def fit_finished(self, target_id: str, seconds: float, ok: bool, fell_back: bool) -> None:
        self.fits.put((target_id, ok))

    def refresh_finished(self, target_id: str, ok: bool) -> None:
        self.refreshes.put((target_id, ok))

    def fit_worker_died(self, cause: str) -> None:
        pass

    def spec_conflict(self, target_id: str) -> None:
        pass

    def spec_changed(self, target_id: str) -> None:
        self.spec_changes.append(target_id)


def test_refit_now_refits_at_the_next_pass_and_run_refresh_reads_in_the_calling_thread(
    clock: Clock, source: ReplaySource
) -> None:
    heard = Heard()
    engine = Engine(EngineSettings(refresh_seconds=3600, refit_seconds=3600), clock=clock,
                    fit_pool=ThreadPoolExecutor(1), listener=heard)
    try:
        target = engine.ensure_target("demo/aws/m", SPEC, source)
        assert heard.refreshes.get(timeout=30) == ("demo/aws/m", True)
        assert heard.fits.get(timeout=60) == ("demo/aws/m", True)  # the first fit
        engine.tick()
        assert not target.fit_pending  # the next refit is an hour away
        engine.refit_now("demo/aws/m")
        engine.tick()
        assert heard.fits.get(timeout=60) == ("demo/aws/m", True)
        assert target.fits == 2

        last = target.buffer.last
        assert last is not None
        clock.ahead = 2 * SPEC.step_seconds  # two new bins
        asked = clock()
        assert engine.run_refresh("demo/aws/m")
        assert heard.refreshes.get_nowait() == ("demo/aws/m", True)  # done before it returned
        assert target.buffer.last == last + 2 * target.step
        current_time = target.snapshot.current_time
        assert current_time is not None and int(asked) <= current_time <= clock()
    finally:
        engine.stop()


class GatedFits(ThreadPoolExecutor):
    """Fits in one thread, each waiting at `gate` once it is there (`entered` tells)."""

    def __init__(self) -> None:
        super().__init__(1)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        def gated():  # type: ignore[no-untyped-def]
            self.entered.set()
            self.gate.wait()
            return fn(*args, **kwargs)

        return super().submit(gated)


def test_a_first_fit_goes_before_the_refits_waiting(clock: Clock, source: ReplaySource) -> None:
    """A target with no model is fitted before the refits of targets that serve a forecast,
    except the one a worker already holds."""
    heard, fits = Heard(), GatedFits()
    engine = Engine(EngineSettings(refresh_seconds=3600, refit_seconds=3600, fit_workers=1),
                    clock=clock, fit_pool=FitPool(1, executor=fits), listener=heard)
    try:
        serving = [f"demo/aws/serving-{k}" for k in range(3)]
        for target_id in serving:
            engine.ensure_target(target_id, SPEC, source)
        assert {heard.fits.get(timeout=60) for _ in serving} == {(t, True) for t in serving}
        fits.gate.clear()
        fits.entered.clear()
        for target_id in serving:
            engine.refit_now(target_id)
        engine.tick()
        assert fits.entered.wait(timeout=30)  # one refit in the worker, two waiting
        new = engine.ensure_target("demo/aws/new", SPEC, source)
        wait_for(lambda: new.fit_pending, timeout=30)
        fits.gate.set()
        landed = [heard.fits.get(timeout=60) for _ in range(4)]
    finally:
        engine.stop()
    assert all(ok for _, ok in landed)
    order = [target_id for target_id, _ in landed]
    assert order[1] == "demo/aws/new" and sorted([order[0], *order[2:]]) == serving
