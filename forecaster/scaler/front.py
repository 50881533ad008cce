"""The scaler's front process: the KEDA-facing gRPC server, in a process of its own.

Why apart from the engine: at 2,000 calls/s grpc.aio needs more than half of a Python
process's GIL, and the engine's background work (a model update and forecast per new point,
a Prometheus query per target every refresh, fits landing) took the rest in bursts. In one
process, calls queued behind that work for up to seconds (p99 1.65 s at 2,000 calls/s with
1,000 targets; bench/bench_scaler_load.py). Here the front holds only each target's latest
answer, which the engine's process pushes as it changes, and resolved triggers.

The engine's process (forecaster.scaler.bridge) starts it as
`python -m forecaster.scaler.front FD`, FD being its end of a socket pair. It imports no
model or data library, so it starts fast and stays small. It ignores SIGINT and SIGTERM:
the engine's process stops it (gracefully) with a message, and when that process is gone
(the socket closes) it stops too.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence
from multiprocessing.connection import Connection

from forecaster.scaler.board import Board
from forecaster.scaler.messages import FAILED, READY, SERVE, START, STOP, FrontSettings
from forecaster.scaler.server import ScalerServer
from forecaster.scaler.servicer import ExternalScaler

log = logging.getLogger(__name__)


def serve(connection: Connection) -> int:
    """Bind, report the port, serve once told to, relay the engine's messages until STOP."""
    tag, settings = connection.recv()
    if tag != START or not isinstance(settings, FrontSettings):
        raise RuntimeError(f"expected the front's settings first, got {tag!r}")
    logging.basicConfig(level=settings.log_level, format=settings.log_format)
    board = Board(connection.send)
    servicer = ExternalScaler(
        board,
        first_value_wait_seconds=settings.first_value_wait_seconds,
        stream_check_seconds=settings.stream_check_seconds,
    )
    try:
        server = ScalerServer(settings, servicer)
    except Exception as exc:  # a taken port, unreadable TLS files: the engine's side says it
        connection.send((FAILED, f"cannot serve gRPC on {settings.address}: {exc}"))
        return 1
    connection.send((READY, server.port))
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
    connection.close()
    return 0


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m forecaster.scaler.front FD  (started by forecaster serve)",
              file=sys.stderr)
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    return serve(Connection(int(argv[0])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
