"""The REST API over real HTTP: a real Prometheus, the real Service on port 0, targets registered
from the config file and by a gRPC GetMetricSpec call (as KEDA's first call does).

The service here has an apiToken and allows queries, so every call carries the token; who may
call what, and the defaults, are tested in tests/test_api_security.py."""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
import requests
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_spec

from forecaster.api import render
from forecaster.api.inputs import MAX_POINTS
from forecaster.api.openapi import PAGE_PATHS, openapi_document
from forecaster.api.routes import ADHOC_KEY
from forecaster.config import ConfiguredTarget
from forecaster.models import fit_with_fallback
from forecaster.models.selection import DEFAULT_CANDIDATES
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.series import to_grid
from forecaster.service import Service
from forecaster.sources.prometheus import PrometheusServerConfig, PrometheusSource
from forecaster.target import BAND_QUANTILES
from tests.support.prometheus import PrometheusServer
from tests.support.rest import (
    CLOSED_SERVER,
    MULTI_QUERY,
    NAN_QUERY,
    STEP,
    WEB_QUERY,
    assert_error,
    make_blocks,
    metadata,
    settings,
    strict_json,
)
from tests.support.waiting import wait_for

WEB = "shop/web/web-rps"  # configured
API = "shop/api/api-rps"  # registered over gRPC
NAN = "shop/nan/nan-rps"  # registered over gRPC; its query returns NaN, so it never has data
SLASH = "shop/team/web/slash"  # configured, with a slash in its name
TOKEN = "rest-t0ken-do-not-log"


@pytest.fixture(scope="module")
def rest_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    root = tmp_path_factory.mktemp("rest")
    with PrometheusServer(blocks_dir=make_blocks(root), workdir=root / "prom") as server:
        yield server


def _register(service: Service, namespace: str, name: str, meta: dict[str, str]) -> str:
    """KEDA's first calls: GetMetricSpec names the metric, IsActive registers the target;
    returns its metric name."""
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = pb_grpc.ExternalScalerStub(channel)
        ref = pb.ScaledObjectRef(namespace=namespace, name=name, scalerMetadata=meta)
        metric = str(stub.GetMetricSpec(ref, timeout=10).metricSpecs[0].metricName)
        with contextlib.suppress(grpc.RpcError):  # registered even when it has no value yet
            stub.IsActive(ref, timeout=20)
        return metric


@pytest.fixture(scope="module")
def service(rest_prometheus: PrometheusServer) -> Iterator[Service]:
    url = rest_prometheus.url
    configured = (
        ConfiguredTarget("shop", "web", metadata(url)),
        ConfiguredTarget("shop", "team/web", metadata(url, model="naive", metricName="slash")),
    )
    service = Service(settings(url, targets=configured, api_token=TOKEN, allow_queries=True))
    service.start()
    try:
        _register(service, "shop", "api", metadata(url, model="seasonal_naive",
                                                   metricName="api-rps"))
        _register(service, "shop", "nan", metadata(url, query=NAN_QUERY, metricName="nan-rps"))
        for tid in (WEB, API, SLASH):
            wait_for(lambda tid=tid: service.engine.get(tid).snapshot.forecast is not None,
                     timeout=90)
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        yield session


@pytest.fixture
def call(service: Service, http: requests.Session) -> Callable[..., requests.Response]:
    base = f"http://127.0.0.1:{service.http_port}"

    def call(method: str, path: str, **kwargs: Any) -> requests.Response:
        return http.request(method, f"{base}{path}", timeout=60, **kwargs)

    return call


def _conforms(body: Any, schema: str) -> None:
    """`body` is valid against the OpenAPI document's component `schema`."""
    document = openapi_document()
    root = {"$ref": f"#/components/schemas/{schema}", "components": document["components"]}
    OAS30Validator(root).validate(body)


def _path(tid: str, suffix: str = "") -> str:
    return f"/api/v1/targets/{tid}{suffix}"


def _iso(stamp: pd.Timestamp) -> str:
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- probes ---------------------------------------------------------------------------------


def test_healthz_and_readyz_answer_200_once_configured_targets_have_data(
    call: Callable[..., requests.Response],
) -> None:
    assert strict_json(call("GET", "/healthz")) == {"status": "ok"}
    ready = call("GET", "/readyz")
    assert ready.status_code == 200
    assert strict_json(ready) == {"status": "ready", "configuredTargets": 2}


def test_readyz_stays_200_while_a_configured_target_has_no_data(
    rest_prometheus: PrometheusServer,
) -> None:
    """Readiness is the gRPC scaler's, not Prometheus': a pod taken out of the Service for bad
    data would leave KEDA's GetMetricSpec unanswered, and then no fallback applies."""
    url = rest_prometheus.url
    broken = ConfiguredTarget("shop", "nan", metadata(url, query=NAN_QUERY, metricName="nan-rps"))
    service = Service(settings(url, targets=(broken,)))
    service.start()
    try:
        target = service.engine.get(NAN)
        wait_for(lambda: target.refresh_failures > 0, timeout=30)
        response = requests.get(f"http://127.0.0.1:{service.http_port}/readyz", timeout=10)
        assert response.status_code == 200, response.text
        metric = requests.get(f"http://127.0.0.1:{service.http_port}{_path(NAN, '/metric')}",
                              timeout=10)
        error = assert_error(metric, 503, "unavailable")  # the target itself says why
        assert "NaN" in error["message"]
    finally:
        service.stop()


# -- targets --------------------------------------------------------------------------------


def test_list_targets_reports_status_of_every_target(
    call: Callable[..., requests.Response], service: Service
) -> None:
    body = strict_json(call("GET", "/api/v1/targets"))
    _conforms(body, "TargetList")
    by_id = {target["id"]: target for target in body["targets"]}
    assert set(by_id) == {WEB, API, NAN, SLASH}
    assert (by_id[SLASH]["name"], by_id[SLASH]["metric"]) == ("team/web", "slash")
    web = by_id[WEB]
    assert (web["namespace"], web["name"], web["metric"]) == ("shop", "web", "web-rps")
    assert web["configured"] is True and by_id[API]["configured"] is False
    assert web["model"] == "holt_winters" and web["requestedModel"] == "holt_winters"
    assert by_id[API]["model"] == "seasonal_naive"
    assert web["mode"] == "forecast"
    assert web["fresh"] is True
    assert 0 <= web["ageSeconds"] <= web["freshnessLimitSeconds"] == 2 * STEP
    assert web["fits"]["count"] >= 1 and web["fits"]["failures"] == 0
    assert web["fits"]["lastFitSeconds"] > 0
    assert datetime.fromisoformat(web["lastFit"]) <= datetime.now(UTC) + timedelta(seconds=1)
    assert web["lastError"] is None
    assert web["accuracy"]["scored"] >= 0
    assert web["spec"]["targetValue"] == pytest.approx(16.7)
    assert web["historyPoints"] > 3000
    nan = by_id[NAN]
    assert nan["mode"] is None and nan["fresh"] is False and nan["ageSeconds"] is None
    assert "NaN" in nan["lastError"]
    assert nan["fits"]["refreshFailures"] >= 1


def test_get_one_target(call: Callable[..., requests.Response]) -> None:
    body = strict_json(call("GET", _path(API)))
    _conforms(body, "TargetStatus")
    assert body["id"] == API and body["model"] == "seasonal_naive"


def test_a_configured_name_with_a_slash_is_addressable(
    call: Callable[..., requests.Response],
) -> None:
    assert strict_json(call("GET", _path(SLASH)))["name"] == "team/web"
    assert strict_json(call("GET", _path(SLASH, "/forecast")))["target"] == SLASH
    assert strict_json(call("GET", _path(SLASH, "/metric")))["metricName"] == "slash"


def test_unknown_target_is_404_on_every_target_route(
    call: Callable[..., requests.Response],
) -> None:
    for suffix in ("", "/forecast", "/decision", "/metric"):
        error = assert_error(call("GET", _path("shop/none/x", suffix)), 404, "not_found")
        assert "shop/none/x" in error["message"]


# -- forecasts of a target ------------------------------------------------------------------


def test_forecast_defaults_to_the_published_snapshot(
    call: Callable[..., requests.Response], service: Service
) -> None:
    target = service.engine.get(WEB)
    for _ in range(3):  # a refresh may publish a new snapshot between the two reads
        body = strict_json(call("GET", _path(WEB, "/forecast")))
        published = target.snapshot.forecast
        assert published is not None
        if body["origin"] == _iso(published.origin):
            break
    _conforms(body, "TargetForecast")
    assert body["target"] == WEB and body["model"] == "holt_winters"
    assert body["horizon"] == 1 + target.lead_steps == len(body["points"]) == 2
    assert body["quantiles"] == sorted({*BAND_QUANTILES, 0.9})
    assert body["stepSeconds"] == STEP and body["fresh"] is True
    for i, point in enumerate(body["points"]):
        assert point["timestamp"] == _iso(published.timestamps[i])
        assert point["mean"] == pytest.approx(published.mean[i])
        for q in body["quantiles"]:
            assert point["quantiles"][repr(q)] == pytest.approx(published.quantile(q)[i])


def test_longer_forecast_is_predicted_from_the_model(
    call: Callable[..., requests.Response], service: Service
) -> None:
    target = service.engine.get(WEB)
    params = {"horizon": "288", "quantiles": "0.5,0.99"}
    for _ in range(3):
        body = strict_json(call("GET", _path(WEB, "/forecast"), params=params))
        with target.lock:
            model = copy.deepcopy(target.model)
        assert model is not None
        expected = model.predict(288, [0.5, 0.99])
        if body["origin"] == _iso(expected.origin):
            break
    _conforms(body, "TargetForecast")
    assert body["horizon"] == 288 and len(body["points"]) == 288
    assert body["quantiles"] == [0.5, 0.99]
    stamps = [datetime.fromisoformat(point["timestamp"]) for point in body["points"]]
    assert all(b - a == timedelta(seconds=STEP) for a, b in itertools.pairwise(stamps))
    got = np.array([[p["mean"], p["quantiles"]["0.5"], p["quantiles"]["0.99"]]
                    for p in body["points"]])
    np.testing.assert_allclose(got[:, 0], expected.mean, rtol=1e-9)
    np.testing.assert_allclose(got[:, 1], expected.quantile(0.5), rtol=1e-9)
    np.testing.assert_allclose(got[:, 2], expected.quantile(0.99), rtol=1e-9)
    assert (got[:, 2] >= got[:, 1]).all()
    # The longest horizon allowed: 7 days of 5-minute steps.
    assert call("GET", _path(API, "/forecast"), params={"horizon": "2016"}).status_code == 200


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"horizon": "0"}, "horizon"),
        ({"horizon": "2017"}, "horizon"),  # over 7 days of 5-minute steps
        ({"horizon": "ten"}, "horizon"),
        ({"horizon": "-1"}, "horizon"),
        ({"quantiles": "1.5"}, "quantiles"),
        ({"quantiles": "0"}, "quantiles"),
        ({"quantiles": "0.5,,0.9"}, "quantiles"),
        ({"quantiles": ",".join(f"0.{i}" for i in range(1, 10)) + ",0.95"}, "quantiles"),
    ],
)
def test_bad_forecast_parameters_are_400_naming_the_parameter(
    call: Callable[..., requests.Response], params: dict[str, str], field: str
) -> None:
    assert_error(call("GET", _path(WEB, "/forecast"), params=params), 400, "invalid_argument",
                 field)


def test_forecast_of_a_target_without_data_is_503_with_retry_after(
    call: Callable[..., requests.Response],
) -> None:
    response = call("GET", _path(NAN, "/forecast"))
    error = assert_error(response, 503, "unavailable")
    assert "NaN" in error["message"]
    assert int(response.headers["Retry-After"]) >= 1


def test_longer_forecasts_beyond_the_slots_are_503(
    call: Callable[..., requests.Response], service: Service
) -> None:
    slots = service.app.extensions["forecaster.api"].forecast_slots
    taken = [slots.acquire(blocking=False) for _ in range(2)]
    try:
        assert all(taken)
        response = call("GET", _path(WEB, "/forecast"), params={"horizon": "100"})
        assert_error(response, 503, "unavailable")
        # The published horizon needs no slot.
        assert call("GET", _path(WEB, "/forecast")).status_code == 200
    finally:
        for _ in taken:
            slots.release()


# -- decision and the KEDA metric -----------------------------------------------------------


def test_decision_shows_the_numbers_and_the_hpa_arithmetic(
    call: Callable[..., requests.Response],
) -> None:
    body = strict_json(call("GET", _path(WEB, "/decision")))
    _conforms(body, "Decision")
    assert body["mode"] == "forecast" and body["quantile"] == 0.9
    assert body["planned"] == pytest.approx(max(body["smoothedForecast"], body["floor"]))
    assert body["floored"] == (body["floor"] > body["smoothedForecast"])
    assert body["floor"] <= body["current"]  # the lower of the current and the last point
    assert body["targetValuePerReplica"] == pytest.approx(16.7)
    assert body["recommendation"] == math.ceil(body["planned"] / 16.7 - 1e-12)
    assert body["replicas"] == body["recommendation"] and body["limitedBy"] is None
    assert body["recommendation"] > 1  # the trace's load needs several replicas

    bounded = strict_json(call("GET", _path(WEB, "/decision"), params={"minReplicas": "500"}))
    assert (bounded["replicas"], bounded["limitedBy"]) == (500, "minReplicas")
    capped = strict_json(call("GET", _path(WEB, "/decision"), params={"maxReplicas": "1"}))
    assert (capped["replicas"], capped["limitedBy"]) == (1, "maxReplicas")

    # Within the HPA's 10% tolerance of currentReplicas, the count holds.
    near = math.floor(body["planned"] / 16.7 / 0.95)
    held = strict_json(call("GET", _path(WEB, "/decision"),
                            params={"currentReplicas": str(near)}))
    if abs(held["planned"] / (near * 16.7) - 1) <= 0.1:
        assert held["recommendation"] == held["replicas"] == near


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"minReplicas": "-1"}, "minReplicas"),
        ({"maxReplicas": "0"}, "maxReplicas"),
        ({"minReplicas": "5", "maxReplicas": "4"}, "maxReplicas"),
        ({"currentReplicas": "2.5"}, "currentReplicas"),
    ],
)
def test_bad_decision_parameters_are_400_naming_the_parameter(
    call: Callable[..., requests.Response], params: dict[str, str], field: str
) -> None:
    assert_error(call("GET", _path(WEB, "/decision"), params=params), 400, "invalid_argument",
                 field)


@pytest.mark.parametrize(
    ("suffix", "query", "field", "says"),
    [
        ("/forecast", "quantile=0.5&Horizon=50", "quantile", "it takes horizon, quantiles"),
        ("/decision", "maxReplica=2", "maxReplica",
         "it takes currentReplicas, maxReplicas, minReplicas"),
        ("/decision", "maxReplicas=2&maxReplicas=100", "maxReplicas", "given 2 times"),
        ("/forecast", "quantiles=0.5&quantiles=0.9", "quantiles", "quantiles=0.5,0.9"),
        ("", "verbose=1", "verbose", "it takes no query parameters"),
        ("/metric", "value=1", "value", "it takes no query parameters"),
        ("/plot.png", "t=1", "t", "it takes no query parameters"),
    ],
)
def test_unknown_and_repeated_query_parameters_are_400_naming_them(
    call: Callable[..., requests.Response], suffix: str, query: str, field: str, says: str
) -> None:
    response = call("GET", f"{_path(WEB, suffix)}?{query}")
    error = assert_error(response, 400, "invalid_argument", field)
    assert says in error["message"], error


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/api/v1/targets"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/"),
     ("GET", "/metrics"), ("GET", "/openapi.json"), ("POST", "/api/v1/forecast"),
     ("HEAD", "/api/v1/targets")],
)
def test_every_route_refuses_a_query_parameter_it_does_not_take(
    call: Callable[..., requests.Response], method: str, path: str
) -> None:
    response = call(method, f"{path}?horizn=5", json={"series": _points(_daily(50))})
    assert response.status_code == 400, (response.status_code, response.text)
    if method != "HEAD":
        assert_error(response, 400, "invalid_argument", "horizn")


def test_metric_is_the_planned_load_for_keda_metrics_api(
    call: Callable[..., requests.Response], service: Service
) -> None:
    for _ in range(3):
        body = strict_json(call("GET", _path(WEB, "/metric")))
        served = service.engine.serve(WEB)
        if body["value"] == pytest.approx(served.value):
            break
    _conforms(body, "MetricValue")
    assert body["value"] == pytest.approx(served.value)  # KEDA: valueLocation: value
    assert body["target"] == pytest.approx(16.7)
    assert body["mode"] == "forecast" and body["active"] is True
    assert body["metricName"] == "web-rps"


def test_decision_and_metric_without_fresh_data_are_503(
    call: Callable[..., requests.Response],
) -> None:
    for suffix in ("/decision", "/metric"):
        response = call("GET", _path(NAN, suffix))
        assert "NaN" in assert_error(response, 503, "unavailable")["message"]


def test_a_target_before_its_first_fit_is_reactive(rest_prometheus: PrometheusServer) -> None:
    busy, release = ThreadPoolExecutor(1), threading.Event()  # the only fit worker stays
    busy.submit(release.wait, 30)  # busy: no model yet
    service = Service(settings(rest_prometheus.url), fit_pool=busy)
    service.start()
    try:
        _register(service, "shop", "web", metadata(rest_prometheus.url))
        base = f"http://127.0.0.1:{service.http_port}"
        metric = strict_json(requests.get(f"{base}{_path(WEB, '/metric')}", timeout=20))
        with PrometheusSource(PrometheusServerConfig(url=rest_prometheus.url)) as source:
            _, current = source.query_instant(WEB_QUERY)
        assert metric["mode"] == "reactive" and metric["value"] == pytest.approx(current)
        decision = strict_json(requests.get(f"{base}{_path(WEB, '/decision')}", timeout=20))
        assert decision["mode"] == "reactive" and decision["forecastAtQuantile"] is None
        _conforms(decision, "Decision")
        status = strict_json(requests.get(f"{base}{_path(WEB)}", timeout=20))
        assert status["mode"] == "reactive" and status["model"] is None
        response = requests.get(f"{base}{_path(WEB, '/forecast')}", timeout=20)
        assert "reactively" in assert_error(response, 503, "unavailable")["message"]
    finally:
        service.stop()
        release.set()
        busy.shutdown(wait=False, cancel_futures=True)


# -- ad-hoc forecasts -----------------------------------------------------------------------


def _points(values: np.ndarray, start: str = "2024-05-01T00:00:00Z",
            step: str = "5min") -> list[dict[str, Any]]:
    stamps = pd.date_range(start, periods=len(values), freq=step)
    return [{"timestamp": _iso(t), "value": float(v)} for t, v in zip(stamps, values, strict=True)]


def _daily(n: int) -> np.ndarray:
    steps = np.arange(n)
    return 100 + 50 * np.sin(2 * np.pi * steps / 288) + (steps % 7)


def test_adhoc_forecast_of_inline_points_matches_a_direct_fit(
    call: Callable[..., requests.Response],
) -> None:
    values = _daily(600)
    body = {"series": _points(values), "step": "5m", "horizon": 12, "quantiles": [0.5, 0.9],
            "model": "seasonal_naive"}
    answer = strict_json(call("POST", "/api/v1/forecast", json=body))
    _conforms(answer, "AdhocForecast")
    history = pd.Series(values, index=pd.date_range("2024-05-01", periods=600, freq="5min",
                                                    tz="UTC"))
    step = pd.Timedelta("5min")
    expected = fit_with_fallback("seasonal_naive", to_grid(history, step).filled, step,
                                 quantile=0.9, horizon=2).model.predict(12, [0.5, 0.9])
    assert answer["model"] == "seasonal_naive" and answer["fellBack"] is False
    assert answer["historyPoints"] == 600 and answer["horizon"] == 12
    assert answer["points"][0]["timestamp"] == _iso(history.index[-1] + step)
    np.testing.assert_allclose([p["mean"] for p in answer["points"]], expected.mean)
    np.testing.assert_allclose([p["quantiles"]["0.9"] for p in answer["points"]],
                               expected.quantile(0.9))


def test_adhoc_forecast_falls_back_and_says_why(call: Callable[..., requests.Response]) -> None:
    body = {"series": _points(_daily(50)), "model": "holt_winters", "horizon": 3}
    answer = strict_json(call("POST", "/api/v1/forecast", json=body))
    assert answer["fellBack"] is True and answer["model"] == "naive"
    assert [f["model"] for f in answer["failures"]] == ["holt_winters", "seasonal_naive"]
    assert "history" in answer["failures"][0]["reason"]


def test_adhoc_auto_forecast_names_the_model_it_chose(
    call: Callable[..., requests.Response],
) -> None:
    body = {"series": _points(_daily(3 * 288)), "model": "auto", "horizon": 3}
    answer = strict_json(call("POST", "/api/v1/forecast", json=body))
    assert answer["requestedModel"] == "auto" and answer["fellBack"] is False
    assert answer["model"] in DEFAULT_CANDIDATES, answer["model"]


@pytest.mark.parametrize(
    ("stamps", "step"),
    [
        # Five one-minute points in each 5-minute step: averaged into one value per step.
        (pd.date_range("2024-05-01", periods=400, freq="1min", tz="UTC"), "5m"),
        # Every 5 minutes, with two single steps missing: each holds the value before it.
        (pd.date_range("2024-05-01", periods=300, freq="5min", tz="UTC").delete([100, 200]),
         "5m"),
    ],
)
def test_adhoc_forecast_counts_the_points_received_averaged_and_filled(
    call: Callable[..., requests.Response], stamps: pd.DatetimeIndex, step: str
) -> None:
    values = np.arange(len(stamps), dtype=float)
    body = {"series": [{"timestamp": _iso(t), "value": v} for t, v in zip(stamps, values,
                                                                          strict=True)],
            "step": step, "model": "naive", "horizon": 2}
    answer = strict_json(call("POST", "/api/v1/forecast", json=body))
    _conforms(answer, "AdhocForecast")
    step_delta = pd.Timedelta(step.replace("m", "min"))
    steps = (stamps[-1] - stamps[0]) // step_delta + 1
    occupied = len(set(stamps.floor(step_delta)))
    assert answer["pointsReceived"] == len(stamps)
    assert answer["historyPoints"] == steps
    assert answer["pointsFilled"] == steps - occupied
    description = openapi_document()["components"]["schemas"]["SeriesForecastRequest"][
        "properties"]["series"]["description"]
    assert "averaged" in description and "last value" in description


def test_adhoc_forecast_of_a_query_on_a_configured_server(
    call: Callable[..., requests.Response], rest_prometheus: PrometheusServer
) -> None:
    body = {"serverAddress": rest_prometheus.url, "query": WEB_QUERY, "step": 300,
            "historyWindow": "3d", "horizon": 6, "quantiles": [0.9], "model": "holt_winters"}
    for _ in range(3):  # a 5-minute boundary may pass between the two computations
        answer = strict_json(call("POST", "/api/v1/forecast", json=body))
        end = datetime.fromtimestamp(math.floor(time.time() / STEP) * STEP, UTC)
        with PrometheusSource(PrometheusServerConfig(url=rest_prometheus.url)) as source:
            history = source.query_range(WEB_QUERY, end - timedelta(days=3, seconds=-STEP), end,
                                         STEP)
        step = pd.Timedelta(seconds=STEP)
        expected = fit_with_fallback("holt_winters", to_grid(history, step).filled, step,
                                     quantile=0.9, horizon=2).model.predict(6, [0.9])
        if answer["origin"] == _iso(expected.origin):
            break
    _conforms(answer, "AdhocForecast")
    assert answer["model"] == "holt_winters" and answer["historyPoints"] == 864
    np.testing.assert_allclose([p["quantiles"]["0.9"] for p in answer["points"]],
                               expected.quantile(0.9), rtol=1e-9)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([1, 2], "body"),
        ({}, "series"),
        ({"series": "x"}, "series"),
        ({"series": []}, "series"),
        ({"series": [{"timestamp": "2024-05-01T00:00:00Z"}]}, "series[0]"),
        ({"series": [{"timestamp": "yesterday", "value": 1}]}, "series[0].timestamp"),
        ({"series": [{"timestamp": 1714521600, "value": 1}]}, "series[0].timestamp"),
        ({"series": [{"timestamp": "2024-05-01T00:00:00Z", "value": -1}]}, "series[0].value"),
        ({"series": [{"timestamp": "2024-05-01T00:00:00Z", "value": "1"}]}, "series[0].value"),
        ({"series": [{"timestamp": "2024-05-01T00:05:00Z", "value": 1},
                     {"timestamp": "2024-05-01T00:00:00Z", "value": 1}]}, "series[1].timestamp"),
        ({"series": _points(_daily(20)), "horizon": 0}, "horizon"),
        ({"series": _points(_daily(20)), "horizon": 2017}, "horizon"),
        ({"series": _points(_daily(20)), "horizon": True}, "horizon"),
        ({"series": _points(_daily(20)), "step": "5 minutes"}, "step"),
        ({"series": _points(_daily(20)), "step": "2d"}, "step"),
        ({"series": _points(_daily(20)), "quantiles": [1.0]}, "quantiles"),
        ({"series": _points(_daily(20)), "quantiles": "0.9"}, "quantiles"),
        ({"series": _points(_daily(20)), "model": "prophet"}, "model"),
        ({"series": _points(_daily(20)), "query": "up"}, "query"),
        ({"series": _points(_daily(20)), "colour": "red"}, "colour"),
        ({"serverAddress": "http://127.0.0.1:9", "query": "up"}, "serverAddress"),
        ({"serverAddress": CLOSED_SERVER}, "query"),
        ({"serverAddress": CLOSED_SERVER, "query": " "}, "query"),
        ({"serverAddress": CLOSED_SERVER, "query": "up", "historyWindow": "30m"}, "historyWindow"),
        ({"serverAddress": CLOSED_SERVER, "query": "up", "historyWindow": "100d"},
         "historyWindow"),
    ],
)
def test_bad_adhoc_bodies_are_400_naming_the_field(
    call: Callable[..., requests.Response], body: Any, field: str
) -> None:
    assert_error(call("POST", "/api/v1/forecast", json=body), 400, "invalid_argument", field)


def test_adhoc_body_that_is_not_json_is_400(call: Callable[..., requests.Response]) -> None:
    response = call("POST", "/api/v1/forecast", data=b"{not json",
                    headers={"Content-Type": "application/json"})
    assert_error(response, 400, "invalid_argument", "body")


def test_adhoc_limits_are_413(call: Callable[..., requests.Response]) -> None:
    huge = b'{"series": [' + b'{"timestamp": "2024-05-01T00:00:00Z", "value": 1},' * 50_000
    assert_error(call("POST", "/api/v1/forecast", data=huge,
                      headers={"Content-Type": "application/json"}),
                 413, "payload_too_large", "body")
    many = {"series": [{"timestamp": "2024-05-01T00:00:00Z", "value": 1}] * (MAX_POINTS + 1)}
    assert_error(call("POST", "/api/v1/forecast", json=many), 413, "payload_too_large", "series")
    wide = {"series": _points(np.ones(2), step="365D"), "step": "1m"}  # 2 points, 525,601 steps
    assert_error(call("POST", "/api/v1/forecast", json=wide), 413, "payload_too_large", "series")


def test_adhoc_series_too_short_for_any_model_is_422(
    call: Callable[..., requests.Response],
) -> None:
    body = {"series": _points(np.ones(1)), "model": "naive"}
    error = assert_error(call("POST", "/api/v1/forecast", json=body), 422, "unprocessable",
                         "series")
    assert "needs at least" in error["message"]


@pytest.mark.parametrize(("query", "word"), [(MULTI_QUERY, "sum("), (NAN_QUERY, "NaN")])
def test_adhoc_query_prometheus_cannot_answer_with_one_series_is_422(
    call: Callable[..., requests.Response], rest_prometheus: PrometheusServer, query: str,
    word: str,
) -> None:
    body = {"serverAddress": rest_prometheus.url, "query": query, "historyWindow": "1d"}
    error = assert_error(call("POST", "/api/v1/forecast", json=body), 422, "unprocessable",
                         "query")
    assert word in error["message"]


def test_adhoc_query_on_an_unreachable_server_is_503(
    call: Callable[..., requests.Response],
) -> None:
    body = {"serverAddress": CLOSED_SERVER, "query": "up", "historyWindow": "1d"}
    response = call("POST", "/api/v1/forecast", json=body)
    assert "unavailable" in assert_error(response, 503, "unavailable")["message"]


def test_adhoc_fits_beyond_the_slots_are_503_with_retry_after(
    call: Callable[..., requests.Response], service: Service
) -> None:
    slots = service.app.extensions[ADHOC_KEY].free
    taken = [slots.acquire(blocking=False) for _ in range(2)]
    try:
        assert all(taken)
        body = {"series": _points(_daily(20)), "model": "naive"}
        response = call("POST", "/api/v1/forecast", json=body)
        assert_error(response, 503, "unavailable")
        assert response.headers["Retry-After"] == "5"
    finally:
        for _ in taken:
            slots.release()
    assert call("POST", "/api/v1/forecast", json=body).status_code == 200


def test_concurrent_adhoc_fits_succeed_or_are_503(
    call: Callable[..., requests.Response],
) -> None:
    body = {"series": _points(_daily(2000)), "model": "holt_winters_damped", "horizon": 288}
    with ThreadPoolExecutor(6) as pool:
        statuses = sorted(pool.map(
            lambda _: call("POST", "/api/v1/forecast", json=body).status_code, range(6)))
    assert statuses.count(200) >= 2 and set(statuses) <= {200, 503}


# -- routing, errors, auth ------------------------------------------------------------------


def test_unknown_routes_and_methods_are_json(call: Callable[..., requests.Response]) -> None:
    assert_error(call("GET", "/api/v1/nothing"), 404, "not_found")
    assert_error(call("GET", "/api/v1/targets/shop/web"), 404, "not_found")
    assert_error(call("GET", _path(WEB, "/nonsense")), 404, "not_found")
    response = call("DELETE", "/api/v1/targets")
    assert_error(response, 405, "method_not_allowed")
    assert "GET" in response.headers["Allow"]
    assert_error(call("GET", "/api/v1/forecast"), 405, "method_not_allowed")
    assert_error(call("POST", "/readyz"), 405, "method_not_allowed")
    assert_error(call("GET", "/static/forecaster.css"), 404, "not_found")


@pytest.mark.parametrize(("method", "path"), [
    ("DELETE", "/api/v1/targets"), ("GET", "/api/v1/forecast"), ("PUT", "/login"),
    ("POST", _path(WEB, "/decision")),
])
def test_a_wrong_method_is_405_naming_the_methods_the_path_takes(
    call: Callable[..., requests.Response], method: str, path: str
) -> None:
    response = call(method, path)
    error = assert_error(response, 405, "method_not_allowed")
    allowed = [name.strip() for name in response.headers["Allow"].split(",")]
    assert f"{method} is not allowed on {path}" in error["message"], error
    assert error["message"].endswith(", ".join(allowed)), (error, allowed)
    document = openapi_document()
    assert document["paths"][_documented_path(path)][
        "post" if "POST" in allowed else "get"]["responses"]["405"] == {
        "$ref": "#/components/responses/MethodNotAllowed"}


def _documented_path(path: str) -> str:
    return path.replace(f"/{WEB}/", "/{namespace}/{name}/{metric}/")


def test_a_mistyped_subresource_of_a_known_target_is_named_as_such(
    call: Callable[..., requests.Response],
) -> None:
    error = assert_error(call("GET", _path(WEB, "/forecasts")), 404, "not_found")
    assert f"no such route: target {WEB} has no 'forecasts'" in error["message"], error
    for known in ("forecast", "decision", "metric", "plot.png", "share.png"):
        assert known in error["message"], error
    # A name with a slash that does not end in a known target's id stays an unknown target.
    error = assert_error(call("GET", "/api/v1/targets/shop/nothing/web-rps/forecasts"), 404,
                         "not_found")
    assert "unknown target" in error["message"], error


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          None])
def test_an_adhoc_body_not_sent_as_json_is_415(
    call: Callable[..., requests.Response], content_type: str | None
) -> None:
    body = b'{"series": [{"timestamp": "2024-05-01T00:00:00Z", "value": 1}]}'
    request = requests.Request("POST", "http://x/", data=body,
                               headers={"Content-Type": content_type} if content_type else {})
    assert ("Content-Type" in request.prepare().headers) == (content_type is not None)
    response = call("POST", "/api/v1/forecast", data=body,
                    headers={"Content-Type": content_type} if content_type else {})
    error = assert_error(response, 415, "unsupported_media_type", "Content-Type")
    assert "application/json" in error["message"], error
    assert "415" in openapi_document()["paths"]["/api/v1/forecast"]["post"]["responses"]


@pytest.mark.parametrize(("body", "field", "shown"), [
    ({"series": [{"timestamp": "2024-05-01T00:00:00Z", "value": 1}], "horizon": True},
     "horizon", "got true"),
    ({"series": [{"timestamp": "2024-05-01T00:00:00Z", "value": None}]}, "series[0].value",
     "got null"),
    ({"series": {"timestamp": "2024-05-01T00:00:00Z"}}, "series", "got object"),
    ({"series": [{"timestamp": "2024-05-01T00:00:00Z", "value": 1}], "model": "arima"},
     "model", 'got "arima"'),
    ([1, False], "body", "got array [1, false]"),
])
def test_adhoc_refusals_show_values_as_json_spells_them(
    call: Callable[..., requests.Response], body: Any, field: str, shown: str
) -> None:
    error = assert_error(call("POST", "/api/v1/forecast", json=body), 400, "invalid_argument",
                         field)
    assert shown in error["message"], error


def test_an_unexpected_error_is_a_generic_500_and_logged(
    call: Callable[..., requests.Response], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(render, "target_status", broken)
    with caplog.at_level(logging.ERROR):
        response = call("GET", "/api/v1/targets")
    error = assert_error(response, 500, "internal")
    assert "secret" not in response.text
    assert "see the forecaster logs" in error["message"]
    assert "secret internals" in caplog.text


# -- the OpenAPI document -------------------------------------------------------------------


def _flask_operations(service: Service, pages: bool | None) -> set[tuple[str, str]]:
    """The app's (path, method) pairs: of the page routes, of the others, or (None) of all."""
    operations = set()
    for rule in service.app.url_map.iter_rules():
        if pages is not None and rule.endpoint.startswith("pages.") != pages:
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        operations |= {(path, method) for method in rule.methods or () if
                       method not in ("HEAD", "OPTIONS")}
    return operations


def _documented_operations(document: dict[str, Any], pages: bool) -> set[tuple[str, str]]:
    return {
        (path, method.upper())
        for path, item in document["paths"].items()
        if (path in PAGE_PATHS) == pages
        for method in item
    }


def test_openapi_document_is_valid_and_served(call: Callable[..., requests.Response]) -> None:
    served = strict_json(call("GET", "/openapi.json"))
    assert served == openapi_document()
    validate_spec(served)


def test_every_route_of_the_app_is_in_the_openapi_document(service: Service) -> None:
    document = openapi_document()
    documented = {(path, method.upper()) for path, item in document["paths"].items()
                  for method in item}
    assert _flask_operations(service, pages=None) == documented


def test_openapi_document_matches_the_routes_exactly(service: Service) -> None:
    document = openapi_document()
    assert _flask_operations(service, pages=False) == _documented_operations(document, False)


def test_openapi_document_matches_the_page_routes_exactly(service: Service) -> None:
    routes = _flask_operations(service, pages=True)
    if not routes:
        pytest.skip("forecaster/api/pages.py registers no routes yet")
    assert routes == _documented_operations(openapi_document(), pages=True)


def test_openapi_documents_every_error_status_the_tests_see() -> None:
    document = openapi_document()
    forecast = document["paths"]["/api/v1/targets/{namespace}/{name}/{metric}/forecast"]["get"]
    assert {"200", "400", "401", "404", "503"} <= set(forecast["responses"])
    adhoc = document["paths"]["/api/v1/forecast"]["post"]
    assert {"200", "400", "401", "413", "422", "503"} <= set(adhoc["responses"])
    assert "valueLocation: value" in document["paths"][
        "/api/v1/targets/{namespace}/{name}/{metric}/metric"]["get"]["description"]
