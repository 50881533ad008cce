"""The service as the config file shapes it, against a real Prometheus: configured targets warm
at start-up, defaults under request metadata, unknown keys, changed triggers, idle targets, the
server allow-list and the credentials actually sent."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pandas as pd
import pytest
import requests
import yaml

from forecaster.config import ConfiguredTarget, EngineSettings, Settings, load_settings
from forecaster.scaler.bridge import PUSH_SECONDS
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.service import Service
from forecaster.sources.prometheus import PrometheusServerConfig
from tests.support.prometheus import (
    PrometheusServer,
    backfill,
    held_each_minute,
    load_trace,
    write_openmetrics,
)
from tests.support.proxy import RecordingProxy
from tests.support.scaler import refusals
from tests.support.waiting import wait_for

TRACE = Path(__file__).parent.parent / "data" / "aws_elb_request_count_8c0756.csv"
WEB = 'sum(web_requests{job="web"})'
CONSTANT = 'sum(constant_requests{job="constant"})'
CONSTANT_VALUE = 7.0
TOKEN = "config-bearer-token-0xc0ffee"
ORG = "team-a"


def _held_each_minute(now: datetime, days: int = 3) -> pd.Series:
    """The bundled trace's last days, ending 2 hours after now, held each minute."""
    return held_each_minute(load_trace(TRACE), now, days=days)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    root = tmp_path_factory.mktemp("service-config")
    series = _held_each_minute(datetime.now(UTC))
    files = [root / "web.om", root / "constant.om"]
    write_openmetrics(series, "web_requests", files[0], {"job": "web"})
    write_openmetrics(series * 0 + CONSTANT_VALUE, "constant_requests", files[1],
                      {"job": "constant"})
    backfill(files, root / "blocks")
    with PrometheusServer(blocks_dir=root / "blocks", workdir=root / "prom") as server:
        yield server


@pytest.fixture(scope="module")
def proxy(prometheus: PrometheusServer) -> Iterator[RecordingProxy]:
    server = RecordingProxy(prometheus.url)
    thread = threading.Thread(target=server.serve_forever, name="proxy", daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


class Clock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def make_service() -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def make(settings: Settings, **kwargs: object) -> Service:
        # Fits in a thread: a spawned worker process costs seconds on a small CI machine.
        service = Service(settings, fit_pool=ThreadPoolExecutor(1), **kwargs)  # type: ignore[arg-type]
        started.append(service)
        service.start()
        return service

    yield make
    for service in started:
        service.stop()


def _settings(
    servers: tuple[PrometheusServerConfig, ...],
    *,
    targets: tuple[ConfiguredTarget, ...] = (),
    defaults: dict[str, str] | None = None,
    idle_seconds: float = 3600.0,
) -> Settings:
    return Settings(
        engine=EngineSettings(
            refresh_seconds=2.0,
            refit_seconds=3600.0,
            idle_seconds=idle_seconds,
            fit_workers=1,
            first_value_wait_seconds=10.0,
        ),
        servers=servers,
        defaults=defaults or {},
        targets=targets,
        grpc_port=0,
        http_port=0,
        host="127.0.0.1",
    )


def _metadata(url: str, **extra: str) -> dict[str, str]:
    return {
        "serverAddress": url,
        "query": WEB,
        "targetValue": "16.7",
        "model": "naive",
        "historyWindow": "1d",
        **extra,
    }


def _keda(metadata: dict[str, str]) -> dict[str, str]:
    """What KEDA sends: the trigger's metadata plus its own keys."""
    return {**metadata, "scalerAddress": "forecaster.autoscaling:50051"}


def _ref(metadata: dict[str, str], name: str = "web") -> pb.ScaledObjectRef:
    return pb.ScaledObjectRef(namespace="shop", name=name, scalerMetadata=metadata)


@pytest.fixture
def stub_for() -> Iterator[Callable[[Service], pb_grpc.ExternalScalerStub]]:
    channels: list[grpc.Channel] = []

    def stub(service: Service) -> pb_grpc.ExternalScalerStub:
        channel = grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}")
        channels.append(channel)
        return pb_grpc.ExternalScalerStub(channel)

    yield stub
    for channel in channels:
        channel.close()


def _metric_name(stub: pb_grpc.ExternalScalerStub, ref: pb.ScaledObjectRef) -> str:
    """KEDA's first calls: the metric's name, then IsActive, which registers the target."""
    name = str(stub.GetMetricSpec(ref, timeout=10).metricSpecs[0].metricName)
    stub.IsActive(ref, timeout=20)
    return name


def test_a_trigger_that_differs_from_a_configured_target_is_served_the_config_and_counted(
    prometheus: PrometheusServer,
    make_service: Callable[..., Service],
    stub_for: Callable[[Service], pb_grpc.ExternalScalerStub],
    caplog: pytest.LogCaptureFixture,
) -> None:
    metadata = _metadata(prometheus.url, metricName="web-load")
    configured = ConfiguredTarget("shop", "web", metadata)
    service = make_service(
        _settings((PrometheusServerConfig(url=prometheus.url),), targets=(configured,))
    )
    (target,) = service.engine.targets()
    stub = stub_for(service)
    differing = _ref(_keda({**metadata, "startupSeconds": "900"}))
    assert stub.GetMetricSpec(differing, timeout=10).metricSpecs[0].metricName == "web-load"
    for _ in range(3):  # KEDA's order, three polls
        stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=differing, metricName="web-load"),
                        timeout=15)
        stub.IsActive(differing, timeout=10)
    assert service.engine.get("shop/web/web-load") is target
    assert target.spec.startup_seconds == 300  # the operator's spec is served
    warnings = [r for r in caplog.records if "differs from the config" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
    metrics = requests.get(f"http://127.0.0.1:{service.http_port}/metrics", timeout=10).text
    assert "forecaster_spec_conflicts_total 1.0" in metrics


def test_a_trigger_landing_on_a_configured_target_gets_the_configs_target_value(
    prometheus: PrometheusServer,
    make_service: Callable[..., Service],
    stub_for: Callable[[Service], pb_grpc.ExternalScalerStub],
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The config's spec is the one planned for (its controller replays the HPA at its
    targetValue), so the HPA must divide by that value too, not by the trigger's."""
    metadata = _metadata(prometheus.url, metricName="web-load")
    configured = ConfiguredTarget("shop", "web", metadata)
    service = make_service(
        _settings((PrometheusServerConfig(url=prometheus.url),), targets=(configured,))
    )
    stub = stub_for(service)
    differing = _ref(_keda({**metadata, "targetValue": "50"}))
    (spec,) = stub.GetMetricSpec(differing, timeout=10).metricSpecs
    assert (spec.metricName, spec.targetSizeFloat, spec.targetSize) == ("web-load", 16.7, 17)
    # The front process logs it, once: KEDA repeats GetMetricSpec, the answer is cached.
    assert stub.GetMetricSpec(differing, timeout=10).metricSpecs[0].targetSizeFloat == 16.7
    warnings = [line for line in capfd.readouterr().err.splitlines()
                if "asks targetValue 50" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "16.7" in warnings[0]
    # Another ScaledObject's trigger with the same metric name is not that target.
    (other,) = stub.GetMetricSpec(
        _ref(_keda({**metadata, "targetValue": "50"}), name="shop-api"), timeout=10
    ).metricSpecs
    assert (other.metricName, other.targetSizeFloat) == ("web-load", 50.0)
    # And the planned load served is the configured target's.
    (target,) = service.engine.targets()
    wait_for(lambda: target.snapshot.forecast is not None, timeout=30)
    request = pb.GetMetricsRequest(scaledObjectRef=differing, metricName="web-load")
    for _ in range(3):  # a refresh may land between the reads: retry
        before = service.engine.serve(target.target_id).value
        value = stub.GetMetrics(request, timeout=15).metricValues[0].metricValueFloat
        if value == pytest.approx(before) == service.engine.serve(target.target_id).value:
            break
    assert value == pytest.approx(service.engine.serve(target.target_id).value)


def test_configured_target_is_fitted_at_start_up_and_requests_map_to_it(
    prometheus: PrometheusServer,
    make_service: Callable[..., Service],
    stub_for: Callable[[Service], pb_grpc.ExternalScalerStub],
) -> None:
    metadata = _metadata(prometheus.url, metricName="web-load")
    configured = ConfiguredTarget("shop", "web", metadata)
    service = make_service(
        _settings((PrometheusServerConfig(url=prometheus.url),), targets=(configured,))
    )
    # No scaler request yet: the engine knows the target and fits it.
    (target,) = service.engine.targets()
    assert target.target_id == "shop/web/web-load"
    assert target.configured
    wait_for(lambda: target.snapshot.forecast is not None, timeout=30)
    assert target.snapshot.history_points == 288  # 1d of 5m steps

    stub = stub_for(service)
    ref = _ref(_keda(metadata))
    assert _metric_name(stub, ref) == "web-load"
    request = pb.GetMetricsRequest(scaledObjectRef=ref, metricName="web-load")
    for _ in range(3):  # a refresh may land between the reads: retry
        before = service.engine.serve(target.target_id).value
        value = stub.GetMetrics(request, timeout=10).metricValues[0].metricValueFloat
        if value in (before, service.engine.serve(target.target_id).value):
            break
    else:
        raise AssertionError(f"GetMetrics served {value}, not the engine's planned load")
    assert len(service.engine) == 1
    assert service.engine.get("shop/web/web-load") is target  # the warm one, not a new one
    assert target.fits == 1  # requests never fit
    assert service.engine.serve(target.target_id).mode == "forecast"


def test_defaults_go_under_request_metadata_and_the_request_wins(
    prometheus: PrometheusServer,
    make_service: Callable[..., Service],
    stub_for: Callable[[Service], pb_grpc.ExternalScalerStub],
) -> None:
    defaults = {"step": "10m", "historyWindow": "2d", "model": "naive", "quantile": "0.8"}
    service = make_service(
        _settings((PrometheusServerConfig(url=prometheus.url),), defaults=defaults)
    )
    stub = stub_for(service)
    given = {"serverAddress": prometheus.url, "query": WEB, "targetValue": "10"}

    name = _metric_name(stub, _ref({**given, "step": "5m"}, name="web"))
    spec = service.engine.get(f"shop/web/{name}").spec
    assert spec.step_seconds == 300  # the request's
    assert spec.history_window_seconds == 2 * 86_400  # the defaults'
    assert (spec.model, spec.quantile) == ("naive", 0.8)

    name = _metric_name(stub, _ref(given, name="api"))
    assert service.engine.get(f"shop/api/{name}").spec.step_seconds == 600  # the default


def test_unknown_metadata_keys_are_logged_once_per_target_and_ignored(
    prometheus: PrometheusServer,
    make_service: Callable[..., Service],
    stub_for: Callable[[Service], pb_grpc.ExternalScalerStub],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="forecaster.targets")
    service = make_service(_settings((PrometheusServerConfig(url=prometheus.url),)))
    stub = stub_for(service)
    plain = _metadata(prometheus.url)
    keda_own = {
        "scalerAddress": "forecaster.autoscaling:50051",
        "enableTLS": "true",
        "unsafeSsl": "false",
        "passwordFromEnv": "PROM_PASSWORD",
    }
    noisy = {**plain, **keda_own, "lookback": "1h", "Threshold": "5"}

    name = _metric_name(stub, _ref(plain))
    target = service.engine.get(f"shop/web/{name}")
    for _ in range(3):
        assert _metric_name(stub, _ref(noisy)) == name
        stub.IsActive(_ref(noisy), timeout=10)
    assert _metric_name(stub, _ref({**noisy, "another": "x"})) == name
    assert service.engine.get(f"shop/web/{name}") is target  # same spec: same target
    assert _metric_name(stub, _ref(noisy, name="api")) == name

    warnings = [r.getMessage() for r in caplog.records if "unknown metadata" in r.getMessage()]
    assert len(warnings) == 2, warnings  # one per target, however often asked
    assert "shop/web/" in warnings[0] and "shop/api/" in warnings[1]
    for message in warnings:
        assert "lookback" in message and "Threshold" in message
        for key in keda_own:
            assert key not in message


def test_a_changed_trigger_for_the_same_scaled_object_starts_a_new_series(
    prometheus: PrometheusServer,
    make_service: Callable[..., Service],
    stub_for: Callable[[Service], pb_grpc.ExternalScalerStub],
) -> None:
    service = make_service(_settings((PrometheusServerConfig(url=prometheus.url),)))
    stub = stub_for(service)
    tid = "shop/web/web-load"
    base = _metadata(prometheus.url, metricName="web-load")
    changes: list[tuple[dict[str, str], int, float | None]] = [
        ({}, 288, None),
        ({"step": "10m"}, 144, None),  # same window, a coarser grid
        ({"step": "10m", "historyWindow": "2d"}, 288, None),
        ({"step": "10m", "historyWindow": "2d", "query": CONSTANT}, 288, CONSTANT_VALUE),
    ]
    before = None
    for change, points, value in changes:
        metadata = {**base, **change}
        assert _metric_name(stub, _ref(metadata)) == "web-load"
        target = service.engine.get(tid)
        assert target is not before  # replaced, not patched
        assert target.spec.query == metadata["query"]
        assert target.spec.step_seconds == (600 if "step" in change else 300)
        wait_for(lambda t=target: t.snapshot.current_value is not None, timeout=30)  # type: ignore[misc]
        assert target.snapshot.history_points == points  # history fetched again on the new grid
        if value is not None:
            assert target.snapshot.current_value == value
            assert (target.buffer.series() == value).all()
        assert len(service.engine) == 1
        before = target


def test_idle_targets_are_dropped_and_configured_ones_kept(
    prometheus: PrometheusServer,
    make_service: Callable[..., Service],
    stub_for: Callable[[Service], pb_grpc.ExternalScalerStub],
) -> None:
    clock = Clock()
    configured = ConfiguredTarget("shop", "warm", _metadata(prometheus.url, query=CONSTANT))
    service = make_service(
        _settings(
            (PrometheusServerConfig(url=prometheus.url),), targets=(configured,), idle_seconds=60
        ),
        clock=clock,
    )
    stub = stub_for(service)
    asked = _ref(_metadata(prometheus.url), name="asked")
    forgotten = _ref(_metadata(prometheus.url), name="forgotten")
    name = _metric_name(stub, asked)
    _metric_name(stub, forgotten)
    assert len(service.engine) == 3

    clock.offset = 40  # nothing is idle yet
    _metric_name(stub, asked)  # asked about again at +40s
    # The front reports calls to the engine in batches, in order: once the +40s call has
    # landed, so have the first calls, and none can land after the clock moves on.
    asked_target = service.engine.get(f"shop/asked/{name}")
    wait_for(lambda: asked_target.last_requested >= clock() - 5, timeout=30,
             what="the front's report of the call at +40s")
    clock.offset = 80  # forgotten: 80s idle; asked: 40s; warm: configured
    wait_for(lambda: len(service.engine) == 2, timeout=30)
    assert {t.target_id.split("/")[1] for t in service.engine.targets()} == {"asked", "warm"}
    assert service.engine.get(f"shop/asked/{name}").spec.query == WEB
    # Asked about again, it is registered anew, once the gRPC front has heard of the drop
    # (within a push interval; until then the call only counts as a request).
    wait_for(lambda: bool(_metric_name(stub, forgotten)) and len(service.engine) == 3,
              timeout=10 * PUSH_SECONDS)
    assert {t.target_id.split("/")[1] for t in service.engine.targets()} == {
        "asked", "forgotten", "warm"
    }

    clock.offset = 1_000  # long after: only the configured target stays
    wait_for(lambda: len(service.engine) == 1, timeout=30)
    (warm,) = service.engine.targets()
    assert warm.configured and warm.target_id.startswith("shop/warm/")
    # The dropped targets' parsed triggers go too, once the front has been told.
    wait_for(lambda: len(service.resolver) == 0, timeout=10 * PUSH_SECONDS,
             what="the dropped targets' triggers let go")


def test_with_no_servers_configured_no_address_is_queried(
    proxy: RecordingProxy,
    make_service: Callable[..., Service],
    stub_for: Callable[[Service], pb_grpc.ExternalScalerStub],
) -> None:
    # Any client that reaches the gRPC port could otherwise make forecaster query any address
    # and echo what came back.
    service = make_service(_settings(()))
    stub = stub_for(service)
    marker = "no_server_marker"
    ref = _ref(_keda(_metadata(proxy.url, query=f"sum(absent_{marker})")))
    name = stub.GetMetricSpec(ref, timeout=10).metricSpecs[0].metricName
    for error in refusals(stub, ref, name):
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = error.details() or ""
        assert "serverAddress" in details and "FORECASTER_PROMETHEUS_URL" in details
    assert not proxy.requests_for(marker)
    assert len(service.engine) == 0


def test_refusals_name_no_configured_server_and_quote_only_a_prefix_of_a_query(
    prometheus: PrometheusServer,
    proxy: RecordingProxy,
    make_service: Callable[..., Service],
    stub_for: Callable[[Service], pb_grpc.ExternalScalerStub],
) -> None:
    servers = (PrometheusServerConfig(url=prometheus.url), PrometheusServerConfig(url=proxy.url))
    stub = stub_for(make_service(_settings(servers)))
    elsewhere = _ref(_metadata("http://elsewhere:9090"))
    name = stub.GetMetricSpec(elsewhere, timeout=10).metricSpecs[0].metricName
    for error in refusals(stub, elsewhere, name):
        details = error.details() or ""
        assert "'http://elsewhere:9090' is not a configured" in details
        assert "(of 2 configured)" in details
        assert prometheus.url not in details and proxy.url not in details
    marker = "long_query_marker"
    long = _ref(_metadata(proxy.url, query=f"sum({marker}{'x' * 100_000})"))
    name = stub.GetMetricSpec(long, timeout=10).metricSpecs[0].metricName
    for error in refusals(stub, long, name):
        details = error.details() or ""
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("query: must be at most 8192 bytes") and len(details) < 300
    assert not proxy.requests_for(marker)


def test_one_server_from_the_environment_without_a_config_file() -> None:
    url = "http://prometheus.monitoring:9090"
    settings = load_settings(env={"FORECASTER_PROMETHEUS_URL": url})
    assert [server.url for server in settings.servers] == [url]


@pytest.mark.parametrize("configured_slash", ["", "/"])
def test_a_configured_url_matches_with_or_without_a_trailing_slash(
    prometheus: PrometheusServer,
    make_service: Callable[..., Service],
    stub_for: Callable[[Service], pb_grpc.ExternalScalerStub],
    configured_slash: str,
) -> None:
    server = PrometheusServerConfig(url=prometheus.url + configured_slash)
    service = make_service(_settings((server,)))
    stub = stub_for(service)
    names = {_metric_name(stub, _ref(_metadata(prometheus.url + slash))) for slash in ("", "/")}
    assert len(names) == 1  # one canonical address, one metric
    assert len(service.engine) == 1
    with pytest.raises(grpc.RpcError) as caught:
        stub.IsActive(_ref(_metadata("http://127.0.0.1:1")), timeout=10)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "serverAddress" in caught.value.details()


def test_the_configured_credentials_are_sent_to_the_server(
    proxy: RecordingProxy,
    make_service: Callable[..., Service],
    stub_for: Callable[[Service], pb_grpc.ExternalScalerStub],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "refreshInterval": "1s",
        "prometheus": [{
            "url": proxy.url + "/",
            "bearerTokenFile": str(token_file),
            "headers": {"X-Scope-OrgID": ORG},
            "timeout": "5s",
        }],
    }))
    settings = load_settings(
        config, env={}, overrides={"grpcPort": 0, "httpPort": 0, "host": "127.0.0.1"}
    )
    service = make_service(settings)
    stub = stub_for(service)
    marker = "credentials_marker"
    query = f'sum(web_requests{{job="web"}}) or vector(0) * sum(absent_{marker})'
    ref = _ref(_keda(_metadata(proxy.url, query=query)))
    name = _metric_name(stub, ref)
    stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName=name), timeout=15)

    seen = proxy.requests_for(marker)
    assert any("/api/v1/query_range" in path for path, _, _ in seen)
    assert any("/api/v1/query?" in path for path, _, _ in seen)
    assert all(auth == f"Bearer {TOKEN}" and org == ORG for _, auth, org in seen)

    # The file is read at each request: a rotated token is sent from the next refresh on.
    token_file.write_text("rotated-token")
    wait_for(lambda: proxy.requests_for(marker)[-1][1] == "Bearer rotated-token", timeout=15)
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(settings)


def test_a_dropped_target_is_warned_about_its_unknown_keys_again_when_it_comes_back(
    prometheus: PrometheusServer,
    make_service: Callable[..., Service],
    stub_for: Callable[[Service], pb_grpc.ExternalScalerStub],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="forecaster.targets")
    clock = Clock()
    service = make_service(
        _settings((PrometheusServerConfig(url=prometheus.url),), idle_seconds=60), clock=clock
    )
    stub = stub_for(service)
    noisy = _ref({**_metadata(prometheus.url), "lookback": "1h"})
    _metric_name(stub, noisy)
    assert len(service.engine) == 1

    clock.offset = 80  # dropped as idle; its trigger let go once the front has been told
    wait_for(lambda: len(service.engine) == 0 and len(service.resolver) == 0,
             timeout=30, what="the dropped target and its trigger let go")
    wait_for(lambda: bool(_metric_name(stub, noisy)) and len(service.engine) == 1,
             timeout=10 * PUSH_SECONDS, what="the target registered anew")

    warnings = [r.getMessage() for r in caplog.records if "unknown metadata" in r.getMessage()]
    assert len(warnings) == 2, warnings  # the dropped target's id left the warned set
    assert all("lookback" in message for message in warnings)
