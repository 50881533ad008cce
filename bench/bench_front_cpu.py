"""The gRPC front's CPU per GetMetrics call against the floor's, loaded at the same time.

    .venv/bin/python bench/bench_front_cpu.py [--rate 700] [--rounds 12] [--seconds 6]
        [--targets 100] [--baseline CHECKOUT]

On a shared machine a window's tail and even its CPU per call follow the other tenants more
than the server, so comparing windows run one after the other says little. Here the servers
take their load in the same windows: a front process (the real ScalerServer and
ExternalScaler over a Board primed with `--targets` triggers, the engine's process replaced by
a heartbeat), the floor (bench/scaler_floor.py), and with `--baseline` a front from another
checkout (before a change, say), each loaded with h2load, open loop at `--rate`. Each round
prints every server's CPU µs per call from /proc; the summary gives the medians and the
median of the paired differences from the floor. bench/README.md says what runs showed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING or __name__ != "__main__" or "--serve-front" not in sys.argv:
    # Not in a front: it imports the forecaster package from PYTHONPATH (--baseline), where
    # `repo` would put this checkout first.
    import grpc
    import numpy as np

    import repo  # noqa: F401 (puts the root on sys.path)
    from forecaster.scaler.generated import externalscaler_pb2 as pb
    from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
    from load import LoadGenerator, LoadShape, Window
    from scaler_fleet import Fleet

FLOOR = "floor"


def front(targets: int) -> None:
    """A front process: print the port, answer every trigger at once, beat until killed."""
    from forecaster.scaler.board import Board
    from forecaster.scaler.messages import (
        ANSWERS,
        RESOLVE,
        RESOLVED,
        Answer,
        FrontSettings,
        Trigger,
    )
    from forecaster.scaler.server import ScalerServer
    from forecaster.scaler.servicer import ExternalScaler

    def engine(message: tuple[object, ...]) -> None:  # on the loop, as the board sends
        if message[0] == RESOLVE:
            _, request, namespace, name, _ = message
            trigger = Trigger(f"{namespace}/{name}", f"fc-{name}", 16.7)
            server.call_soon(board.receive, (RESOLVED, request, trigger, Answer(True, 3.5, True)))

    board = Board(engine)
    servicer = ExternalScaler(board, first_value_wait_seconds=5.0)
    server = ScalerServer(FrontSettings("127.0.0.1:0", 5.0), servicer)
    server.start()
    print(server.port, flush=True)
    while True:  # the engine's heartbeat: without it the front answers UNAVAILABLE
        server.call_soon(board.receive, (ANSWERS, {}))
        time.sleep(1.0)


def start(
    command: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env)
    assert process.stdout is not None
    return process, int(process.stdout.readline())


def requests_for(port: int, refs: list[pb.ScaledObjectRef], register: bool) -> list[bytes]:
    """Each target's GetMetricsRequest; registered first (GetMetricSpec, GetMetrics), as KEDA
    does, when `register`."""
    found = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalScalerStub(channel)
        for ref in refs:
            name = stub.GetMetricSpec(ref, timeout=10).metricSpecs[0].metricName if register \
                else "fc-0"
            request = pb.GetMetricsRequest(scaledObjectRef=ref, metricName=name)
            if register:
                stub.GetMetrics(request, timeout=10)
            found.append(request.SerializeToString())
    return found


def load(
    shape: LoadShape, workdir: Path, tag: str, name: str, process: subprocess.Popen[bytes],
    port: int, requests: list[bytes], rate: float, windows: dict[str, Window],
) -> None:
    """One server's window, into `windows[name]`."""
    (workdir / name).mkdir(exist_ok=True)
    generator = LoadGenerator(shape, workdir / name, lambda: {name: [str(process.pid)]})
    windows[name] = generator.window(f"{name} {tag}", port, requests, rate=rate)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=700.0, help="calls/s to each server")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=6.0, help="each round's window")
    parser.add_argument("--targets", type=int, default=100)
    parser.add_argument("--baseline", type=Path, default=None, metavar="CHECKOUT",
                        help="also a front from this checkout of the repository")
    parser.add_argument("--serve-front", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_front is not None:
        front(args.serve_front)
        return
    me = [sys.executable, str(Path(__file__).resolve()), "--serve-front", str(args.targets)]
    servers = {"front": start(me)}
    if args.baseline is not None:
        env = {**os.environ, "PYTHONPATH": str(args.baseline.resolve())}
        servers["baseline"] = start(me, env)
    servers[FLOOR] = start([sys.executable, str(Path(__file__).parent / "scaler_floor.py")])
    refs = Fleet(np.zeros(1), args.targets, args.targets).refs("http://prometheus:9090",
                                                               "seasonal_naive")
    requests = {name: requests_for(port, refs, name != FLOOR)
                for name, (_, port) in servers.items()}
    workdir = Path(tempfile.mkdtemp(prefix="bench-front-cpu-"))
    shape = LoadShape("h2load", 16, 8, 20, args.seconds, 50, 10.0)
    us: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for round_ in range(args.rounds):
            windows: dict[str, Window] = {}
            threads = [threading.Thread(target=load, args=(
                shape, workdir, f"#{round_ + 1}", name, *server, requests[name], args.rate,
                windows,
            )) for name, server in servers.items()]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for name, window in windows.items():
                us[name].append(1e6 * window.cpu[name] / max(1, window.calls))
            print(f"round {round_ + 1}: " + ", ".join(
                f"{name} {values[-1]:.0f} us" for name, values in us.items()
            ) + f"; load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        for process, _ in servers.values():
            process.kill()
            process.wait(10)
    print(f"CPU us per call at {args.rate:,.0f} calls/s each, {args.rounds} rounds:")
    for name, values in us.items():
        line = f"  {name:<9} median {statistics.median(values):6.1f}"
        if name != FLOOR:
            over = [a - b for a, b in zip(values, us[FLOOR], strict=True)]
            line += (f"; over the floor, median of the rounds' differences "
                     f"{statistics.median(over):+.1f}")
        print(line)


if __name__ == "__main__":
    main()
