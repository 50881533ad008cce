"""The live path end to end: a real Prometheus, the real service, a real gRPC client calling in
KEDA's order (GetMetricSpec, GetMetrics with the metric name, IsActive)."""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pandas as pd
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from forecaster.config import EngineSettings, Settings
from forecaster.models import fit_with_fallback
from forecaster.policy import sustained_demand
from forecaster.scaler.bridge import PUSH_SECONDS
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.series import to_grid
from forecaster.service import Service
from forecaster.sources.prometheus import PrometheusServerConfig, PrometheusSource
from tests.support.prometheus import PrometheusServer
from tests.support.rest import make_blocks
from tests.support.scaler import SECRET, Clock, refusals, scaled_object_ref, scaler_settings
from tests.support.waiting import wait_for

STEP = 300


@pytest.fixture(scope="module")
def live_blocks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_blocks(tmp_path_factory.mktemp("live"))


@pytest.fixture(scope="module")
def live_prometheus(
    live_blocks: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    with PrometheusServer(
        blocks_dir=live_blocks, workdir=tmp_path_factory.mktemp("live-prom")
    ) as server:
        yield server


@pytest.fixture
def make_service() -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def make(settings: Settings, **kwargs: object) -> Service:
        service = Service(settings, **kwargs)  # type: ignore[arg-type]
        service.start()
        started.append(service)
        return service

    yield make
    for service in started:
        service.stop()


def _stub(service: Service) -> Iterator[pb_grpc.ExternalScalerStub]:
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        yield pb_grpc.ExternalScalerStub(channel)


@pytest.fixture
def service(live_prometheus: PrometheusServer, make_service: Callable[..., Service]) -> Service:
    return make_service(scaler_settings(live_prometheus.url))


@pytest.fixture
def stub(service: Service) -> Iterator[pb_grpc.ExternalScalerStub]:
    yield from _stub(service)


def _register(stub: pb_grpc.ExternalScalerStub, ref: pb.ScaledObjectRef) -> str:
    """KEDA's first calls: GetMetricSpec names the metric from the metadata alone, and
    GetMetrics with that name registers the target with the engine. Returns the name."""
    name: str = stub.GetMetricSpec(ref, timeout=10).metricSpecs[0].metricName
    stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName=name), timeout=15)
    return name


def _expected_planned(url: str, query: str, model: str, quantile: float, horizon: int) -> float:
    """The planned load computed directly: same history from Prometheus, same model, same rule."""
    now = time.time()
    end = datetime.fromtimestamp(math.floor(now / STEP) * STEP, UTC)
    with PrometheusSource(PrometheusServerConfig(url=url)) as source:
        history = source.query_range(query, end - timedelta(days=14) + timedelta(seconds=STEP),
                                     end, STEP)
        _, current = source.query_instant(query, datetime.fromtimestamp(now, UTC))
    grid = to_grid(history, pd.Timedelta(seconds=STEP))
    fitted = fit_with_fallback(model, grid.filled, pd.Timedelta(seconds=STEP)).model
    ahead = float(fitted.predict(horizon, [quantile]).quantile(quantile)[horizon - 1])
    # The first origin's forecast is its own average; the floor is the load held over the
    # current value and the last grid point.
    return max(ahead, sustained_demand(current, float(grid.filled.iloc[-1])))


def test_keda_call_order_serves_the_planned_load(
    service: Service, stub: pb_grpc.ExternalScalerStub, live_prometheus: PrometheusServer
) -> None:
    ref = scaled_object_ref(live_prometheus.url)
    spec = stub.GetMetricSpec(ref, timeout=10)
    (metric,) = spec.metricSpecs
    assert metric.targetSizeFloat == pytest.approx(16.7)
    assert metric.targetSize == 17
    assert _register(stub, ref) == metric.metricName
    target_id = f"shop/web/{metric.metricName}"
    wait_for(lambda: service.engine.get(target_id).snapshot.forecast is not None, timeout=90)

    # The engine's process pushes a changed answer to the gRPC front within a quarter of a
    # second, and a 5-minute boundary may pass between the two computations: ask again for
    # up to 10 s before comparing.
    def served_as_expected() -> tuple[pb.MetricValue, float] | None:
        response = stub.GetMetrics(
            pb.GetMetricsRequest(scaledObjectRef=ref, metricName=metric.metricName), timeout=10
        )
        expected = _expected_planned(
            live_prometheus.url, 'sum(web_requests{job="web"})', "holt_winters", 0.9, 2
        )
        (value,) = response.metricValues
        matches = value.metricValueFloat == pytest.approx(expected, rel=1e-9)
        return (value, expected) if matches else None

    value, expected = wait_for(served_as_expected, timeout=10, every=0.2,
                               what="GetMetrics to serve the planned load")
    assert value.metricName == metric.metricName
    assert value.metricValueFloat == pytest.approx(expected, rel=1e-9)
    assert value.metricValue == math.ceil(value.metricValueFloat)
    planned = service.engine.serve(target_id)
    assert planned.mode == "forecast"
    assert planned.value >= planned.current  # the reactive floor

    assert stub.IsActive(ref, timeout=10).result is True
    quiet = scaled_object_ref(live_prometheus.url, activationValue="1000000")
    assert stub.IsActive(quiet, timeout=10).result is False


def test_default_metric_name_is_stable_across_restarts(
    live_prometheus: PrometheusServer, make_service: Callable[..., Service]
) -> None:
    names = []
    for _ in range(2):
        service = make_service(scaler_settings(live_prometheus.url))
        for stub in _stub(service):
            names.append(stub.GetMetricSpec(scaled_object_ref(live_prometheus.url), timeout=10)
                         .metricSpecs[0].metricName)
        service.stop()
    # The server, the query, and each setting that differs from its default (model here).
    digest = hashlib.sha256(
        f"{live_prometheus.url}\nsum(web_requests{{job=\"web\"}})\nmodel=holt_winters".encode()
    ).hexdigest()
    assert names == [f"fc-{digest[:12]}"] * 2


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"serverAddress": None}, "serverAddress"),
        ({"query": None}, "query"),
        ({"targetValue": None}, "targetValue"),
        ({"targetValue": "-3"}, "targetValue"),
        ({"targetValue": "lots"}, "targetValue"),
        ({"quantile": "0.3"}, "quantile"),
        ({"quantile": "1"}, "quantile"),
        ({"startupSeconds": "soon"}, "startupSeconds"),
        ({"startupSeconds": "2592000"}, "startupSeconds"),  # 30 days: over the 6 h bound
        ({"historyWindow": "999999999999w"}, "historyWindow"),  # beyond any clock
        ({"historyWindow": "2 weeks"}, "historyWindow"),
        ({"step": "0"}, "step"),
        ({"model": "prophet"}, "model"),
        ({"activationValue": "-1"}, "activationValue"),
        ({"timeZone": "Mars/Olympus"}, "timeZone"),
        ({"metricName": "bad name!"}, "metricName"),
    ],
)
def test_bad_metadata_is_invalid_argument_naming_the_key(
    stub: pb_grpc.ExternalScalerStub,
    live_prometheus: PrometheusServer,
    change: dict[str, str | None],
    key: str,
) -> None:
    ref = scaled_object_ref(live_prometheus.url)
    for name, value in change.items():
        if value is None:
            del ref.scalerMetadata[name]
        else:
            ref.scalerMetadata[name] = value
    if key == "targetValue":  # without it no metric spec can be formed
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetMetricSpec(ref, timeout=10)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert key in caught.value.details()
        name = "x"
    else:  # the spec is served, so KEDA's fallback counts the failures below
        name = stub.GetMetricSpec(ref, timeout=10).metricSpecs[0].metricName
    for error in refusals(stub, ref, name):
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert key in error.details()


@pytest.mark.parametrize(
    ("namespace", "name", "key"),
    [
        ("shop", "web\nlevel=ERROR forged line", "scaledObjectRef.name"),
        ("shop", "w" * 200_000, "scaledObjectRef.name"),
        ("Shop", "web", "scaledObjectRef.namespace"),
    ],
)
def test_an_object_ref_kubernetes_would_refuse_is_invalid_argument(
    service: Service, stub: pb_grpc.ExternalScalerStub, live_prometheus: PrometheusServer,
    namespace: str, name: str, key: str,
) -> None:
    ref = scaled_object_ref(live_prometheus.url)
    ref.namespace, ref.name = namespace, name
    metric = stub.GetMetricSpec(ref, timeout=10).metricSpecs[0].metricName
    for error in refusals(stub, ref, metric):
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = error.details()
        assert details.startswith(f"{key}: must be a DNS-1123 "), details[:200]
        assert "\n" not in details and len(details) < 400  # no forged line, no echoed name
    assert len(service.engine) == 0  # never a target, so never a log line or a label
    scraped = requests.get(f"http://127.0.0.1:{service.http_port}/metrics", timeout=10).text
    assert "forged" not in scraped and "w" * 300 not in scraped


def test_a_trigger_over_the_memory_budget_keeps_its_metric_spec_and_is_refused_by_name(
    service: Service, stub: pb_grpc.ExternalScalerStub, live_prometheus: PrometheusServer
) -> None:
    ref = scaled_object_ref(live_prometheus.url, step="10s", historyWindow="1d",
                            startupSeconds="3600")
    # GetMetricSpec answers from the metadata alone, so that KEDA's fallback counts the
    # refusals of the reads below.
    name = stub.GetMetricSpec(ref, timeout=10).metricSpecs[0].metricName
    for error in refusals(stub, ref, name):
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = error.details()
        assert details.startswith("startupSeconds: this trigger would hold about "), details
        assert "over the 32 MiB a target may hold (targetMemoryBytes)" in details
        assert "lower startupSeconds (now '3600') or raise step (now '10s')" in details
    assert len(service.engine) == 0  # refused before it was registered


def test_unconfigured_server_address_is_refused(
    stub: pb_grpc.ExternalScalerStub, live_prometheus: PrometheusServer
) -> None:
    ref = scaled_object_ref("http://127.0.0.1:1")
    name = stub.GetMetricSpec(ref, timeout=10).metricSpecs[0].metricName
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName=name), timeout=10)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "serverAddress" in caught.value.details()
    assert "not a configured Prometheus server" in caught.value.details()


def test_wrong_metric_name_is_invalid_argument(
    stub: pb_grpc.ExternalScalerStub, live_prometheus: PrometheusServer
) -> None:
    ref = scaled_object_ref(live_prometheus.url)
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName="s0-other"),
                        timeout=10)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "metricName" in caught.value.details()


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("multi_requests", ["sum("]),  # several series: says to aggregate
        ('absent_requests{job="none"}', ["absent_requests"]),  # none: names the query
        ('sum(nan_requests{job="nan"})', ["NaN"]),
        # a load below zero is a broken query: never planned on, never active
        ('sum(web_requests{job="web"}) * 0 - 13', ["-13", "negative", "clamp_min"]),
    ],
)
def test_unusable_query_results_are_unavailable_with_the_reason(
    service: Service, stub: pb_grpc.ExternalScalerStub, live_prometheus: PrometheusServer,
    query: str, words: list[str],
) -> None:
    ref = scaled_object_ref(live_prometheus.url, query=query)
    name = stub.GetMetricSpec(ref, timeout=10).metricSpecs[0].metricName
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName=name), timeout=20)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    for word in words:
        assert word in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.IsActive(ref, timeout=20)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    if "negative" in words or "NaN" in words:  # a refused current value: counted, never served
        reason = "negative" if "negative" in words else "not_finite"
        assert (service.registry.get_sample_value("forecaster_points_refused_total",
                                                  {"reason": reason}) or 0) >= 1
        target = service.engine.get(f"shop/web/{name}")
        assert target.snapshot.forecast is None and len(target.buffer) == 0


def test_a_negative_point_in_history_is_a_gap_and_the_target_still_forecasts(
    service: Service, stub: pb_grpc.ExternalScalerStub, live_prometheus: PrometheusServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One grid point an hour back evaluates a million below zero; every other is the series.
    bad_at = math.floor(time.time() / STEP) * STEP - 12 * STEP
    query = f'sum(web_requests{{job="web"}}) - 1e6 * (time() == bool {bad_at})'
    ref = scaled_object_ref(live_prometheus.url, query=query)
    with caplog.at_level(logging.WARNING, logger="forecaster.sources.prometheus"):
        name = _register(stub, ref)
        target = service.engine.get(f"shop/web/{name}")
        wait_for(lambda: target.snapshot.forecast is not None, timeout=90,
                 what="the forecast of the target with one negative point")
    response = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName=name),
                               timeout=10)
    (value,) = response.metricValues
    assert value.metricValueFloat >= 0
    assert service.engine.serve(target.target_id).mode == "forecast"
    history = target.buffer.series()
    bad_bin = pd.Timestamp(bad_at, unit="s", tz="UTC")
    assert bad_bin in history.index and history.min() >= 0  # a gap (held), never the value
    assert history[bad_bin] == history[bad_bin - pd.Timedelta(seconds=STEP)]
    refused = service.registry.get_sample_value("forecaster_points_refused_total",
                                                {"reason": "negative"})
    assert refused == 1
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "forecaster.sources.prometheus" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and bad_bin.strftime("%Y-%m-%dT%H:%M:%S") in warnings[0]
    assert "sum(web_requests" in warnings[0] and "negative" in warnings[0]


def test_a_long_query_prometheus_rejects_is_quoted_by_its_ends_only(
    stub: pb_grpc.ExternalScalerStub, live_prometheus: PrometheusServer
) -> None:
    # Within the 8 KiB bound, but a syntax error: the refusal shows the query's two ends.
    query = 'sum(web_requests{job="web"})' + " + 0" * 2_000 + " + ("
    assert len(query.encode()) <= 8_192
    ref = scaled_object_ref(live_prometheus.url, query=query)
    name = stub.GetMetricSpec(ref, timeout=10).metricSpecs[0].metricName
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName=name), timeout=20)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    details = caught.value.details()
    assert "rejected query 'sum(web_requests" in details and "+ (" in details
    assert len(details) < 1_000 and " + 0" * 100 not in details


def test_prometheus_stopped_serves_last_good_forecast_while_fresh_then_unavailable(
    live_blocks: Path,
    make_service: Callable[..., Service],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # A server of this test's own, over the same data, that it may stop.
    own = PrometheusServer(blocks_dir=live_blocks, workdir=tmp_path / "own")
    with own:
        clock = Clock()
        service = make_service(scaler_settings(own.url), clock=clock)
        for stub in _stub(service):
            ref = scaled_object_ref(own.url, outageHorizon="0")  # no outage forecast
            name = _register(stub, ref)
            target = service.engine.get(f"shop/web/{name}")
            wait_for(lambda: target.snapshot.forecast is not None, timeout=90)  # noqa: B023
            request = pb.GetMetricsRequest(scaledObjectRef=ref, metricName=name)

            def served() -> float:
                return stub.GetMetrics(request, timeout=10).metricValues[0].metricValueFloat  # noqa: B023

            # the engine pushes the new answer to the gRPC front within a push interval
            wait_for(lambda: served() == service.engine.serve(target.target_id).value,  # noqa: B023
                      timeout=10)
            before = served()

            own.stop()
            failures = target.refresh_failures
            wait_for(lambda: target.refresh_failures > failures, timeout=30)  # noqa: B023
            assert served() == before  # the last good forecast, while fresh

            clock.offset = 2 * STEP + 1  # past max(2 x refresh, 2 x step)
            with pytest.raises(grpc.RpcError) as caught:  # served() raises once refused
                wait_for(lambda: served() is None, timeout=10 * PUSH_SECONDS,
                         every=PUSH_SECONDS / 5, what="the stale answer refused")
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "freshness" in caught.value.details()
            assert SECRET not in caught.value.details()
    assert "refresh of" in caplog.text  # the failure was logged ...
    assert SECRET not in caplog.text  # ... without the credentials


def test_new_target_answers_reactively_until_its_first_fit(
    live_prometheus: PrometheusServer, make_service: Callable[..., Service]
) -> None:
    # The only fit worker is kept busy, so the new target has no model yet.
    busy, release = ThreadPoolExecutor(1), threading.Event()
    busy.submit(release.wait, 30)
    service = make_service(scaler_settings(live_prometheus.url), fit_pool=busy)
    try:
        for stub in _stub(service):
            ref = scaled_object_ref(live_prometheus.url)
            name = stub.GetMetricSpec(ref, timeout=10).metricSpecs[0].metricName
            value = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName=name),
                                    timeout=15).metricValues[0]
            with PrometheusSource(PrometheusServerConfig(url=live_prometheus.url)) as source:
                _, current = source.query_instant('sum(web_requests{job="web"})')
            assert value.metricValueFloat == pytest.approx(current)
            assert service.engine.serve(f"shop/web/{name}").mode == "reactive"
    finally:
        release.set()
        busy.shutdown(wait=False, cancel_futures=True)


def test_stream_is_active_sends_at_once_and_ends_when_the_client_goes(
    service: Service, stub: pb_grpc.ExternalScalerStub, live_prometheus: PrometheusServer
) -> None:
    stream = stub.StreamIsActive(scaled_object_ref(live_prometheus.url), timeout=30)
    began = time.monotonic()
    first = next(stream)
    assert first.result is True
    assert time.monotonic() - began < 15
    stream.cancel()
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    assert caught.value.code() is grpc.StatusCode.CANCELLED


def test_health_service_reports_serving(service: Service) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "externalscaler.ExternalScaler"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_dry_run_serves_the_current_load_and_keeps_the_decision(
    live_prometheus: PrometheusServer, make_service: Callable[..., Service]
) -> None:
    base = scaler_settings(live_prometheus.url)
    settings = Settings(
        engine=EngineSettings(refresh_seconds=1.0, fit_workers=1, first_value_wait_seconds=10.0,
                              dry_run=True),
        servers=base.servers, grpc_port=0, http_port=0, host="127.0.0.1",
    )
    service = make_service(settings)
    for stub in _stub(service):
        ref = scaled_object_ref(live_prometheus.url)
        name = _register(stub, ref)
        target = service.engine.get(f"shop/web/{name}")
        wait_for(lambda: target.snapshot.forecast is not None, timeout=90)  # noqa: B023
        served = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName=name),
                                 timeout=10).metricValues[0].metricValueFloat
        decision = target.snapshot.planned
        assert decision is not None and decision.mode == "forecast"
        assert served == pytest.approx(decision.current)
        assert service.engine.serve(target.target_id).mode == "dry_run"
