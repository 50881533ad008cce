"""The queries one target sends per refresh interval stay bounded whatever goes wrong.

A counting proxy sits in front of a real Prometheus (and answers 503 itself where a test says
so). The engine runs on a clock the test moves: between two moves the loop's passes
(`Engine.tick`) run many times, as the loop would every half second, and the proxy shows
what each interval sent. The failure modes: a first read that fails (no data, a reply over
maxReplyBytes, several series, the server unavailable), a fit that always fails, and two
triggers that share one id and replace each other on every call.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pytest

from forecaster.config import EngineSettings
from forecaster.engine import Engine
from forecaster.sources.prometheus import (
    MAX_POINTS_PER_REQUEST,
    PrometheusServerConfig,
    PrometheusSource,
)
from forecaster.spec import MAX_POINTS, TriggerSpec
from forecaster.target import Target
from tests.support.prometheus import PrometheusServer, backfill, write_openmetrics
from tests.support.proxy import RecordingProxy
from tests.support.waiting import wait_for

STEADY = 'sum(steady_requests{job="steady"})'
REFRESH_SECONDS = 30.0
PASSES = 40  # loop passes per interval: 20 s of the real loop's
INTERVALS = 3
RETRIES = 1
STEP = 60
LONGEST = MAX_POINTS * STEP  # the longest history a trigger may ask for at this step
# One refresh of the longest history: its range queries and the instant query, each tried
# retries + 1 times at most.
READS_PER_REFRESH = math.ceil(MAX_POINTS / MAX_POINTS_PER_REQUEST) + 1


class Clock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class FailingFits(ThreadPoolExecutor):
    """A fit pool whose every fit fails, as a model bug or a crashing worker would."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        def fail() -> None:
            raise RuntimeError("this fit fails on purpose")

        return super().submit(fail)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """36 days of a steady series a minute, and two series under one name, to two hours
    ahead: the longest history at a 1-minute step, five range queries of it."""
    root = tmp_path_factory.mktemp("query-bounds")
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    index = pd.date_range(now - timedelta(days=36), now + timedelta(hours=2), freq="1min")
    write_openmetrics(pd.Series(5.0, index=index), "steady_requests", root / "steady.om",
                      {"job": "steady"})
    for instance in ("a", "b"):
        write_openmetrics(pd.Series(1.0, index=index[-3000:]), "split_requests",
                          root / f"split-{instance}.om", {"instance": instance})
    files = [root / "steady.om", root / "split-a.om", root / "split-b.om"]
    backfill(files, root / "blocks")
    with PrometheusServer(blocks_dir=root / "blocks", workdir=root / "prom") as server:
        yield server


@pytest.fixture
def proxy(prometheus: PrometheusServer) -> Iterator[RecordingProxy]:
    server = RecordingProxy(prometheus.url)
    thread = threading.Thread(target=server.serve_forever, name="proxy", daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine_for(clock: Clock) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(fits: ThreadPoolExecutor | None = None) -> Engine:
        engine = Engine(
            EngineSettings(refresh_seconds=REFRESH_SECONDS, refit_seconds=2 * REFRESH_SECONDS),
            clock=clock, fit_pool=fits or ThreadPoolExecutor(1),
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def _source(proxy: RecordingProxy, **server: Any) -> PrometheusSource:
    config = PrometheusServerConfig(url=proxy.url, retries=RETRIES, timeout_seconds=5.0,
                                    **server)
    return PrometheusSource(config)


def _spec(proxy: RecordingProxy, query: str, **settings: Any) -> TriggerSpec:
    values: dict[str, Any] = {"step_seconds": STEP, "history_window_seconds": LONGEST,
                              "model": "naive", **settings}
    values.setdefault("target_value", 10.0)
    return TriggerSpec(server_address=proxy.url, query=query, **values)


def _settle(engine: Engine) -> None:
    """Wait until no refresh and no fit is in flight (a pass may have just started one): a
    fit that lands after the clock moves on would schedule its successor from the later
    time, and the intervals would no longer be alike."""
    wait_for(lambda: not any(t.refreshing or t.fit_pending for t in engine.targets()),
             timeout=60, what="the refreshes and fits in flight")


def _queries(proxy: RecordingProxy) -> int:
    with proxy.lock:
        return sum(1 for path, _, _ in proxy.seen if path.startswith("/api/v1/query"))


def _per_interval(engine: Engine, clock: Clock, proxy: RecordingProxy) -> list[int]:
    """The queries sent in the first interval (the target's creation included) and in each
    of the next INTERVALS, with PASSES loop passes in each."""
    counts = []
    for interval in range(INTERVALS + 1):
        if interval:
            clock.offset += REFRESH_SECONDS
        before = _queries(proxy) if interval else 0
        for _ in range(PASSES):
            engine.tick()
            _settle(engine)
        counts.append(_queries(proxy) - before)
    return counts


@pytest.mark.parametrize(("query", "server", "reason"), [
    ('sum(absent_requests{job="none"})', {}, "no data"),
    (STEADY, {"max_reply_bytes": 1024}, "maxReplyBytes"),
    ("split_requests", {}, "expected one"),
    (f"{STEADY} * 1", {}, "unavailable"),
], ids=["no-data", "reply-too-large", "several-series", "unavailable"])
def test_a_first_read_that_keeps_failing_is_tried_once_per_interval(
    proxy: RecordingProxy, clock: Clock, engine_for: Callable[..., Engine],
    query: str, server: dict[str, Any], reason: str,
) -> None:
    proxy.refused.add(f"{STEADY} * 1")
    engine = engine_for()
    target = engine.ensure_target("shop/web/fc-1", _spec(proxy, query), _source(proxy, **server))
    counts = _per_interval(engine, clock, proxy)
    assert target.buffer.last is None, "the first read never succeeds here"
    assert reason in (target.snapshot.last_error or "")
    assert all(0 < count <= READS_PER_REFRESH * (RETRIES + 1) for count in counts), counts


def test_a_fit_that_always_fails_adds_no_queries(
    proxy: RecordingProxy, clock: Clock, engine_for: Callable[..., Engine]
) -> None:
    engine = engine_for(FailingFits(1))
    target = engine.ensure_target("shop/web/fc-1", _spec(proxy, STEADY), _source(proxy))
    counts = _per_interval(engine, clock, proxy)
    assert target.fit_failures >= 2 and target.model is None
    assert counts[0] <= READS_PER_REFRESH, counts  # the first, full read
    assert all(count <= 2 for count in counts[1:]), counts  # new points, the current value


def test_two_triggers_sharing_an_id_read_the_history_once_per_interval(
    proxy: RecordingProxy, clock: Clock, engine_for: Callable[..., Engine]
) -> None:
    engine = engine_for()
    source = _source(proxy)
    specs = [_spec(proxy, STEADY), _spec(proxy, f"{STEADY} + 0")]
    counts = []
    for interval in range(INTERVALS + 1):
        clock.offset += REFRESH_SECONDS if interval else 0
        before = _queries(proxy)
        for call in range(PASSES):  # KEDA's calls for both triggers, each replacing the other
            engine.ensure_target("shop/web/shared", specs[call % 2], source)
            engine.tick()
            _settle(engine)
        counts.append(_queries(proxy) - before)
    assert all(count <= READS_PER_REFRESH for count in counts), counts
    target: Target = engine.get("shop/web/shared")
    assert target.spec == specs[1]


def test_a_settings_edit_keeps_the_history_read_and_serves_at_once(
    proxy: RecordingProxy, clock: Clock, engine_for: Callable[..., Engine]
) -> None:
    engine = engine_for()
    source = _source(proxy)
    first = engine.ensure_target("shop/web/edited", _spec(proxy, STEADY), source)
    first.first_value.wait(60)
    _settle(engine)
    assert first.snapshot.current_value is not None
    before = _queries(proxy)
    for target_value in (20.0, 10.0, 20.0):  # edits of targetValue alone: the same series
        edited = engine.ensure_target(
            "shop/web/edited", _spec(proxy, STEADY, target_value=target_value), source)
        assert edited is not first and edited.spec.target_value == target_value
        assert edited.first_value.is_set()  # served from the history already read
        assert edited.snapshot.current_value == first.snapshot.current_value
        assert len(edited.buffer) == len(first.buffer)
        engine.serve("shop/web/edited", wait=False)  # a plan now, not "no data yet"
    assert _queries(proxy) == before  # no history read again
