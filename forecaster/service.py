"""Wires one engine to both interfaces (gRPC scaler, HTTP API) and runs them until a signal."""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from types import FrameType

from prometheus_client import CollectorRegistry

from forecaster.config import Settings
from forecaster.engine import Engine
from forecaster.scaler.server import ScalerServer
from forecaster.scaler.servicer import ExternalScaler
from forecaster.sources import HistorySource
from forecaster.targets import SourceRegistry, TargetResolver
from forecaster.telemetry import Telemetry

log = logging.getLogger(__name__)


class Service:
    """The engine, the gRPC scaler and the HTTP server, started and stopped together.

    >>> service = Service(settings)     # doctest: +SKIP
    >>> service.start(); service.grpc_port, service.http_port   # doctest: +SKIP
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        source: HistorySource | None = None,
        fit_pool: Executor | None = None,
    ) -> None:
        from forecaster.api import HttpServer, create_app

        self.settings = settings
        self.registry = CollectorRegistry()
        self.telemetry = Telemetry(self.registry)
        self.engine = Engine(
            settings.engine, clock=clock, fit_pool=fit_pool, listener=self.telemetry
        )
        self.telemetry.track(self.engine)
        self.sources = SourceRegistry(settings.servers, fixed=source)
        self.resolver = TargetResolver(self.engine, settings, self.sources)
        self.servicer = ExternalScaler(
            self.engine, self.resolver, on_request=self.telemetry.grpc_request
        )
        self.grpc_server = ScalerServer(
            f"{settings.host}:{settings.grpc_port}", self.servicer, tls=settings.tls
        )
        self.grpc_port = self.grpc_server.port
        self.app = create_app(settings, self.engine, self.resolver)
        self.app.extensions["forecaster.telemetry"] = self.telemetry
        self.http_server = HttpServer(self.app, settings.host, settings.http_port)
        self.http_port = self.http_server.port

    def start(self) -> None:
        try:
            self.resolver.register_configured()
        except Exception:
            self.grpc_server.stop(0)
            self.engine.stop()
            raise
        self.engine.start()
        self.grpc_server.start()
        self.http_server.start()
        # What exists now (modules, classes, settings: 128,000 objects) lives as long as the
        # process. Out of the cyclic collector's reach, a full collection no longer walks it:
        # 64 ms per collection, a pause every call in flight would wait out, becomes 0.
        gc.collect()  # garbage first: a frozen cycle is never freed
        gc.freeze()
        log.info("serving gRPC on port %d and HTTP on port %d", self.grpc_port, self.http_port)

    def stop(self) -> None:
        try:
            self.grpc_server.stop()
        finally:
            try:
                self.http_server.stop()
            finally:
                self.engine.stop()  # also ends the fit worker processes


def run_until_signalled(service: Service) -> None:
    """Start, then stop gracefully on SIGTERM (Kubernetes) or SIGINT (Ctrl-C)."""
    done = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        done.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    service.start()
    done.wait()
    service.stop()
