"""Two `forecaster serve` replicas behind one address, as KEDA meets them in a cluster.

No Kubernetes runs here, so its Service and kube-proxy are played by a small TCP proxy that
sends each new connection to the first replica whose /readyz answers 200 (a not-ready pod
leaves the Service), and keeps it there until either side closes it, as KEDA's one HTTP/2
connection stays on one pod. Everything else is real: `forecaster serve` processes with the
same config, one real Prometheus with backfilled history, and a real gRPC client calling in
KEDA's order (GetMetricSpec, GetMetrics, IsActive) and retrying a failed step once, as KEDA
does after refreshing its scaler.

Checked: two replicas answer the same trigger with planned loads within 1% of each other
once both have seen the same newest point; /readyz does not depend on Prometheus and turns
503 as soon as stopping begins; and when the replica KEDA is connected to gets SIGTERM, or
is killed, no poll fails and the next ones are answered by the other at once. (Three are
started, so that each hand-over test finds two serving.)
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pandas as pd
import pytest
import requests
import yaml

from forecaster.config import load_settings, with_overrides
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.service import Service
from tests.support.prometheus import PrometheusServer, backfill, write_openmetrics
from tests.support.waiting import wait_for

QUERY = 'sum(replica_requests{job="replicas"})'
METRIC = "web-load"
TARGET_ID = f"shop/web/{METRIC}"
STARTUP_SECONDS = 90.0  # bound on a replica's start and first fit (three at once)
KEDA_DEADLINE_SECONDS = 3.0  # KEDA's deadline on the calls made for an HPA read
AGREEMENT = 0.01  # relative difference allowed between the replicas' planned loads
ROUNDS_AFTER_STOP = 5  # KEDA-order rounds to see answered by the remaining replica

T = TypeVar("T")


def _command() -> list[str]:
    script = Path(sys.executable).parent / "forecaster"
    return [str(script)] if script.exists() else [sys.executable, "-m", "forecaster.cli"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}



# -- history --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """A daily wave, one sample a minute, from three days ago to two hours ahead, rising at its
    steepest now: the forecast, the current load and a reactive answer all differ, so that
    replicas that did not agree would show it."""
    root = tmp_path_factory.mktemp("two-replicas")
    now = pd.Timestamp(datetime.now(UTC)).floor("1min")
    index = pd.date_range(now - pd.Timedelta(days=3), now + pd.Timedelta(hours=2), freq="1min")
    phase = (index - now).total_seconds().to_numpy() / 86_400.0
    load = pd.Series(100.0 + 60.0 * np.sin(2 * math.pi * phase), index=index)
    write_openmetrics(load, "replica_requests", root / "load.om", {"job": "replicas"})
    backfill([root / "load.om"], root / "blocks")
    with PrometheusServer(blocks_dir=root / "blocks", workdir=root / "prom") as server:
        yield server


def _metadata(url: str) -> dict[str, str]:
    """The trigger both replicas forecast from start-up (listed in their config, as the
    ConfigMap lists it), and that KEDA then asks about. seasonal_naive: a fit in milliseconds."""
    return {
        "serverAddress": url,
        "query": QUERY,
        "targetValue": "10",
        "model": "seasonal_naive",
        "step": "1m",
        "historyWindow": "2d",
        "startupSeconds": "1800",
        "quantile": "0.9",
        "metricName": METRIC,
    }


def _ref(url: str) -> pb.ScaledObjectRef:
    # KEDA sends all of the trigger's metadata, its own scalerAddress included.
    metadata = {**_metadata(url), "scalerAddress": "forecaster.forecaster.svc.cluster.local:50051"}
    return pb.ScaledObjectRef(namespace="shop", name="web", scalerMetadata=metadata)


# -- the replicas ---------------------------------------------------------------------------


@dataclass
class Replica:
    """One `forecaster serve` process; its ports come from its own log (it binds port 0)."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    grpc_port: int = 0
    http_port: int = 0

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def ports(self) -> tuple[int, int] | None:
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n"
                                 f"{self.text()}")
        found = re.search(r"serving gRPC on port (\d+) and HTTP on port (\d+)", self.text())
        return (int(found[1]), int(found[2])) if found else None

    def ready(self) -> bool:
        try:
            return requests.get(self.url("/readyz"), timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def ready_or_none(self) -> bool | None:
        return self.ready() or None

    def fitted_or_none(self) -> bool | None:
        """True once the configured target's first fit is done (in a worker process)."""
        return self.status()["fits"]["count"] >= 1 or None

    def status(self) -> dict[str, Any]:
        answer = requests.get(self.url("/api/v1/targets"), timeout=5)
        answer.raise_for_status()
        (target,) = answer.json()["targets"]
        return dict(target)

    def origin(self) -> str:
        """The forecast's origin: the newest grid point this replica has seen."""
        answer = requests.get(self.url(f"/api/v1/targets/{TARGET_ID}/forecast"),
                              params={"horizon": 1}, timeout=5)
        answer.raise_for_status()
        return str(answer.json()["origin"])

    def alive(self) -> bool:
        return self.process.poll() is None

    def crash(self) -> None:
        """What a container's end does: every process in it killed at once (its own session
        here, as its PID namespace there), the gRPC front and fit workers too."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)  # a loaded machine reaps slowly

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _start(name: str, config: Path, folder: Path) -> Replica:
    log = folder / f"{name}.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [*_command(), "serve", "--config", str(config), "--grpc-port", "0",
             "--http-port", "0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=_env(),
            start_new_session=True,
        )
    return Replica(name, process, log)


@pytest.fixture(scope="module")
def replicas(
    prometheus: PrometheusServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Replica]]:
    """Three replicas of one config, started together, each ready and past its first fit:
    each hand-over test ends one, and the next finds two still serving."""
    folder = tmp_path_factory.mktemp("replicas")
    config = folder / "forecaster.yaml"
    config.write_text(yaml.safe_dump({
        "host": "127.0.0.1",
        "fitWorkers": 1,
        "refreshInterval": "2s",
        "prometheus": [{"url": prometheus.url, "timeout": "5s"}],
        "targets": [{"namespace": "shop", "name": "web", "metadata": _metadata(prometheus.url)}],
    }))
    started = [_start(name, config, folder) for name in ("a", "b", "c")]
    try:
        for replica in started:
            replica.grpc_port, replica.http_port = wait_for(
                replica.ports, STARTUP_SECONDS, what=f"{replica.name} serving"
            )
        for replica in started:
            wait_for(replica.ready_or_none, STARTUP_SECONDS, what=f"{replica.name} ready")
            wait_for(replica.fitted_or_none, STARTUP_SECONDS, what=f"{replica.name}'s first fit")
        yield started
    finally:
        for replica in started:
            replica.stop()


def _two_alive(replicas: list[Replica]) -> tuple[Replica, Replica]:
    alive = [replica for replica in replicas if replica.alive()]
    assert len(alive) >= 2, [replica.name for replica in alive]
    return alive[0], alive[1]


def _keda_round(
    stub: pb_grpc.ExternalScalerStub, ref: pb.ScaledObjectRef, retried: list[str] | None = None
) -> float:
    """One poll as KEDA makes it: GetMetricSpec, then GetMetrics with the name it returned and
    IsActive; the planned load served (metricValueFloat, read by KEDA 2.17+). With `retried`,
    each of the two steps is tried again once after a failure, as KEDA does (it refreshes the
    scaler and retries, pkg/scaling/cache/scalers_cache.go), and the first failure is noted."""

    def step(call: Callable[[], T]) -> T:
        try:
            return call()
        except grpc.RpcError as exc:
            if retried is None:
                raise
            retried.append(f"{exc.code().name}: {exc.details()}")
            return call()

    def metrics_and_activity() -> pb.MetricValue:
        request = pb.GetMetricsRequest(scaledObjectRef=ref, metricName=spec.metricName)
        (value,) = stub.GetMetrics(request, timeout=KEDA_DEADLINE_SECONDS).metricValues
        stub.IsActive(ref, timeout=KEDA_DEADLINE_SECONDS)
        return value

    (spec,) = step(lambda: stub.GetMetricSpec(ref, timeout=KEDA_DEADLINE_SECONDS)).metricSpecs
    value = step(metrics_and_activity)
    assert value.metricName == spec.metricName == METRIC
    return float(value.metricValueFloat)


# -- Kubernetes' Service, played by a proxy -------------------------------------------------


class ServiceProxy:
    """A Service with kube-proxy behind it: each new TCP connection goes to the first backend
    whose /readyz answers 200 at that moment and stays there until one side closes it.
    `routes` lists the backend of each connection made."""

    def __init__(self, backends: list[Replica]) -> None:
        self.backends = backends
        self.routes: list[str] = []
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, name="proxy", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            self._sockets.append(client)
            backend = next((b for b in self.backends if b.ready()), None)
            if backend is None:  # no endpoints: the connection is refused
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", backend.grpc_port), timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._sockets.append(upstream)
            self.routes.append(backend.name)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()
        self._thread.join(5)
        for sock in self._sockets:
            sock.close()


@dataclass
class Round:
    began: float
    ended: float
    value: float | None = None
    error: str | None = None  # the poll failed, KEDA's retry included
    retried: list[str] = field(default_factory=list)  # first attempts that failed


@dataclass
class Caller:
    """KEDA, polling through the Service without pause, one round after another."""

    stub: pb_grpc.ExternalScalerStub
    ref: pb.ScaledObjectRef
    rounds: list[Round] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def run(self) -> None:
        while not self.done.is_set():
            began = time.monotonic()
            retried: list[str] = []
            try:
                value, error = _keda_round(self.stub, self.ref, retried), None
            except grpc.RpcError as exc:
                value, error = None, f"{exc.code().name}: {exc.details()}"
            with self.changed:
                self.rounds.append(Round(began, time.monotonic(), value, error, retried))
                self.changed.notify_all()
            self.done.wait(0.02)  # a round every 20 ms or so: far more often than KEDA

    def wait_for(self, predicate: Callable[[list[Round]], bool], timeout: float) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self.rounds), timeout), self.rounds


# -- the tests ------------------------------------------------------------------------------


def test_replicas_agree_once_they_have_seen_the_same_newest_point(
    replicas: list[Replica], prometheus: PrometheusServer
) -> None:
    ref = _ref(prometheus.url)
    a, b = _two_alive(replicas)

    def agreed() -> tuple[float, float] | None:
        # The same newest point before and after the calls: no refresh landed in between.
        before = {a.origin(), b.origin()}
        with (grpc.insecure_channel(f"127.0.0.1:{a.grpc_port}") as to_a,
              grpc.insecure_channel(f"127.0.0.1:{b.grpc_port}") as to_b):
            values = (_keda_round(pb_grpc.ExternalScalerStub(to_a), ref),
                      _keda_round(pb_grpc.ExternalScalerStub(to_b), ref))
        return values if len(before | {a.origin(), b.origin()}) == 1 else None

    planned_a, planned_b = wait_for(agreed, 60, what="the same newest point on both replicas")
    difference = abs(planned_a - planned_b) / max(planned_a, planned_b)
    print(f"\nplanned loads {planned_a:.4f} and {planned_b:.4f}: {difference:.4%} apart")
    assert difference < AGREEMENT, (planned_a, planned_b)
    # Both serve a forecast, not the reactive current load, which the rising wave leaves behind.
    for replica in (a, b):
        status = replica.status()
        assert status["mode"] == "forecast", status
        assert status["plannedValue"] > status["currentValue"] * (1 + 2 * AGREEMENT), status


def test_readiness_stands_without_prometheus_and_falls_at_once_when_stopping(
    tmp_path: Path,
) -> None:
    """Ready with Prometheus unreachable (GetMetricSpec answers, GetMetrics says UNAVAILABLE,
    so KEDA's fallback can count); not ready from the moment stopping begins, while the gRPC
    front still answers: the Service stops sending connections before GOAWAY sends them on."""
    with socket.create_server(("127.0.0.1", 0)) as closed:
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"  # nothing listens once closed
    config = tmp_path / "forecaster.yaml"
    config.write_text(yaml.safe_dump({
        "prometheus": [{"url": dead, "timeout": "1s"}],
        "targets": [{"namespace": "shop", "name": "web", "metadata": _metadata(dead)}],
    }))
    settings = with_overrides(load_settings(config, env={}), grpc_port=0, http_port=0,
                              host="127.0.0.1")
    service = Service(settings)
    service.start()
    try:
        readyz = f"http://127.0.0.1:{service.http_port}/readyz"
        target = service.engine.get(TARGET_ID)
        wait_for(lambda: target.refresh_failures > 0 or None, 30, what="a failed refresh")
        assert requests.get(readyz, timeout=5).status_code == 200
        ref = _ref(dead)
        with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            stub = pb_grpc.ExternalScalerStub(channel)
            (spec,) = stub.GetMetricSpec(ref, timeout=KEDA_DEADLINE_SECONDS).metricSpecs
            assert spec.metricName == METRIC
            request = pb.GetMetricsRequest(scaledObjectRef=ref, metricName=METRIC)
            with pytest.raises(grpc.RpcError) as failed:
                stub.GetMetrics(request, timeout=KEDA_DEADLINE_SECONDS)
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE

            service.stopped.set()  # what SIGTERM's handler does, before anything stops
            answer = requests.get(readyz, timeout=5)
            assert answer.status_code == 503
            assert "shutting down" in answer.json()["error"]["message"]
            (spec,) = stub.GetMetricSpec(ref, timeout=KEDA_DEADLINE_SECONDS).metricSpecs
            assert spec.metricName == METRIC  # still served until the front's GOAWAY
    finally:
        service.stop()


@dataclass
class HandOver:
    """What KEDA saw while the replica it was connected to ended."""

    rounds: list[Round]
    routes: list[str]
    began: float  # when the replica was told to end (or killed)
    ended: float  # when its process was gone

    def after(self) -> list[Round]:
        return [r for r in self.rounds if r.began > self.ended]


def _hand_over(first: Replica, second: Replica, end: Callable[[Replica], None],
               ref: pb.ScaledObjectRef) -> HandOver:
    """KEDA polls through the Service, connected to `first`; `end(first)`; polls go on until
    ROUNDS_AFTER_STOP rounds began after `first` was gone."""
    proxy = ServiceProxy([first, second])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
            caller = Caller(pb_grpc.ExternalScalerStub(channel), ref)
            thread = threading.Thread(target=caller.run, name="keda", daemon=True)
            thread.start()
            try:
                caller.wait_for(lambda rounds: len(rounds) >= 3, 30)
                assert proxy.routes == [first.name]  # both ready: the first endpoint
                began = time.monotonic()
                end(first)
                ended = time.monotonic()
                caller.wait_for(
                    lambda rounds: sum(r.began > ended for r in rounds) >= ROUNDS_AFTER_STOP, 30
                )
            finally:
                caller.done.set()
                thread.join(10)
    finally:
        proxy.close()
    return HandOver(caller.rounds, proxy.routes, began, ended)


def _check(seen: HandOver, first: Replica, second: Replica, what: str) -> None:
    """No poll failed (KEDA's retry included); polls moved over on one new connection, to the
    replica still ready, and were answered at once, well within KEDA's deadline."""
    failures = [r for r in seen.rounds if r.error is not None]
    assert not failures, failures
    # A call that crosses the hand-over can fail (gRPC's server cancels calls that arrive once
    # its shutdown began; a killed one resets them); KEDA's one retry lands on the new
    # connection. Only then.
    retried = [r for r in seen.rounds if r.retried]
    assert all(seen.began <= r.began <= seen.ended for r in retried), retried
    assert all(e.split(":")[0] in ("CANCELLED", "UNAVAILABLE") for r in retried
               for e in r.retried), retried
    assert seen.routes == [first.name, second.name], seen.routes
    after = seen.after()
    assert after[0].ended - after[0].began < 1.0, after[0]  # answered at once
    slowest = max(r.ended - r.began for r in seen.rounds)
    assert slowest < KEDA_DEADLINE_SECONDS, slowest
    print(f"\n{what}: gone in {seen.ended - seen.began:.2f}s; {len(seen.rounds)} polls, none "
          f"failed, {len(retried)} retried; slowest {slowest * 1000:.0f} ms; first on "
          f"{second.name} {(after[0].ended - after[0].began) * 1000:.0f} ms")


def test_sigterm_hands_keda_over_to_the_other_replica_without_a_failure(
    replicas: list[Replica], prometheus: PrometheusServer
) -> None:
    first, second = _two_alive(replicas)

    def terminate(replica: Replica) -> None:
        replica.process.send_signal(signal.SIGTERM)
        replica.process.wait(timeout=30)

    seen = _hand_over(first, second, terminate, _ref(prometheus.url))
    _check(seen, first, second, "SIGTERM")
    text = first.text()
    assert first.process.returncode == 0, text
    assert "shutting down" in text and "Traceback" not in text


def test_a_crash_hands_keda_over_to_the_other_replica_without_a_failure(
    replicas: list[Replica], prometheus: PrometheusServer
) -> None:
    first, second = _two_alive(replicas)
    seen = _hand_over(first, second, Replica.crash, _ref(prometheus.url))
    _check(seen, first, second, "SIGKILL")
