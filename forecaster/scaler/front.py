"""The scaler's front process: the KEDA-facing gRPC server, in a process of its own.

Why apart from the engine: at 2,000 calls/s grpc.aio needs more than half of a Python
process's GIL, and the engine's background work (a model update and forecast per new point,
a Prometheus query per target every refresh, fits landing) took the rest in bursts. In one
process, calls queued behind that work for up to seconds (p99 1.65 s at 2,000 calls/s with
1,000 targets; bench/bench_scaler_load.py). Here the front holds only each target's latest
answer, which the engine's process pushes as it changes, and resolved triggers.

The engine's process (forecaster.scaler.bridge) starts it with `serve_fd(FD)`, FD being its
end of a socket pair. It imports no model or data library, so it starts fast and stays small
(about 45 MB). It ignores SIGINT and SIGTERM: the engine's process stops it (gracefully) with
a message, and when that process is gone (the socket closes) it stops too. Messages are read
on the main thread and handed to the gRPC loop; they are written by a thread of their own, so
the loop never blocks on a full socket.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
from multiprocessing.connection import Connection
from typing import Any

from forecaster.logs import configure_logging
from forecaster.scaler.board import Board
from forecaster.scaler.messages import FAILED, READY, SERVE, START, STOP, FrontSettings
from forecaster.scaler.server import AddressTaken, ScalerServer
from forecaster.scaler.servicer import ExternalScaler

log = logging.getLogger(__name__)


def serve(connection: Connection) -> int:
    """Bind, report the port, serve once told to, relay the engine's messages until STOP."""
    tag, settings = connection.recv()
    if tag != START or not isinstance(settings, FrontSettings):
        raise RuntimeError(f"expected the front's settings first, got {tag!r}")
    configure_logging(settings.log_level, settings.log_format)
    outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
    writer = threading.Thread(target=_write, args=(connection, outbox), name="front-writer",
                              daemon=True)
    writer.start()
    board = Board(outbox.put)
    servicer = ExternalScaler(
        board,
        first_value_wait_seconds=settings.first_value_wait_seconds,
        defaults=dict(settings.defaults),
        configured_target_values=dict(settings.configured_target_values),
        stream_check_seconds=settings.stream_check_seconds,
        engine_silence_seconds=settings.engine_silence_seconds,
    )
    try:
        server = ScalerServer(settings, servicer)
    except AddressTaken as exc:  # the engine's side says it, naming the port's setting
        outbox.put((FAILED, f"cannot serve gRPC on {settings.address}: {exc.strerror}",
                    "grpcPort"))
        outbox.put(None)
        writer.join(5)
        return 1
    except Exception as exc:  # unreadable TLS files: the engine's side says it
        outbox.put((FAILED, f"cannot serve gRPC on {settings.address}: {exc}", None))
        outbox.put(None)
        writer.join(5)
        return 1
    outbox.put((READY, server.port))
    grace = 0.0
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            log.error("the forecaster engine's process has gone; the scaler stops")
            break
        if message[0] == SERVE:
            server.start()
        elif message[0] == STOP:
            grace = float(message[1])
            break
        else:
            server.call_soon(board.receive, message)
    server.call_soon(board.close)
    server.stop(grace)
    outbox.put(None)
    writer.join(5)
    connection.close()
    return 0


def _write(connection: Connection, outbox: queue.SimpleQueue[tuple[Any, ...] | None]) -> None:
    while (message := outbox.get()) is not None:
        try:
            connection.send(message)
        except OSError:  # the engine's process is gone: the reader sees it and stops
            return


def serve_fd(fd: int) -> int:
    """The front process's entry point (see the module's docstring)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    return serve(Connection(fd))
