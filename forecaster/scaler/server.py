"""The gRPC server: the external scaler, the standard health service, optional (mutual) TLS.

It runs in the scaler's front process (forecaster.scaler.front), a grpc.aio server on an
event loop of its own thread. Measured with h2load on this
2-core machine (bench/bench_scaler_load.py), a do-nothing servicer costs about 330 µs of CPU
per call on grpc.aio and 600 µs on the thread-pool server, whose thread hand-offs also add
latency; and an open stream costs a coroutine, not a thread.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.scaler.messages import FrontSettings
from forecaster.scaler.servicer import ExternalScaler

SERVICE_NAME = "externalscaler.ExternalScaler"

_T = TypeVar("_T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (15-20% less CPU per call than asyncio's loop, measured
    with a do-nothing servicer at 2,000 calls/s), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class AddressTaken(OSError):
    """The gRPC address cannot be bound: its port is taken or needs privileges."""


def check_bindable(address: str) -> None:
    """AddressTaken when `address` (host:port) is taken or refused now. grpc would only log
    the reason to stderr from C and raise a bare "Failed to bind"; a probe says which."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return  # any free port, or a form for grpc itself to judge
    try:
        found = socket.getaddrinfo(host.strip("[]") or None, int(port),
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return  # unresolvable: grpc says so
    for family, kind, proto, _, where in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc binds
            try:
                probe.bind(where)
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    raise AddressTaken(exc.errno, exc.strerror) from None
                # another family missing here (no IPv6, say): grpc binds what it can


class ScalerServer:
    """The external scaler and health service on a grpc.aio server, driven from sync code.

    >>> server = ScalerServer(FrontSettings("127.0.0.1:0", 10.0), servicer)  # doctest: +SKIP
    >>> server.start(); server.port                                        # doctest: +SKIP
    >>> server.stop()                                                      # doctest: +SKIP

    Binding happens in the constructor (port 0 picks a free port). With a certificate and
    key it serves TLS; with `client_ca_file` too, clients must present a certificate it
    signed, as KEDA does with a TriggerAuthentication's tlsClientCert. Calls beyond
    `max_concurrent_rpcs` at once (open streams count) are refused with RESOURCE_EXHAUSTED
    rather than queued without bound.
    """

    def __init__(self, settings: FrontSettings, servicer: ExternalScaler) -> None:
        self.servicer = servicer
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc", daemon=True)
        self._thread.start()
        try:
            self._server, self.health, self.port = self._run(
                self._build(settings)
            )
        except BaseException:  # a taken port, unreadable TLS files: no loop left behind
            self._close_loop()
            raise

    def _run(self, work: Coroutine[Any, Any, _T], timeout: float = 30.0) -> _T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout)

    async def _build(
        self, settings: FrontSettings
    ) -> tuple[aio.Server, health_aio.HealthServicer, int]:
        server = aio.server(
            options=[("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        self.servicer.bind(asyncio.get_running_loop())
        pb_grpc.add_ExternalScalerServicer_to_server(self.servicer, server)
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        for name in ("", SERVICE_NAME):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        check_bindable(settings.address)
        if settings.cert_file is None or settings.key_file is None:
            port = server.add_insecure_port(settings.address)
        else:
            client_ca = settings.client_ca_file
            credentials = grpc.ssl_server_credentials(
                [(Path(settings.key_file).read_bytes(), Path(settings.cert_file).read_bytes())],
                root_certificates=Path(client_ca).read_bytes() if client_ca else None,
                require_client_auth=client_ca is not None,
            )
            port = server.add_secure_port(settings.address, credentials)
        return server, health, port

    def call_soon(self, callback: Callable[..., object], *args: object) -> None:
        """Run `callback(*args)` on the server's loop (from any thread)."""
        self._loop.call_soon_threadsafe(callback, *args)

    def start(self) -> None:
        self._run(self._server.start())

    def stop(self, grace_seconds: float = 5.0) -> None:
        """Report NOT_SERVING, end open streams, let in-flight calls finish, stop the loop."""
        if not self._loop.is_running():
            return
        try:
            self._run(self.health.enter_graceful_shutdown())
            self.servicer.stop_streams()
            self._run(self._server.stop(grace_seconds), timeout=grace_seconds + 10)
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():  # closing a loop that still runs would raise
            self._loop.close()
