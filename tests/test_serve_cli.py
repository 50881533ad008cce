"""`forecaster serve` as a real process: it starts from a config file, answers health checks and
KEDA's calls, stops gracefully on SIGTERM, keeps its secrets out of its log, and refuses a bad
config with exit 2 and one line naming the setting."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pandas as pd
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from forecaster.cli import main
from forecaster.config import Settings
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from tests.support.prometheus import PrometheusServer, backfill, free_port, write_openmetrics
from tests.support.waiting import wait_for

TOKEN = "serve-cli-bearer-token-0xfeed"
LOAD = 12.5
QUERY = 'sum(cli_requests{job="cli"})'
STARTUP_SECONDS = 60.0


def _command() -> list[str]:
    script = Path(sys.executable).parent / "forecaster"
    return [str(script)] if script.exists() else [sys.executable, "-m", "forecaster.cli"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """A constant load from two days ago to two hours ahead, one sample a minute: instant
    queries find a sample however long the session runs."""
    root = tmp_path_factory.mktemp("serve-cli")
    now = pd.Timestamp(datetime.now(UTC)).floor("1min")
    index = pd.date_range(now - pd.Timedelta(days=2), now + pd.Timedelta(hours=2), freq="1min")
    write_openmetrics(pd.Series(LOAD, index=index), "cli_requests", root / "cli.om",
                      {"job": "cli"})
    backfill([root / "cli.om"], root / "blocks")
    with PrometheusServer(blocks_dir=root / "blocks", workdir=root / "prom") as server:
        yield server


def _metadata(url: str) -> dict[str, str]:
    return {
        "serverAddress": url,
        "query": QUERY,
        "targetValue": "5",
        "model": "naive",
        "historyWindow": "1d",
        "metricName": "cli-load",
    }


def _serving(process: subprocess.Popen[bytes], health: health_pb2_grpc.HealthStub,
             http_port: int) -> bool:
    """Both servers answer healthy; AssertionError at once if serve has exited."""
    if process.poll() is not None:
        raise AssertionError(f"serve exited with {process.returncode}")
    try:
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz",
                                    timeout=1) as response:
            return answer.status == health_pb2.HealthCheckResponse.SERVING and (
                response.status == 200
            )
    except (grpc.RpcError, OSError):
        return False


def _fits(http_port: int) -> int:
    """The configured target's fits so far (each in a worker process)."""
    url = f"http://127.0.0.1:{http_port}/api/v1/targets"
    with urllib.request.urlopen(url, timeout=5) as response:
        (target,) = json.loads(response.read())["targets"]
    return int(target["fits"]["count"])


@contextmanager
def _log_on_failure(log: Path) -> Iterator[None]:
    """A failed wait's message, followed by what serve logged."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{log.read_text()}") from None


def test_serve_answers_keda_and_stops_gracefully_on_sigterm(
    prometheus: PrometheusServer, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text(f"{TOKEN}\n")
    config = tmp_path / "forecaster.yaml"
    config.write_text(yaml.safe_dump({
        "host": "127.0.0.1",
        "fitWorkers": 1,
        "refreshInterval": "5s",
        "prometheus": [{"url": prometheus.url, "bearerTokenFile": str(token), "timeout": "5s"}],
        "targets": [{"namespace": "shop", "name": "web", "metadata": _metadata(prometheus.url)}],
    }))
    grpc_port, http_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [*_command(), "serve", "--config", str(config), "--grpc-port", str(grpc_port),
             "--http-port", str(http_port), "--log-level", "DEBUG"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=_env(),
        )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel, _log_on_failure(log):
            health = health_pb2_grpc.HealthStub(channel)
            wait_for(lambda: _serving(process, health, http_port), STARTUP_SECONDS,
                     what="serve ready", every=0.2)
        ref = pb.ScaledObjectRef(
            namespace="shop", name="web",
            scalerMetadata={**_metadata(prometheus.url), "scalerAddress": "forecaster:50051"},
        )
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.ExternalScalerStub(channel)
            (spec,) = stub.GetMetricSpec(ref, timeout=10).metricSpecs
            assert (spec.metricName, spec.targetSizeFloat) == ("cli-load", 5.0)
            request = pb.GetMetricsRequest(scaledObjectRef=ref, metricName="cli-load")
            (value,) = stub.GetMetrics(request, timeout=15).metricValues
            assert value.metricName == "cli-load"
            assert value.metricValueFloat == pytest.approx(LOAD)  # constant: any model agrees
            assert value.metricValue == 13
            # The first fit runs in a worker process; once done, the forecast is served. (A fit
            # still running at SIGTERM is waited for at exit: not what this test measures.)
            with _log_on_failure(log):
                wait_for(lambda: _fits(http_port) >= 1, STARTUP_SECONDS, what="the first fit",
                         every=0.2)
            (value,) = stub.GetMetrics(request, timeout=15).metricValues
            assert value.metricValueFloat == pytest.approx(LOAD)

        process.send_signal(signal.SIGTERM)
        began = time.monotonic()
        code = process.wait(timeout=10)
        assert time.monotonic() - began < 10
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    text = log.read_text(encoding="utf-8", errors="replace")
    assert code == 0, text
    assert f"serving gRPC on port {grpc_port} and HTTP on port {http_port}" in text
    assert "shutting down" in text
    assert "Traceback" not in text
    assert TOKEN not in text


BAD_CONFIGS: list[tuple[dict[str, object] | None, str]] = [
    ({"refreshInterval": "soon"}, "refreshInterval"),
    ({"prometheus": [{"url": "http://p:9090", "bearerTokenFile": "/nonexistent/token"}]},
     "prometheus[0].bearerTokenFile"),
    ({"targets": [{"namespace": "shop", "name": "web",
                   "metadata": {"serverAddress": "http://p:9090", "targetValue": "5"}}]},
     "targets[0].metadata.query"),
    (None, "--config"),  # no such file
    ({"targets": [{"namespace": "shop", "name": "web", "metadata": {
        "serverAddress": "http://p:9090", "query": "up", "targetValue": "5", "step": "10s",
        "historyWindow": "1d", "startupSeconds": "3600"}}]},
     "targets[0].metadata.startupSeconds"),  # over the memory budget
]


def _bad_config(tmp_path: Path, config: dict[str, object] | None) -> Path:
    path = tmp_path / "forecaster.yaml"
    if config is not None:
        path.write_text(yaml.safe_dump(config))
    return path


def test_a_bad_config_makes_the_serve_process_exit_2_with_one_line(tmp_path: Path) -> None:
    config, where = BAD_CONFIGS[2]
    done = subprocess.run(
        [*_command(), "serve", "--config", str(_bad_config(tmp_path, config)),
         "--grpc-port", "0", "--http-port", "0", "--host", "127.0.0.1"],
        stdin=subprocess.DEVNULL, capture_output=True, env=_env(), timeout=60,
    )
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2, done.stderr.decode()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"forecaster: error: {where}: ")


def test_the_default_bind_address_is_stated_where_operators_look() -> None:
    host = Settings().host
    assert host == "0.0.0.0"
    done = subprocess.run([*_command(), "serve", "--help"], capture_output=True, text=True,
                          env=_env(), timeout=60, check=True)
    assert f"(default {host})" in " ".join(done.stdout.split())
    root = Path(__file__).parent.parent
    for document in ("README.md", "docs/deploy.md"):
        assert f"forecaster binds `{host}`" in (root / document).read_text(), document


@pytest.mark.parametrize(("flag", "setting", "what"), [
    ("--grpc-port", "grpcPort", "gRPC"), ("--http-port", "httpPort", "HTTP"),
])
def test_a_taken_port_makes_serve_exit_2_with_one_line_naming_it(
    flag: str, setting: str, what: str
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--grpc-port": "0", "--http-port": "0", flag: str(port)}
        done = subprocess.run(
            [*_command(), "serve", "--host", "127.0.0.1",
             *(part for item in ports.items() for part in item)],
            stdin=subprocess.DEVNULL, capture_output=True, env=_env(), timeout=60,
        )
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2, done.stderr.decode()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"forecaster: error: {setting}: cannot serve {what} on 127.0.0.1:{port}: "
        f"Address already in use: choose a free port ({flag}, "
    ), lines[0]


@pytest.mark.parametrize(
    ("config", "where"),
    BAD_CONFIGS,
    ids=["bad-interval", "unreadable-token", "bad-target", "no-file", "over-memory-budget"],
)
def test_a_bad_config_makes_serve_exit_2_naming_the_setting(
    config: dict[str, object] | None, where: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    def serve(service: object) -> None:
        raise AssertionError("a bad config must stop serve before it serves")

    monkeypatch.setattr("forecaster.service.run_until_signalled", serve)
    path = _bad_config(tmp_path, config)
    code = main(["serve", "--config", str(path), "--grpc-port", "0", "--http-port", "0",
                 "--host", "127.0.0.1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"forecaster: error: {where}: ")


def _environment(pid: int) -> dict[str, str]:
    """The environment a process was executed with."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().partition("=")[::2] for entry in entries if entry)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
@pytest.mark.parametrize(("given", "engine", "tunables"), [
    (None, "malloc", "glibc.malloc.tcache_count=0"), ("pymalloc", "pymalloc", None)])
def test_the_serving_process_runs_on_the_c_allocator_unless_told_otherwise(
    prometheus: PrometheusServer, tmp_path: Path, given: str | None, engine: str,
    tunables: str | None,
) -> None:
    config = tmp_path / "forecaster.yaml"
    config.write_text(yaml.safe_dump({"host": "127.0.0.1",
                                      "prometheus": [{"url": prometheus.url}]}))
    env = {key: value for key, value in _env().items()
           if key not in ("PYTHONMALLOC", "GLIBC_TUNABLES")}
    if given is not None:
        env["PYTHONMALLOC"] = given
    grpc_port, http_port = free_port(), free_port()
    process = subprocess.Popen(
        [*_command(), "serve", "--config", str(config), "--grpc-port", str(grpc_port),
         "--http-port", str(http_port)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            wait_for(lambda: _serving(process, health, http_port), STARTUP_SECONDS,
                     what="serve ready", every=0.2)
        # The same process (executed again in place), on the allocator asked for.
        assert _environment(process.pid).get("PYTHONMALLOC") == engine
        # Without glibc's per-thread caches, when it set the C allocator itself.
        assert _environment(process.pid).get("GLIBC_TUNABLES") == tunables
        (front,) = [int(pid) for task in Path(f"/proc/{process.pid}/task").glob("*")
                    for pid in (task / "children").read_text().split()]
        # Its gRPC front keeps CPython's allocator, or the one the caller chose.
        assert _environment(front).get("PYTHONMALLOC") == given
        assert _environment(front).get("GLIBC_TUNABLES") is None
    finally:
        process.terminate()
        process.wait(timeout=30)
