"""/metrics over real HTTP, from a real Service fed by a real Prometheus, against the engine's
own snapshots and counters; and the Grafana dashboard against a real scrape."""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from forecaster.policy import planned_replicas
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.service import Service
from forecaster.target import AccuracyKeeper, Target, freshness_limit, target_labels
from tests.support.live import MODEL, Live, live_service, scrape
from tests.support.prometheus import PrometheusServer
from tests.support.scaler import scaled_object_ref, scaler_settings
from tests.support.waiting import wait_for

DASHBOARD = Path(__file__).parent.parent / "keda" / "grafana-dashboard.json"


def value(samples: dict[str, list[Sample]], name: str, /, **labels: str) -> float:
    """The one sample of `name` whose labels include `labels`."""
    found = [s.value for s in samples.get(name, []) if labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def test_target_gauges_match_the_engine_snapshot(live: Live) -> None:
    target = live.target
    for _ in range(5):  # a refresh may publish new values between the scrape and the check
        before = target.snapshot
        samples = scrape(live)
        after = target.snapshot
        if before.planned == after.planned and before.current_value == after.current_value:
            break
    snapshot, spec = after, target.spec
    assert snapshot.planned is not None and snapshot.forecast is not None
    ids = dict(zip(("namespace", "name", "metric"), target_labels(target.target_id),
                   strict=True))
    assert ids == {"namespace": "shop", "name": "web", "metric": spec.effective_metric_name}

    assert value(samples, "forecaster_planned_load", **ids) == snapshot.planned.value
    assert value(samples, "forecaster_actual_load", **ids) == snapshot.current_value
    assert value(samples, "forecaster_target_value", **ids) == spec.target_value
    assert value(samples, "forecaster_planned_replicas", **ids) == math.ceil(
        snapshot.planned.value / spec.target_value)
    forecast = snapshot.forecast
    assert sorted(forecast.quantiles) == [0.05, 0.1, 0.5, 0.9, 0.95]
    for quantile, values in forecast.quantiles.items():
        assert value(samples, "forecaster_predicted_load", **ids, quantile=f"{quantile:g}") == (
            pytest.approx(float(values[-1]), rel=1e-12))
    # The planned load is the planning quantile at the horizon, averaged over the origins
    # seen, floored by the load held over the current value and the last grid point.
    planned = snapshot.planned
    assert planned.forecast == value(samples, "forecaster_predicted_load", **ids, quantile="0.9")
    # (The last grid point may move on between the scrape and here; the current value may not.)
    assert planned.floor <= value(samples, "forecaster_actual_load", **ids)
    assert planned.value == max(planned.smoothed, planned.floor)
    assert value(samples, "forecaster_forecast_horizon_seconds", **ids) == 600  # 2 x 5 min
    assert value(samples, "forecaster_target_fresh", **ids) == 1
    assert value(samples, "forecaster_reactive_fallback", **ids) == 0
    age = value(samples, "forecaster_data_age_seconds", **ids)
    assert 0 <= age <= freshness_limit(live.service.engine.settings, spec)
    assert value(samples, "forecaster_target_info", **ids) == 1
    info = next(s for s in samples["forecaster_target_info"] if ids.items() <= s.labels.items())
    assert info.labels["model"] == snapshot.model == MODEL
    assert info.labels["requested_model"] == MODEL
    assert info.labels["planning_quantile"] == "0.9"
    assert value(samples, "forecaster_last_fit_timestamp_seconds", **ids) == snapshot.fitted_at
    assert value(samples, "forecaster_targets") == len(live.service.engine)
    assert value(samples, "forecaster_dry_run") == 0
    # Accuracy: absent until a forecast is scored (never a made-up 0), then the engine's.
    accuracy = target.accuracy()
    assert value(samples, "forecaster_forecast_scored_intervals", **ids) == accuracy.scored
    if accuracy.scored == 0:
        assert "forecaster_forecast_mae" not in samples
    else:
        assert value(samples, "forecaster_forecast_mae", **ids) == accuracy.mae


@contextmanager
def scored(target: Target) -> Iterator[None]:
    """As if two decision-horizon forecasts had been scored (that takes 10 minutes live)."""
    saved = target.scores
    target.scores = AccuracyKeeper(10)
    target.scores.record_score(3.0, True)
    target.scores.record_score(5.0, False)
    try:
        yield
    finally:
        target.scores = saved


def test_accuracy_gauges_follow_the_scored_forecasts(live: Live) -> None:
    target = live.target
    with scored(target):
        samples = scrape(live)
        ids = dict(zip(("namespace", "name", "metric"), target_labels(target.target_id),
                       strict=True))
        accuracy = target.accuracy()
        assert value(samples, "forecaster_forecast_abs_error", **ids) == 5.0
        assert value(samples, "forecaster_forecast_mae", **ids) == accuracy.mae
        assert value(samples, "forecaster_forecast_interval_coverage_ratio", **ids,
                     interval="0.8") == accuracy.coverage_80


def test_fit_and_refresh_counters_count_the_engines_work(live: Live) -> None:
    samples = scrape(live)
    targets = list(live.service.engine.targets())
    fits = sum(t.fits for t in targets)
    failures = sum(t.fit_failures for t in targets)
    assert fits >= 1
    assert value(samples, "forecaster_fits_total", outcome="ok") == fits
    assert value(samples, "forecaster_fits_total", outcome="failed") == failures
    assert value(samples, "forecaster_fit_fallbacks_total") == sum(t.fallbacks for t in targets)
    assert value(samples, "forecaster_fit_duration_seconds_count") == fits + failures
    buckets = {float(s.labels["le"]): s.value
               for s in samples["forecaster_fit_duration_seconds_bucket"]}
    assert min(buckets) == 0.01 and max(k for k in buckets if math.isfinite(k)) == 60
    assert buckets[math.inf] == fits + failures
    assert value(samples, "forecaster_refreshes_total", outcome="ok") >= 1
    assert value(samples, "forecaster_refreshes_total", outcome="failed") == sum(
        t.refresh_failures for t in targets)


def test_requests_are_counted_per_interface_method_and_code(live: Live) -> None:
    def count(samples: dict[str, list[Sample]], interface: str, method: str, code: str) -> float:
        wanted = {"interface": interface, "method": method, "code": code}
        found = [s.value for s in samples.get("forecaster_requests_total", [])
                 if s.labels == wanted]
        return found[0] if found else 0.0

    ref = live.ref()
    name = live.target.spec.effective_metric_name
    plot = "GET /api/v1/targets/<namespace>/<path:name>/<metric>/plot.png"
    before = scrape(live)
    for _ in range(3):
        live.stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName=name),
                             timeout=10)
    with pytest.raises(grpc.RpcError):
        live.stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName="other"),
                             timeout=10)
    live.stub.IsActive(ref, timeout=10)
    for _ in range(2):
        url = f"{live.base}/api/v1/targets/{live.target.target_id}/plot.png"
        assert requests.get(url, timeout=30).status_code == 200
    assert requests.get(f"{live.base}/no/such/page", timeout=10).status_code == 404
    grpc_calls = [("GetMetrics", "OK", 3), ("GetMetrics", "INVALID_ARGUMENT", 1),
                  ("IsActive", "OK", 1)]

    # The gRPC front reports its call counts to the engine's process every half second:
    # scrape until they are in, then check every count exactly.
    scraped: list[dict[str, list[Sample]]] = []

    def arrived() -> dict[str, list[Sample]] | None:
        scraped.append(scrape(live))
        return scraped[-1] if all(
            count(scraped[-1], "grpc", method, code) >= count(before, "grpc", method, code)
            + added for method, code, added in grpc_calls) else None

    after = wait_for(arrived, timeout=10, every=0.1, what="the front's call counts")
    scrapes = len(scraped)

    for interface, method, code, added in [
        *(("grpc", method, code, added) for method, code, added in grpc_calls),
        ("http", plot, "200", 2),
        ("http", "GET unmatched", "404", 1),
        ("http", "GET /metrics", "200", scrapes),  # the scrapes before the last
    ]:
        assert count(after, interface, method, code) == (
            count(before, interface, method, code) + added), (interface, method, code)


def test_a_trigger_that_takes_over_a_target_is_logged_and_counted(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    before = value(scrape(live), "forecaster_spec_changes_total")
    query = 'sum(web_requests{job="web"})'
    refs = [
        pb.ScaledObjectRef(namespace="shop", name="takeover", scalerMetadata={
            **live.ref().scalerMetadata, "metricName": "shared", "query": text})
        for text in (query, "sum(web_requests)")
    ]
    for ref in refs:  # two triggers with one metricName: the second replaces the first
        live.stub.IsActive(ref, timeout=20)
    assert value(scrape(live), "forecaster_spec_changes_total") == before + 1
    (record,) = [r for r in caplog.records if "trigger changed" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert "shop/takeover/shared" in record.getMessage()
    assert f"query was {query!r}, now 'sum(web_requests)'" in record.getMessage()


def test_a_new_target_reports_the_reactive_fallback_until_its_first_fit(
    prometheus_now: PrometheusServer,
) -> None:
    # The only fit worker is held, so the target has a current value but no model.
    gate_pool = ThreadPoolExecutor(1, thread_name_prefix="test-held-fit")
    released = threading.Event()
    gate_pool.submit(released.wait, 60)
    service = Service(scaler_settings(prometheus_now.url), fit_pool=gate_pool)
    service.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            stub = pb_grpc.ExternalScalerStub(channel)
            ref = scaled_object_ref(prometheus_now.url, model=MODEL)
            name = stub.GetMetricSpec(ref, timeout=10).metricSpecs[0].metricName
            stub.IsActive(ref, timeout=20)  # KEDA's next calls register the target
            target = service.engine.get(f"shop/web/{name}")
            wait_for(lambda: target.snapshot.planned is not None, timeout=30)
            live = Live(service, stub, prometheus_now, target)
            samples = scrape(live)
        ids = {"namespace": "shop", "name": "web", "metric": name}
        assert value(samples, "forecaster_reactive_fallback", **ids) == 1
        assert value(samples, "forecaster_planned_load", **ids) == value(
            samples, "forecaster_actual_load", **ids)
        assert "forecaster_predicted_load" not in samples  # no forecast: no made-up numbers
        info = samples["forecaster_target_info"][0]
        assert info.labels["model"] == "none"
        assert value(samples, "forecaster_fits_total", outcome="ok") == 0
    finally:
        released.set()
        service.stop()
        gate_pool.shutdown(wait=True, cancel_futures=True)


# -- the dashboard ----------------------------------------------------------------------------

_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and",
    "or", "unless", "atan2", "inf", "nan",
}
_VARIABLE = re.compile(r"\$\{?\w+(?::\w+)?\}?")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*(\w+)\s*\)\s*$")
_QUERY_RESULT = re.compile(r"^\s*query_result\((.*)\)\s*$")


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (Grafana variables allowed): what is left once
    strings, label matchers, ranges, grouping clauses, functions and keywords are removed."""
    text = _VARIABLE.sub("5m", expr)
    text = _STRING.sub('""', text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?[smhdwy]?\b", " ", text)
    return {name for name in _IDENTIFIER.findall(text) if name not in _PROMQL_WORDS}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le) (rate(a_bucket{x=~"$v"}[$__rate_interval]))', {"a_bucket"}),
        ('b{quantile="$q"} offset $horizon / on(n) c', {"b", "c"}),
        ("histogram_quantile(0.99, sum by (le) (rate(d[5m])))", {"d"}),
        ('e{code!~"OK|2.."} > 1e3 or f', {"e", "f"}),
    ],
)
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def _dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            match = _LABEL_VALUES.match(query) or _QUERY_RESULT.match(query)
            assert match, (f"variable {variable['name']}: {query!r} is not label_values(...) "
                           "or query_result(...)")
            found.append((f"variable {variable['name']}", match.group(1)))
    return found


def test_dashboard_uses_only_exported_metrics_in_valid_promql(live: Live) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "name"} <= set(variables)
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]

    with scored(live.target):  # so that the accuracy gauges have samples
        exported = set(scrape(live))
    queries = _dashboard_queries()
    assert len(queries) >= 15
    missing = {}
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where}: no metric name found in {expr!r}"
        if names - exported:
            missing[where] = sorted(names - exported)
    assert not missing, f"metrics the service does not export: {missing}"

    # Syntax: the real Prometheus parses each expression, variables given example values.
    examples = {"namespace": "shop", "name": "web", "quantile": "0.9", "horizon": "600",
                "__rate_interval": "1m"}
    for where, expr in queries:
        concrete = re.sub(r"\$\{?(\w+)\}?", lambda m: examples[m.group(1)], expr)
        response = requests.get(f"{live.prometheus.url}/api/v1/query",
                                params={"query": concrete}, timeout=10)
        assert response.status_code == 200, f"{where}: {concrete!r}: {response.text}"


SERVICE_MONITORS = DASHBOARD.parent / "examples" / "monitoring" / "servicemonitors.yaml"
_REPLICA_LABELS = ("pod", "instance")
_TARGET_DIMENSIONS = ("quantile", "interval", "window")  # a target's gauges' own labels
_OFFSET = re.compile(r"\s+offset\s+\$\{horizon\}s")


def _operator_scrape_config(services: list[Service]) -> dict[str, object]:
    """The scrape job the Prometheus Operator makes of the `forecaster` ServiceMonitor, with
    each service as one StatefulSet pod: its target labels and the endpoint's honorLabels."""
    monitors = yaml.safe_load_all(SERVICE_MONITORS.read_text(encoding="utf-8"))
    (monitor,) = [m for m in monitors if m and m["metadata"]["name"] == "forecaster"]
    (endpoint,) = monitor["spec"]["endpoints"]
    pods = [{"targets": [f"127.0.0.1:{service.http_port}"],
             "labels": {"namespace": monitor["metadata"]["namespace"], "service": "forecaster",
                        "endpoint": endpoint["port"], "pod": f"forecaster-{i}"}}
            for i, service in enumerate(services)]
    return {"job_name": "forecaster", "scrape_interval": "1s", "metrics_path": endpoint["path"],
            "honor_labels": bool(endpoint.get("honorLabels", False)), "static_configs": pods}


def _instant(url: str, query: str) -> list[dict]:
    response = requests.get(f"{url}/api/v1/query", params={"query": query}, timeout=10)
    assert response.status_code == 200, f"{query!r}: {response.text}"
    return list(response.json()["data"]["result"])


def _substitute(expr: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)


def _variable_options(url: str, variable: dict, values: dict[str, str]) -> list[str]:
    """A query variable's options, found as Grafana's Prometheus data source finds them."""
    assert variable["type"] == "query", f"variable {variable['name']}: not a query variable"
    query = _substitute(variable["query"]["query"], values)
    if match := _LABEL_VALUES.match(query):
        response = requests.get(f"{url}/api/v1/label/{match.group(2)}/values",
                                params={"match[]": match.group(1)}, timeout=10)
        assert response.status_code == 200, f"{query!r}: {response.text}"
        texts = list(response.json()["data"])
    else:  # query_result(...): "name{k="v",...} value millis" per series
        match = _QUERY_RESULT.match(query)
        assert match, query
        texts = [
            series["metric"].pop("__name__", "") + "{" + ",".join(
                f'{k}="{v}"' for k, v in series["metric"].items()) + "} "
            + f"{series['value'][1]} {int(series['value'][0] * 1000)}"
            for series in _instant(url, match.group(1))]
    regex = variable.get("regex", "")
    if regex:  # Grafana keeps the first group of each text that matches
        pattern = re.compile(regex.strip("/"))
        texts = [m.group(1) for m in map(pattern.search, texts) if m]
    return sorted(set(texts))


def test_dashboard_shows_each_target_once_across_two_replicas(
    live: Live, tmp_path: Path
) -> None:
    # Two replicas forecast the same target; Prometheus scrapes both as the operator would.
    with live_service(live.prometheus) as second, scored(live.target), scored(second.target):
        services = [live.service, second.service]
        for service in services:  # an error for the error panels to show
            requests.get(f"http://127.0.0.1:{service.http_port}/no-such-page", timeout=10)
        with PrometheusServer(workdir=tmp_path / "scraper",
                              scrape_configs=[_operator_scrape_config(services)]) as scraper:
            wait_for(lambda: _instant(
                scraper.url, 'count(count_over_time(up{job="forecaster"}[1m]) >= 3) == 2'),
                timeout=30, what="three scrapes of each replica")
            ids = {"namespace": "shop", "name": "web",
                   "metric": live.target.spec.effective_metric_name}
            per_replica = _instant(scraper.url, "count by (namespace, name, metric, pod) "
                                   f'(forecaster_actual_load{{name="{ids["name"]}"}})')
            assert len(per_replica) == 2, per_replica  # each replica's own series, as scraped
            assert {s["metric"]["namespace"] for s in per_replica} == {ids["namespace"]}

            dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
            variables = {v["name"]: v for v in dashboard["templating"]["list"]}
            values = {"namespace": ".*", "name": ".*", "__rate_interval": "1m"}
            assert variables["namespace"]["allValue"] == variables["name"]["allValue"] == ".*"
            options = {name: _variable_options(scraper.url, variables[name], values)
                       for name in ("namespace", "name", "quantile", "horizon")}
            # The target's own namespace (honorLabels), not the namespace forecaster runs in.
            assert options["namespace"] == [ids["namespace"]]
            assert ids["name"] in options["name"]
            assert variables["quantile"]["current"]["value"] in options["quantile"]
            horizons = {str(int(t.snapshot.planned.horizon_steps * t.spec.step_seconds))
                        for t in (live.target, second.target) if t.snapshot.planned}
            assert options["horizon"] == sorted(horizons) == ["600"]
            values |= {"quantile": variables["quantile"]["current"]["value"],
                       "horizon": options["horizon"][0]}

            for panel in dashboard["panels"]:
                for target in panel.get("targets", []):
                    where = f"panel {panel['title']!r} {target['refId']}"
                    if re.search(r"\$\{?horizon\b", target["expr"]):  # one value per copy
                        assert panel.get("repeat") == "horizon", where
                    expr = _substitute(target["expr"], values)
                    _instant(scraper.url, expr)  # parses, with its offset
                    # Predictions made a horizon ago predate these services: the same query
                    # without the offset has the same series.
                    result = _instant(scraper.url, _substitute(_OFFSET.sub("", target["expr"]),
                                                               values))
                    assert result, f"{where}: no series"
                    for series in result:
                        labels = series["metric"]
                        assert not set(_REPLICA_LABELS) & set(labels), f"{where}: {labels}"
                    if panel["type"] == "stat":
                        assert len(result) == 1, f"{where}: {result}"
                    elif "$name" in target["expr"]:
                        # Labels unique per answer: one series per target (and quantile...).
                        ours = [s["metric"] for s in result
                                if ids.items() <= s["metric"].items()]
                        assert ours, f"{where}: nothing for {ids}"
                        assert {k for m in ours for k in m} <= {*ids, *_TARGET_DIMENSIONS}, (
                            f"{where}: {ours}")
            (targets,) = _instant(scraper.url, _substitute(
                next(p for p in dashboard["panels"] if p["title"] == "Targets")
                ["targets"][0]["expr"], values))
            assert float(targets["value"][1]) == max(len(s.engine) for s in services)


def test_metric_names_follow_prometheus_conventions(live: Live) -> None:
    samples = scrape(live)
    ours = {name for name in samples if name.startswith("forecaster_")}
    assert ours  # and every counter ends in _total, every duration is in seconds
    families = text_string_to_metric_families(
        requests.get(f"{live.base}/metrics", timeout=10).text)
    for family in families:
        if not family.name.startswith("forecaster_"):
            continue
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        assert "millis" not in family.name and "_ms" not in family.name
        assert family.documentation, family.name


@pytest.mark.parametrize(
    ("target_id", "labels"),
    [
        ("shop/web/fc-0123", ("shop", "web", "fc-0123")),
        ("shop/a/b/fc-1", ("shop", "a/b", "fc-1")),  # a slash belongs to the name
    ],
)
def test_target_labels(target_id: str, labels: tuple[str, str, str]) -> None:
    assert target_labels(target_id) == labels


def test_planned_replicas_ignores_float_noise() -> None:
    assert planned_replicas(33.4, 16.7) == 2
    assert planned_replicas(33.5, 16.7) == 3
    assert planned_replicas(0.0, 10.0) == 0
