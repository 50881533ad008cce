"""create_app takes the telemetry and the probes' checks it serves, over real HTTP."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client import CollectorRegistry

from forecaster.api import HttpServer, create_app
from forecaster.config import EngineSettings, Settings
from forecaster.engine import Engine
from forecaster.targets import SourceRegistry, TargetResolver
from forecaster.telemetry import Telemetry

Serve = Callable[..., str]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start an app built with the given keyword arguments; its base URL."""
    engine = Engine(EngineSettings(), fit_pool=ThreadPoolExecutor(1))
    servers: list[HttpServer] = []

    def start(**kwargs: object) -> str:
        settings = Settings(http_port=0, host="127.0.0.1")
        resolver = TargetResolver(engine, settings, SourceRegistry(()))
        app = create_app(settings, engine, resolver, **kwargs)  # type: ignore[arg-type]
        server = HttpServer(app, settings.host, 0)
        server.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        server.stop()
    engine.stop()


def test_healthz_says_what_the_liveness_check_says(serve: Serve) -> None:
    problem: list[str | None] = [None]
    url = serve(liveness=lambda: problem[0])
    assert requests.get(f"{url}/healthz", timeout=5).json() == {"status": "ok"}
    problem[0] = "the front is stuck"
    reply = requests.get(f"{url}/healthz", timeout=5)
    assert reply.status_code == 503
    assert reply.json()["error"]["message"] == "the front is stuck"


def test_readyz_says_what_the_readiness_check_says(serve: Serve) -> None:
    problem: list[str | None] = ["starting"]
    url = serve(readiness=lambda: problem[0])
    reply = requests.get(f"{url}/readyz", timeout=5)
    assert reply.status_code == 503
    assert reply.json()["error"]["message"] == "starting"
    problem[0] = None
    assert requests.get(f"{url}/readyz", timeout=5).json() == {
        "status": "ready", "configuredTargets": 0
    }


def test_metrics_serve_the_telemetry_given_and_count_requests(serve: Serve) -> None:
    registry = CollectorRegistry()
    url = serve(telemetry=Telemetry(registry, process_metrics=False))
    requests.get(f"{url}/healthz", timeout=5)
    body = requests.get(f"{url}/metrics", timeout=5).text
    counted = 'forecaster_requests_total{code="200",interface="http",method="GET /healthz"} 1.0'
    assert counted in body


def test_an_app_without_telemetry_says_metrics_are_off(serve: Serve) -> None:
    url = serve()
    assert requests.get(f"{url}/healthz", timeout=5).status_code == 200  # no check: alive
    reply = requests.get(f"{url}/metrics", timeout=5)
    assert reply.status_code == 404
    assert "no Telemetry" in reply.json()["error"]["message"]
