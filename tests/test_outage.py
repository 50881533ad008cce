"""Forecasting through a Prometheus outage: the outageHorizon key, the outage plan, and the
live path against a real Prometheus that the test stops and starts again."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
import requests
from openapi_schema_validator import OAS30Validator
from prometheus_client.parser import text_string_to_metric_families

from forecaster.api.openapi import openapi_document
from forecaster.config import EngineSettings
from forecaster.engine import Engine
from forecaster.errors import InvalidInputError, NotReadyError, SourceError, SourceUnavailableError
from forecaster.models import make_model
from forecaster.scaler.bridge import PUSH_SECONDS
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.service import Service
from forecaster.sources.prometheus import RefusedPointsError
from forecaster.sources.replay import ReplaySource
from forecaster.spec import MAX_OUTAGE_HORIZON_SECONDS, TriggerSpec, parse_trigger_metadata
from forecaster.target import (
    OUTAGE_MARGIN,
    Outage,
    Snapshot,
    Target,
    freshness_limit,
    outage_path,
    outage_plan,
    outage_quantile,
)
from tests.support.prometheus import PrometheusServer
from tests.support.rest import make_blocks
from tests.support.scaler import Clock, scaled_object_ref, scaler_settings
from tests.support.waiting import wait_for

STEP = 300
DATA = Path(__file__).parent.parent / "data"
AWS = "aws_elb_request_count_8c0756"
BASE = {"serverAddress": "http://prometheus:9090", "query": "up", "targetValue": "10"}


def _parse(**metadata: str) -> TriggerSpec:
    spec, _ = parse_trigger_metadata({**BASE, **metadata}, known_models=["seasonal_naive"])
    return spec


# -- outageHorizon ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"), [(None, 1800), ("0", 0), ("90s", 90), ("45m", 2700), ("6h", 21600)]
)
def test_outage_horizon_parses_durations_and_zero_turns_it_off(
    text: str | None, seconds: int
) -> None:
    spec = _parse(**({} if text is None else {"outageHorizon": text}))
    assert spec.outage_horizon_seconds == seconds


@pytest.mark.parametrize(
    ("text", "words"),
    [("7h", ["at most '6h'", "'7h'"]), ("361m", ["at most '6h'"]), ("soon", ["duration"]),
     ("-5m", ["duration"]), ("1.5h", ["duration"])],
)
def test_a_bad_outage_horizon_names_the_key_and_the_bound(text: str, words: list[str]) -> None:
    with pytest.raises(InvalidInputError) as caught:
        _parse(outageHorizon=text)
    assert caught.value.field == "outageHorizon"
    for word in words:
        assert word in str(caught.value)
    assert MAX_OUTAGE_HORIZON_SECONDS == 6 * 3600


def test_outage_horizon_comes_from_the_config_defaults() -> None:
    spec, _ = parse_trigger_metadata(BASE, known_models=[], defaults={"outageHorizon": "10m"})
    assert spec.outage_horizon_seconds == 600
    assert _parse(outageHorizon="0").outage_horizon_seconds == 0  # the trigger's own wins


def test_the_default_metric_name_counts_outage_horizon_only_when_not_the_default() -> None:
    plain = _parse().effective_metric_name
    assert _parse(outageHorizon="30m").effective_metric_name == plain
    assert _parse(outageHorizon="1800").effective_metric_name == plain
    assert _parse(outageHorizon="0").effective_metric_name != plain


# -- the outage plan -------------------------------------------------------------------------


def _fitted_target(spec: TriggerSpec, now: float) -> Target:
    """A target whose model has seen a noisy daily cycle up to the bin of `now`."""
    rng = np.random.default_rng(3)
    end = pd.Timestamp(math.floor(now / STEP) * STEP, unit="s", tz="UTC")
    index = pd.date_range(end=end, periods=3 * 288, freq="5min")
    values = 100 + 40 * np.sin(np.arange(len(index)) * 2 * np.pi / 288) + rng.normal(0, 8,
                                                                                        len(index))
    target = Target("shop/web/m", spec, source=None)  # type: ignore[arg-type]  # never read
    target.model = make_model("holt_winters", pd.Timedelta("5min")).fit(
        pd.Series(values, index=index)
    )
    return target


def _reference(path_quantile: np.ndarray, origin: float, at: float, lead: int) -> float:
    """The outage plan by hand: the interval 1 + lead bins after the bin of `at`."""
    elapsed = (math.floor(at / STEP) * STEP - origin) // STEP
    return float(path_quantile[int(elapsed) + lead]) * math.exp(OUTAGE_MARGIN)


@pytest.mark.parametrize(("quantile", "held"), [(0.9, 0.95), (0.97, 0.97)])
def test_the_outage_plan_follows_the_path_at_the_raised_quantile(
    quantile: float, held: float
) -> None:
    spec = TriggerSpec("http://p:9090", "up", 10.0, startup_seconds=600, quantile=quantile,
                       outage_horizon_seconds=3600)
    since = time.time()
    target = _fitted_target(spec, since)
    freshness = freshness_limit(EngineSettings(), spec)
    assert outage_quantile(spec) == held
    path = outage_path(target, target.model, since, freshness)  # type: ignore[arg-type]
    origin = path.origin.timestamp()
    snapshot = Snapshot(current_value=120.0, current_time=since,
                        outage=Outage(since, path, outage_quantile(spec)))
    lead = target.lead_steps
    for minutes in range(0, 61, 7):
        at = since + 60 * minutes
        planned = outage_plan(target, snapshot, at)
        assert planned is not None
        assert planned.mode == "outage" and planned.outage_since == since
        assert planned.quantile == held
        assert planned.value == pytest.approx(_reference(path.quantile(held), origin, at, lead))
        assert planned.value > planned.forecast  # type: ignore[operator]  # the margin
        assert math.isnan(planned.floor) and not planned.floored  # no current load to floor by
    # The path reaches the end of the horizon and no further: nothing is made up beyond it.
    assert outage_plan(target, snapshot, since + 3600 + 2 * STEP) is None


def test_a_scheduled_minimum_still_holds_in_an_outage() -> None:
    since = time.time()
    start = datetime.fromtimestamp(since - 3600, UTC).strftime("%Y-%m-%dT%H:%MZ")
    end = datetime.fromtimestamp(since + 7200, UTC).strftime("%Y-%m-%dT%H:%MZ")
    spec = _parse(scheduledMinReplicas=f"{start}/{end}=1000")
    target = _fitted_target(spec, since)
    path = outage_path(target, target.model, since, 600.0)  # type: ignore[arg-type]
    snapshot = Snapshot(current_value=1.0, current_time=since,
                        outage=Outage(since, path, outage_quantile(spec)))
    planned = outage_plan(target, snapshot, since + 60)
    assert planned is not None and planned.value == 1000 * spec.target_value


# -- the engine, with a source that fails on purpose -----------------------------------------


class Failing:
    """The replayed trace, or the failure the test sets: an outage or an empty answer."""

    def __init__(self, inner: ReplaySource) -> None:
        self.inner = inner
        self.failure: Exception | None = None
        self.range_failure: Exception | None = None  # the range read's alone

    def query_range(self, query: str, start: datetime, end: datetime, step: int) -> pd.Series:
        if self.failure is not None:
            raise self.failure
        if self.range_failure is not None:
            raise self.range_failure
        return self.inner.query_range(query, start, end, step)

    def query_instant(self, query: str, at: datetime | None = None) -> tuple[datetime, float]:
        if self.failure is not None:
            raise self.failure
        return self.inner.query_instant(query, at)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _engine(clock: Clock, **settings: object) -> Engine:
    engine = Engine(EngineSettings(refresh_seconds=3600, **settings),  # type: ignore[arg-type]
                    clock=clock, fit_pool=ThreadPoolExecutor(1))
    return engine


@pytest.fixture
def failing() -> Failing:
    return Failing(ReplaySource.from_folder(DATA))


def _started(engine: Engine, source: Failing, spec: TriggerSpec) -> str:
    engine.ensure_target("demo/aws/m", spec, source)
    wait_for(lambda: engine.get("demo/aws/m").snapshot.forecast is not None, timeout=30)
    return "demo/aws/m"


SPEC = TriggerSpec(server_address="http://replay.demo", query=AWS, target_value=10.0,
                   model="seasonal_naive", outage_horizon_seconds=1800)


def test_an_empty_answer_is_data_not_an_outage(clock: Clock, failing: Failing) -> None:
    engine = _engine(clock)
    try:
        target_id = _started(engine, failing, SPEC)
        failing.failure = SourceError("the query returned no series", query=AWS)
        engine.run_refresh(target_id)
        assert engine.get(target_id).snapshot.outage is None
        assert engine.serve(target_id).mode == "forecast"  # the last plan, while fresh
        clock.offset = freshness_limit(engine.settings, SPEC) + 1
        with pytest.raises(NotReadyError, match="freshness"):
            engine.serve(target_id)
    finally:
        engine.stop()


def test_new_points_all_refused_are_gaps_named_once_and_the_refresh_goes_on(
    clock: Clock, failing: Failing, caplog: pytest.LogCaptureFixture
) -> None:
    engine = _engine(clock)
    try:
        target_id = _started(engine, failing, SPEC)
        target = engine.get(target_id)
        last = target.buffer.last
        clock.offset += 3 * SPEC.step_seconds  # new bins to read, each refused by the source
        refusal = RefusedPointsError("query 'x' returned -13.0 at ...", query=AWS)
        failing.range_failure = refusal
        with caplog.at_level(logging.WARNING, logger="forecaster.refreshing"):
            engine.run_refresh(target_id)
        (record,) = [r for r in caplog.records if r.name == "forecaster.refreshing"]
        assert target_id in record.getMessage() and str(refusal) in record.getMessage()
        assert target.buffer.last == last  # nothing folded in
        assert target.snapshot.last_error is None and target.refresh_failures == 0
        assert engine.serve(target_id).mode == "forecast"  # the current value was good
    finally:
        engine.stop()


def test_an_outage_ends_when_the_source_answers_even_without_data(
    clock: Clock, failing: Failing
) -> None:
    engine = _engine(clock)
    try:
        target_id = _started(engine, failing, SPEC)
        failing.failure = SourceUnavailableError("connection refused", server="replay")
        engine.run_refresh(target_id)
        assert engine.serve(target_id).mode == "outage"
        failing.failure = SourceError("the query returned no series", query=AWS)
        engine.run_refresh(target_id)
        assert engine.serving_outage(target_id) is None
        assert engine.serve(target_id).mode == "forecast"
    finally:
        engine.stop()


def test_dry_run_serves_no_outage_forecast(clock: Clock, failing: Failing) -> None:
    engine = _engine(clock, dry_run=True)
    spec = replace(SPEC, outage_horizon_seconds=MAX_OUTAGE_HORIZON_SECONDS)
    try:
        target_id = _started(engine, failing, spec)
        failing.failure = SourceUnavailableError("connection refused", server="replay")
        engine.run_refresh(target_id)
        assert engine.get(target_id).snapshot.outage is not None
        assert engine.serve(target_id).mode == "dry_run"
        # Past the data's freshness, within outageHorizon: a reactive scaler has nothing.
        clock.offset = freshness_limit(engine.settings, spec) + 1
        with pytest.raises(NotReadyError, match="freshness"):
            engine.serve(target_id)
    finally:
        engine.stop()


# -- live: a real Prometheus stopped and started again ---------------------------------------


@pytest.fixture(scope="module")
def blocks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_blocks(tmp_path_factory.mktemp("outage"))


@pytest.fixture
def own(blocks: Path, tmp_path: Path) -> Iterator[PrometheusServer]:
    with PrometheusServer(blocks_dir=blocks, workdir=tmp_path / "own") as server:
        yield server


def _scrape(base: str) -> dict[tuple[str, str], float]:
    """forecaster_serving_outage_forecast by (name, metric) from /metrics over HTTP."""
    text = requests.get(f"{base}/metrics", timeout=10).text
    return {
        (sample.labels["name"], sample.labels["metric"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "forecaster_serving_outage_forecast"
        for sample in family.samples
    }


def _conforms(body: object, schema: str) -> None:
    document = openapi_document()
    root = {"$ref": f"#/components/schemas/{schema}", "components": document["components"]}
    OAS30Validator(root).validate(body)


def test_prometheus_outage_serves_the_flagged_outage_plan_then_unavailable_then_recovers(
    own: PrometheusServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    service = Service(scaler_settings(own.url), clock=clock)
    service.start()
    try:
        base = f"http://127.0.0.1:{service.http_port}"
        with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            stub = pb_grpc.ExternalScalerStub(channel)
            ref = scaled_object_ref(own.url, outageHorizon="60s")
            name = stub.GetMetricSpec(ref, timeout=10).metricSpecs[0].metricName
            request = pb.GetMetricsRequest(scaledObjectRef=ref, metricName=name)
            stub.GetMetrics(request, timeout=15)
            engine = service.engine
            target = engine.get(f"shop/web/{name}")
            wait_for(lambda: target.snapshot.forecast is not None, timeout=90)
            decision_url = f"{base}/api/v1/targets/shop/web/{name}/decision"

            def served() -> float:
                return stub.GetMetrics(request, timeout=10).metricValues[0].metricValueFloat

            wait_for(lambda: served() == engine.serve(target.target_id).value, timeout=10)
            assert _scrape(base)[("web", name)] == 0.0

            own.stop()
            wait_for(lambda: target.snapshot.outage is not None, timeout=30)
            outage = target.snapshot.outage
            assert outage is not None and outage.path is not None
            lead = target.lead_steps

            def expected() -> float:
                """From a path the test predicts itself, from the same (unchanged) model."""
                _, path = engine.predict(target.target_id, outage.path.horizon, (0.95,))
                return _reference(path.quantile(0.95), path.origin.timestamp(), clock(), lead)

            # GetMetrics serves the outage plan (pushed to the front within a push or so).
            wait_for(lambda: served() == pytest.approx(expected(), rel=1e-9), timeout=10)

            decision = requests.get(decision_url, timeout=10)
            assert decision.status_code == 200
            body = decision.json()
            _conforms(body, "Decision")
            assert body["mode"] == "outage"
            began = datetime.fromtimestamp(outage.since, UTC)
            assert body["outageSince"] == began.isoformat(timespec="seconds").replace(
                "+00:00", "Z")
            assert body["planned"] == pytest.approx(expected(), rel=1e-9)
            assert body["quantile"] == 0.95
            status = requests.get(f"{base}/api/v1/targets/shop/web/{name}", timeout=10).json()
            _conforms(status, "TargetStatus")
            assert status["mode"] == "outage" and status["outageSince"] == body["outageSince"]
            assert _scrape(base)[("web", name)] == 1.0
            page = requests.get(f"{base}/", timeout=10).text
            assert 'class="badge outage"' in page and "Prometheus unreachable since" in page

            # Past outageHorizon (60 s) and the data's freshness: UNAVAILABLE, KEDA's fallback.
            clock.offset = 2 * STEP + 1
            with pytest.raises(grpc.RpcError) as caught:  # served() raises once refused
                wait_for(lambda: served() is None, timeout=10 * PUSH_SECONDS + 5,
                         every=PUSH_SECONDS / 5, what="the outage past its horizon refused")
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            details = caught.value.details()
            assert "outageHorizon is 1m" in details
            assert f"outage began at {began.isoformat(timespec='seconds')}" in details
            assert requests.get(decision_url, timeout=10).status_code == 503
            assert _scrape(base)[("web", name)] == 0.0

            # The same server again (same data dir and port): the service recovers by itself.
            own.start()
            wait_for(lambda: target.snapshot.outage is None, timeout=30)
            def forecasting() -> bool:  # stale (NotReadyError) until the history is read again
                try:
                    return engine.serve(target.target_id).mode == "forecast"
                except NotReadyError:
                    return False

            wait_for(forecasting, timeout=30, what="a forecast served again after the recovery")

            def served_now() -> float | None:  # the front hears of the recovery a push later
                try:
                    return served()
                except grpc.RpcError:
                    return None

            wait_for(lambda: served_now() == engine.serve(target.target_id).value, timeout=10)
            assert requests.get(decision_url, timeout=10).json()["mode"] == "forecast"
            assert _scrape(base)[("web", name)] == 0.0
    finally:
        service.stop()
    starts = [r for r in caplog.records if "Prometheus cannot be reached" in r.getMessage()]
    assert len(starts) == 1 and starts[0].levelno == logging.WARNING  # once per outage
    assert any(r.levelno == logging.INFO and "answers again" in r.getMessage()
               for r in caplog.records)

