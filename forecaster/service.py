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
from forecaster.errors import InvalidInputError, TooManyTargetsError
from forecaster.fitting import FitPool
from forecaster.scaler.bridge import FRONT_SILENCE_SECONDS, ScalerBridge
from forecaster.sources import HistorySource
from forecaster.state import Refused, Saver, StateStore
from forecaster.targets import SourceRegistry, TargetResolver
from forecaster.telemetry import Telemetry

log = logging.getLogger(__name__)


class Service:
    """The engine, the gRPC scaler and the HTTP server, started and stopped together.

    >>> service = Service(settings)     # doctest: +SKIP
    >>> service.start(); service.grpc_port, service.http_port   # doctest: +SKIP

    `resolver` builds the trigger resolver both interfaces share from the engine, the settings
    and the sources: TargetResolver, or a subclass that a test makes misbehave on purpose.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        source: HistorySource | None = None,
        fit_pool: Executor | FitPool | None = None,
        front_silence_seconds: float = FRONT_SILENCE_SECONDS,
        state_store: StateStore | None = None,
        resolver: Callable[[Engine, Settings, SourceRegistry], TargetResolver] = TargetResolver,
    ) -> None:
        from forecaster.api import HttpServer, create_app

        self.settings = settings
        self.registry = CollectorRegistry()
        self.telemetry = Telemetry(self.registry)
        if state_store is None and settings.state_dir is not None:
            state_store = StateStore.open(settings.state_dir, "stateDir")
        if state_store is not None:
            state_store.listener = self.telemetry
        self.state_store = state_store
        self.loading: tuple[int, int] | None = None  # saved targets restored so far, of all
        self.engine = Engine(
            settings.engine, clock=clock, fit_pool=fit_pool, listener=self.telemetry,
            saver=Saver(state_store, clock=clock) if state_store is not None else None,
        )
        self.telemetry.track(self.engine)
        self.sources = SourceRegistry(settings.servers, fixed=source,
                                      refused=self.telemetry.points_refused)
        self.resolver = resolver(self.engine, settings, self.sources)
        self.stopped = threading.Event()  # set by a signal, or when the scaler front exits
        self.started = threading.Event()  # set once start() is done: for readiness
        self.failed = False
        self.scaler = ScalerBridge(
            settings, self.engine, self.resolver,
            on_request=self.telemetry.grpc_request,
            on_unexpected=self.telemetry.grpc_unexpected, on_exit=self._scaler_exited,
            front_silence_seconds=front_silence_seconds,
        )
        self.grpc_port = self.scaler.port
        try:
            self.app = create_app(settings, self.engine, self.resolver,
                                  telemetry=self.telemetry, liveness=self.problem,
                                  readiness=self.not_ready)
            self.http_server = HttpServer(self.app, settings.host, settings.http_port)
        except BaseException:  # a taken HTTP port: no scaler process left behind
            self.scaler.stop(0)
            raise
        self.http_port = self.http_server.port

    def start(self) -> None:
        # HTTP first: /healthz answers, and /readyz says why not yet, while state loads.
        self.http_server.start()
        try:
            self.restore_saved()
            self.resolver.register_configured()
        except Exception:
            self.scaler.stop(0)
            self.http_server.stop()
            self.engine.stop()
            raise
        self.engine.start()
        self.scaler.start()
        self.started.set()  # ready from here: anything start() loads comes before
        # What exists now (modules, classes, settings: 128,000 objects) lives as long as the
        # process. Out of the cyclic collector's reach, a full collection no longer walks it:
        # 64 ms per collection, a pause every call in flight would wait out, becomes 0.
        gc.collect()  # garbage first: a frozen cycle is never freed
        gc.freeze()
        log.info("serving gRPC on port %d and HTTP on port %d", self.grpc_port, self.http_port)

    def restore_saved(self) -> None:
        """Recreate every saved target (forecaster.state) before the service turns ready. A
        configured target whose spec in the config file changed starts anew; a saved target
        whose server is no longer configured, past maxTargets, or over targetMemoryBytes is
        refused."""
        store = self.state_store
        if store is None:
            return
        began = time.monotonic()
        configured = self.resolver.configured_specs()
        total, done, restored = store.saved_count(), 0, 0
        self.loading = (0, total)
        for saved in store.load():
            done += 1
            self.loading = (done, total)
            spec = configured.get(saved.target_id)
            if spec is not None and spec != saved.spec:
                log.info("target %s: the config file's trigger changed; its saved state is "
                         "not used", saved.target_id)
                continue
            try:
                self.resolver.restore(saved, configured=spec is not None)
            except Refused as exc:
                store.refuse(saved.target_id, exc.reason, str(exc))
                continue
            except InvalidInputError as exc:
                store.refuse(saved.target_id, "server", str(exc))
                continue
            except TooManyTargetsError as exc:
                store.refuse(saved.target_id, "limit", str(exc))
                continue
            except Exception as exc:  # a state that loads but will not apply: fit anew
                store.refuse(saved.target_id, "corrupt", f"cannot restore it: {exc!r}")
                continue
            restored += 1
        self.loading = None
        log.info("restored %d saved targets from %s in %.1fs", restored, store.directory,
                 time.monotonic() - began)

    def _scaler_exited(self) -> None:
        self.failed = True
        self.stopped.set()

    def problem(self) -> str | None:
        """Why the process cannot do its work and needs a restart (for /healthz), None when
        it can: a stuck or exited gRPC front, or a fit pool that cannot start workers."""
        return self.scaler.problem() or self.engine.fits.problem()

    def not_ready(self) -> str | None:
        """Why the pod should get no new connections (for /readyz), None when it may. Never
        a question of Prometheus: KEDA's GetMetricSpec must be answered while it is down."""
        if self.stopped.is_set():
            return "shutting down: the gRPC scaler is handing its clients to another replica"
        if not self.started.is_set():
            if self.loading is not None:
                done, total = self.loading
                return f"starting: loading saved state ({done} of {total} targets)"
            return "starting: the gRPC scaler does not serve yet"
        return self.scaler.problem()

    def stop(self) -> None:
        """Not ready at once, then the gRPC front says GOAWAY and lets calls in flight end
        (while HTTP still answers /readyz 503), then HTTP and the engine stop."""
        self.stopped.set()
        try:
            self.scaler.stop()
        finally:
            try:
                self.http_server.stop()
            finally:
                self.engine.stop()  # also ends the fit worker processes


def run_until_signalled(service: Service) -> int:
    """Start, then stop gracefully on SIGTERM (Kubernetes) or SIGINT (Ctrl-C). The exit code
    is 1 when the scaler front exited on its own, so that the pod is restarted."""

    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        service.stopped.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    service.start()
    service.stopped.wait()
    service.stop()
    return 1 if service.failed else 0
