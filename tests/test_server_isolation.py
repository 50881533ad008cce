"""One hung Prometheus server next to a healthy one: the healthy server's targets stay fresh
and served, a refresh reads a bounded number of queries, and the service stops promptly with
queries hung in flight (in process and as a `forecaster serve` process sent SIGTERM)."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
import yaml

from forecaster.config import ConfiguredTarget, EngineSettings, Settings, load_settings
from forecaster.errors import InvalidInputError, NotReadyError
from forecaster.service import Service
from forecaster.sources.prometheus import (
    DEFAULT_MAX_CONCURRENT_QUERIES,
    MAX_POINTS_PER_REQUEST,
    PrometheusServerConfig,
    PrometheusSource,
)
from forecaster.spec import MAX_POINTS
from tests.support.prometheus import PrometheusServer, backfill, write_openmetrics
from tests.support.proxy import RecordingProxy
from tests.support.waiting import wait_for

QUERY = 'sum(steady_requests{job="steady"})'
HUNG_TARGETS = 10
STOP_BUDGET_SECONDS = 10.0


class HungServer:
    """Accepts connections and reads nothing, answers nothing: a Prometheus that hangs."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.accepted: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="hung-server", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def connections(self) -> int:
        with self._lock:
            return len(self.accepted)

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return  # closed
            with self._lock:
                self.accepted.append(connection)

    def close(self) -> None:
        self.socket.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept
        self._thread.join(timeout=5)
        self.socket.close()
        with self._lock:
            for connection in self.accepted:
                connection.close()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    root = tmp_path_factory.mktemp("isolation")
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    index = pd.date_range(now - timedelta(days=36), now + timedelta(hours=2), freq="1min")
    series = pd.Series(5.0, index=index)
    write_openmetrics(series, "steady_requests", root / "steady.om", {"job": "steady"})
    backfill([root / "steady.om"], root / "blocks")
    with PrometheusServer(blocks_dir=root / "blocks", workdir=root / "prom") as server:
        yield server


@pytest.fixture
def hung() -> Iterator[HungServer]:
    server = HungServer()
    yield server
    server.close()


def _metadata(url: str, **extra: str) -> dict[str, str]:
    return {"serverAddress": url, "query": QUERY, "targetValue": "10", "model": "naive",
            "historyWindow": "1h", **extra}


def _targets(hung_url: str, healthy_url: str) -> tuple[ConfiguredTarget, ...]:
    # The hung server's targets come first: they warm first and would take every shared thread.
    on_hung = tuple(ConfiguredTarget("shop", f"hung-{i}", _metadata(hung_url))
                    for i in range(HUNG_TARGETS))
    return (*on_hung, ConfiguredTarget("shop", "healthy", _metadata(healthy_url)))


def _seconds_until(predicate: Callable[[], bool], timeout: float) -> float:
    """Seconds until `predicate` held (through the shared wait helper)."""
    began = time.monotonic()
    wait_for(predicate, timeout)
    return time.monotonic() - began


def _served(service: Service, target_id: str) -> bool:
    try:
        service.engine.serve(target_id, wait=False)
    except NotReadyError:
        return False
    return True


@pytest.fixture
def service_with(
    prometheus: PrometheusServer, hung: HungServer
) -> Iterator[Callable[[], Service]]:
    started: list[Service] = []

    def make() -> Service:
        settings = Settings(
            engine=EngineSettings(refresh_seconds=1.0, refit_seconds=3600.0, fit_workers=1,
                                  first_value_wait_seconds=5.0),
            servers=(PrometheusServerConfig(url=hung.url, timeout_seconds=30.0),
                     PrometheusServerConfig(url=prometheus.url)),
            targets=_targets(hung.url, prometheus.url),
            grpc_port=0, http_port=0, host="127.0.0.1",
        )
        service = Service(settings, fit_pool=ThreadPoolExecutor(1))
        started.append(service)
        service.start()
        return service

    yield make
    for service in started:
        service.stop()


def _healthy_id(service: Service) -> str:
    (target,) = [t for t in service.engine.targets() if t.target_id.startswith("shop/healthy/")]
    return target.target_id


def test_a_hung_server_delays_only_its_own_targets(
    service_with: Callable[[], Service], hung: HungServer
) -> None:
    service = service_with()
    healthy = _healthy_id(service)
    first = _seconds_until(lambda: _served(service, healthy), timeout=20.0)
    # The hung server holds its own lane full, and no more: its queries wait their turn.
    _seconds_until(lambda: hung.connections() >= DEFAULT_MAX_CONCURRENT_QUERIES, timeout=10.0)
    target = service.engine.get(healthy)
    stamp = target.snapshot.current_time
    assert stamp is not None
    # Refreshed again, and still served, while every refresh on the hung server hangs.
    _seconds_until(lambda: (target.snapshot.current_time or 0.0) > stamp, timeout=15.0)
    assert _served(service, healthy)
    assert hung.connections() == DEFAULT_MAX_CONCURRENT_QUERIES
    assert not any(_served(service, t.target_id) for t in service.engine.targets()
                   if t.target_id != healthy)
    print(f"\nhealthy target served {first:.2f} s after start-up, "
          f"{HUNG_TARGETS} targets hung on the other server")


def test_service_stops_promptly_with_queries_hung_in_flight(
    service_with: Callable[[], Service], hung: HungServer
) -> None:
    service = service_with()
    _seconds_until(lambda: hung.connections() >= DEFAULT_MAX_CONCURRENT_QUERIES, timeout=10.0)
    began = time.monotonic()
    service.stop()
    seconds = time.monotonic() - began
    print(f"\nService.stop() took {seconds:.2f} s with "
          f"{hung.connections()} queries hung in flight")
    assert seconds < STOP_BUDGET_SECONDS


def test_sigterm_ends_forecaster_serve_promptly_with_queries_hung_in_flight(
    prometheus: PrometheusServer, hung: HungServer, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "refreshInterval": "1s",
        "fitWorkers": 1,
        "prometheus": [{"url": hung.url, "timeout": "30s"}, {"url": prometheus.url}],
        "targets": [{"namespace": t.namespace, "name": t.name, "metadata": dict(t.metadata)}
                    for t in _targets(hung.url, prometheus.url)],
    }))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "forecaster.cli", "serve", "--config", str(config),
         "--grpc-port", "0", "--http-port", "0", "--host", "127.0.0.1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        _seconds_until(lambda: hung.connections() >= DEFAULT_MAX_CONCURRENT_QUERIES, timeout=60.0)
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        seconds = time.monotonic() - began
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stderr = process.stderr.read().decode() if process.stderr else ""
        if process.stderr:
            process.stderr.close()
    print(f"\nforecaster serve exited {code} {seconds:.2f} s after SIGTERM with "
          f"{hung.connections()} queries hung in flight")
    assert code == 0, stderr[-2000:]
    assert seconds < STOP_BUDGET_SECONDS


def test_one_refresh_of_the_longest_history_sends_a_bounded_number_of_queries(
    prometheus: PrometheusServer,
) -> None:
    proxy = RecordingProxy(prometheus.url)
    thread = threading.Thread(target=proxy.serve_forever, name="proxy", daemon=True)
    thread.start()
    try:
        settings = Settings(
            engine=EngineSettings(refresh_seconds=3600.0, refit_seconds=3600.0, fit_workers=1),
            servers=(PrometheusServerConfig(url=proxy.url),), grpc_port=0, http_port=0,
            host="127.0.0.1",
            targets=(ConfiguredTarget("shop", "long", _metadata(
                proxy.url, step="60s", historyWindow=f"{MAX_POINTS * 60}s")),),
        )
        service = Service(settings, fit_pool=ThreadPoolExecutor(1))
        service.start()
        try:
            (target,) = service.engine.targets()
            _seconds_until(lambda: target.snapshot.current_value is not None, timeout=30.0)
            _seconds_until(lambda: not target.refreshing, timeout=10.0)
        finally:
            service.stop()
    finally:
        proxy.shutdown()
        proxy.server_close()
    ranges = [seen for seen in proxy.seen if seen[0].startswith("/api/v1/query_range?")]
    instants = [seen for seen in proxy.seen if seen[0].startswith("/api/v1/query?")]
    assert len(ranges) == math.ceil(MAX_POINTS / MAX_POINTS_PER_REQUEST) == 5
    assert len(instants) == 1


def test_max_concurrent_queries_is_read_and_bounded(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"prometheus": [
        {"url": "http://a:9090", "maxConcurrentQueries": 2}, {"url": "http://b:9090"}]}))
    a, b = load_settings(config, env={}).servers
    assert (a.max_concurrent_queries, b.max_concurrent_queries) == (2, 4)
    config.write_text(yaml.safe_dump({"prometheus": [
        {"url": "http://a:9090", "maxConcurrentQueries": 0}]}))
    with pytest.raises(InvalidInputError) as caught:
        load_settings(config, env={})
    assert caught.value.field == "prometheus[0].maxConcurrentQueries"
    assert "between 1 and 64" in caught.value.reason
    source = PrometheusSource(PrometheusServerConfig(url="http://a:9090",
                                                     max_concurrent_queries=3))
    assert "max_concurrent_queries=3" in repr(source)
