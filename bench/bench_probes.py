"""Probe latency under idle HTTP connections: GET /healthz and /readyz while N connections sit
open and send nothing.

    .venv/bin/python bench/bench_probes.py [--idle 500,1500] [--probes 30] [--timeout 2]
        [--servers before,limit,after]

One real Service (127.0.0.1, ports 0, no targets: no Prometheus needed) and, beside it, other
waitress servers on the same Flask app, so only the server differs:

- `before`: waitress with its defaults, as the service ran it (connection_limit 100,
  channel_timeout 120 s, select());
- `limit`: waitress's own knobs turned: connection_limit 1000, channel_timeout 10 s,
  cleanup_interval 2 s, poll();
- `after`: the service's own server (forecaster/api/server.py): at its limit it closes the
  longest-idle connections instead of refusing new ones.

The idle connections come from a process of their own (non-blocking connects, nothing sent),
so the server's process holds only its own sockets. Then, one at a time as a kubelet does,
`--probes` fresh connections each GET /healthz or /readyz (alternately) with `--timeout`;
a probe that times out counts as such, and after 5 of them the run stops (the server is
starved). Printed per server and idle count: p50/p99/max latency (ms) of the answered probes,
timeouts, and how many idle connections the server had closed by the end. The goal: every
probe answered within 1 s with 500 idle connections.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from waitress.server import create_server

GOAL_SECONDS = 1.0
GIVE_UP_AFTER_TIMEOUTS = 5


def hold_idle(port: int, count: int, pipe: Connection) -> None:
    """In a process of its own: open `count` connections, send nothing, hold them until told;
    then report how many the server had closed meanwhile."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 256)), hard))
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        sockets.append(sock)
    deadline = time.monotonic() + 10
    pending = {sock.fileno(): sock for sock in sockets}
    poller = select.poll()  # select() cannot take descriptors past 1024
    for fd in pending:
        poller.register(fd, select.POLLOUT)
    while pending and time.monotonic() < deadline:  # wait until the handshakes are done
        for fd, _ in poller.poll(500):
            poller.unregister(fd)
            pending.pop(fd, None)
    pipe.send(count - len(pending))
    pipe.recv()  # the probes are done
    closed = 0
    for sock in sockets:
        try:
            closed += sock.recv(1) == b""
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            closed += 1
    pipe.send(closed)
    for sock in sockets:
        sock.close()


def probe(port: int, path: str, timeout: float) -> float | None:
    """Seconds to a complete HTTP answer on a fresh connection, or None past `timeout`."""
    began = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"
                         .encode())
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
                if time.perf_counter() - began > timeout:
                    return None
    except (TimeoutError, OSError):
        return None
    if not answer.startswith(b"HTTP/1.1 "):
        return None
    return time.perf_counter() - began


def run(port: int, idle: int, probes: int, timeout: float) -> dict[str, Any]:
    parent, child = multiprocessing.get_context("spawn").Pipe()
    holder = multiprocessing.get_context("spawn").Process(
        target=hold_idle, args=(port, idle, child), daemon=True
    )
    holder.start()
    connected = parent.recv()
    latencies: list[float] = []
    timeouts = 0
    for i in range(probes):
        took = probe(port, "/healthz" if i % 2 == 0 else "/readyz", timeout)
        if took is None:
            timeouts += 1
            if timeouts >= GIVE_UP_AFTER_TIMEOUTS:
                break
        else:
            latencies.append(took)
    parent.send("done")
    closed = parent.recv()
    holder.join(timeout=30)
    ms = np.asarray(latencies) * 1000
    return {
        "idle": idle, "connected": connected, "answered": len(latencies), "timeouts": timeouts,
        "p50": float(np.percentile(ms, 50)) if ms.size else float("nan"),
        "p99": float(np.percentile(ms, 99)) if ms.size else float("nan"),
        "max": float(ms.max()) if ms.size else float("nan"),
        "closed": closed,
    }


class PlainWaitress:
    """waitress's own server on `app`, in a thread, with the loop the service used before."""

    def __init__(self, app: Any, use_poll: bool, **adjustments: Any) -> None:
        self.sockets: dict[int, Any] = {}  # waitress's socket map: its dispatchers by fd
        self.server: Any = create_server(app, map=self.sockets, host="127.0.0.1", port=0,
                                         threads=8, ident="bench", **adjustments)
        self.port = int(self.server.effective_port)
        self.use_poll = use_poll
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                self.server.asyncore.loop(timeout=0.2, map=self.sockets, count=1,
                                          use_poll=self.use_poll)
            except ValueError as exc:  # select() past descriptor 1024
                print(f"  waitress loop failed: {exc}", flush=True)
                return

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.server.task_dispatcher.shutdown()
        for dispatcher in list(self.sockets.values()):
            if dispatcher is not self.server:
                dispatcher.close()
        self.server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", default="500,1500", help="idle connection counts")
    parser.add_argument("--probes", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per probe")
    parser.add_argument("--servers", default="before,limit,after")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8192)), hard))

    from forecaster.config import EngineSettings, Settings
    from forecaster.service import Service

    service = Service(Settings(engine=EngineSettings(fit_workers=1), grpc_port=0, http_port=0,
                               host="127.0.0.1"))
    service.start()
    makers: dict[str, Callable[[], tuple[int, Callable[[], None]]]] = {
        "before": lambda: _plain(service.app, use_poll=False),
        "limit": lambda: _plain(service.app, use_poll=True, connection_limit=1000,
                                channel_timeout=10, cleanup_interval=2),
        "after": lambda: (service.http_port, lambda: None),
    }
    rows = []
    try:
        for name in args.servers.split(","):
            for idle in (int(n) for n in args.idle.split(",")):
                port, stop = makers[name]()
                try:
                    base = run(port, 0, 10, args.timeout)
                    row = run(port, idle, args.probes, args.timeout)
                finally:
                    stop()
                row.update(server=name, quiet_p50=base["p50"])
                rows.append(row)
                print(_line(row), flush=True)
    finally:
        service.stop()
    print()
    print(f"{'server':8} {'idle':>5} {'open':>5} {'quiet p50':>9} {'p50':>8} {'p99':>8} "
          f"{'max':>8} {'answered':>8} {'timeouts':>8} {'closed':>6}")
    for row in rows:
        print(f"{row['server']:8} {row['idle']:5d} {row['connected']:5d} "
              f"{row['quiet_p50']:9.1f} {row['p50']:8.1f} {row['p99']:8.1f} {row['max']:8.1f} "
              f"{row['answered']:8d} {row['timeouts']:8d} {row['closed']:6d}")
    print(f"(ms; goal: every probe answered within {GOAL_SECONDS * 1000:.0f} ms; a timeout is "
          f"a probe unanswered after {args.timeout:.0f} s)")
    return 0


def _plain(app: Any, use_poll: bool, **adjustments: Any) -> tuple[int, Callable[[], None]]:
    server = PlainWaitress(app, use_poll, **adjustments)
    return server.port, server.stop


def _line(row: dict[str, Any]) -> str:
    return (f"{row['server']}: {row['idle']} idle ({row['connected']} open): p50 "
            f"{row['p50']:.1f} ms, p99 {row['p99']:.1f} ms, max {row['max']:.1f} ms, "
            f"{row['answered']} answered, {row['timeouts']} timeouts, {row['closed']} closed")


if __name__ == "__main__":
    sys.exit(main())
