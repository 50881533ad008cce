"""How much CPU busy fit workers leave to the processes that answer requests, by priority.

    .venv/bin/python bench/bench_fit_priority.py [--runs 3] [--seconds 15] [--workers 2]
        [--model auto] [--rate 500] [--scenarios none,nice,idle]

Each window runs `--workers` fit workers (forecaster.fitting.spawn_workers) kept busy with
real fits of `--model` on the bundled 5-minute traces, at one priority: `nice` (nice 10),
`idle` (SCHED_IDLE), or `none` (no workers: the floor). Beside them, at normal priority,
run three processes standing in for the service's serving path: a do-nothing grpc.aio
GetMetrics servicer on uvloop (like the gRPC front), an open-loop client calling it at
`--rate` calls/s (latency counted from each call's scheduled send), and a probe that sleeps
1 ms in a tight loop and records how late it wakes. Windows of the scenarios are
interleaved, `--runs` times, so drift of a shared machine spreads over all of them.
Prints per window, then the median over runs of each figure per scenario.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import multiprocessing  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import Future  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from multiprocessing.connection import Connection  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import repo  # noqa: E402, F401 (puts the root on sys.path for tests.support)
from forecaster.fitting import FitPool, FitRequest, Priority, spawn_workers  # noqa: E402
from forecaster.scaler.generated import externalscaler_pb2 as pb  # noqa: E402
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc  # noqa: E402
from forecaster.series import read_csv, to_grid  # noqa: E402
from tests.support.waiting import poll  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data"
TRACES = ("aws_elb_request_count_8c0756.csv", "twitter_volume_aapl.csv")
STEP = pd.Timedelta(minutes=5)
HISTORY_STEPS = 14 * 288  # 14 days of 5-minute bins
SPAWN = multiprocessing.get_context("spawn")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PRIORITIES: dict[str, Priority] = {"nice": "nice", "idle": "idle"}  # and "none": no workers


# -- the serving path's stand-ins (processes of their own, normal priority) -------------------


class NothingScaler(pb_grpc.ExternalScalerServicer):
    """Answers GetMetrics with a constant: the gRPC framework's own cost."""

    def __init__(self) -> None:
        self.response = pb.GetMetricsResponse(
            metricValues=[pb.MetricValue(metricName="m", metricValue=1, metricValueFloat=1.0)]
        )

    async def GetMetrics(self, request: Any, context: Any) -> pb.GetMetricsResponse:
        return self.response


def serve(port_out: Connection) -> None:
    """A grpc.aio server on uvloop, like the gRPC front; sends its port, serves until ended."""
    from forecaster.scaler.server import new_event_loop

    async def run() -> None:
        server = grpc.aio.server()
        pb_grpc.add_ExternalScalerServicer_to_server(NothingScaler(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_out.send(port)
        await server.wait_for_termination()

    new_event_loop().run_until_complete(run())


def call_open_loop(port: int, rate: float, seconds: float, out: Connection) -> None:
    """GetMetrics at `rate` calls/s on one channel; sends (latencies in s, failures)."""
    from forecaster.scaler.server import new_event_loop

    async def run() -> tuple[list[float], int]:
        request = pb.GetMetricsRequest(
            scaledObjectRef=pb.ScaledObjectRef(name="web", namespace="shop"), metricName="m"
        )
        latencies: list[float] = []
        failures = 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ExternalScalerStub(channel)
            await stub.GetMetrics(request, timeout=10)  # connected before the clock starts

            async def one(due: float) -> None:
                nonlocal failures
                try:
                    await stub.GetMetrics(request, timeout=10)
                except grpc.aio.AioRpcError:
                    failures += 1
                    return
                latencies.append(time.perf_counter() - due)

            start = time.perf_counter()
            calls: list[asyncio.Task[None]] = []
            for i in range(int(rate * seconds)):
                due = start + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                calls.append(asyncio.create_task(one(due)))
            await asyncio.gather(*calls)
        return latencies, failures

    out.send(new_event_loop().run_until_complete(run()))


def wake_probe(seconds: float, out: Connection) -> None:
    """Sleep 1 ms in a loop; sends how late each wake-up came, in seconds."""
    late: list[float] = []
    end = time.perf_counter() + seconds
    while True:
        before = time.perf_counter()
        if before >= end:
            break
        time.sleep(0.001)
        late.append(time.perf_counter() - before - 0.001)
    out.send(late)


# -- the fit workers ---------------------------------------------------------------------------


def fit_requests(model: str) -> list[FitRequest]:
    """One request per bundled trace: its first 14 days of 5-minute bins."""
    requests = []
    for name in TRACES:
        grid = to_grid(read_csv(DATA / name), STEP).filled.iloc[:HISTORY_STEPS]
        requests.append(FitRequest(model=model, step_seconds=int(STEP.total_seconds()),
                                   start=grid.index[0], values=grid.to_numpy(), quantile=0.9,
                                   horizon=2, previous=None))
    return requests


class BusyWorkers:
    """`workers` fit workers at `priority`, each kept busy: a fit is sent as one lands."""

    def __init__(self, workers: int, priority: Priority, requests: list[FitRequest]) -> None:
        self.pool = FitPool(
            workers, executor_factory=lambda: spawn_workers(workers, priority=priority)
        )
        self.requests = requests
        self.landed = 0
        self.failed = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        for i in range(2 * workers):  # one running and one queued per worker
            self._send(i)

    def _send(self, i: int) -> None:
        if self._stopping.is_set():
            return
        future = self.pool.submit(self.requests[i % len(self.requests)])
        future.add_done_callback(lambda done: self._landed(i, done))

    def _landed(self, i: int, future: Future[Any]) -> None:
        with self._lock:
            if future.cancelled() or future.exception() is not None:
                self.failed += 1
            else:
                self.landed += 1
        self._send(i + 1)

    def wait_spawned(self, workers: int, timeout: float = 60.0) -> list[int]:
        if not poll(lambda: len(self.pool.pids()) >= workers, timeout, every=0.05):
            raise RuntimeError("the fit workers did not start")
        return self.pool.pids()

    def stop(self) -> None:
        self._stopping.set()
        self.pool.shutdown()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


# -- one window --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    scenario: str
    run: int
    wake_ms: tuple[float, float, float]  # p50, p99, max
    grpc_ms: tuple[float, float, float]
    grpc_calls: int
    grpc_failures: int
    fits: int
    worker_cpu: float
    load: float

    def line(self) -> str:
        wake = "/".join(f"{v:.2f}" for v in self.wake_ms)
        call = "/".join(f"{v:.2f}" for v in self.grpc_ms)
        return (f"{self.scenario:>5} run {self.run}: wake-up late p50/p99/max {wake} ms; "
                f"GetMetrics p50/p99/max {call} ms ({self.grpc_calls} ok, "
                f"{self.grpc_failures} failed); fits landed {self.fits}, worker CPU "
                f"{self.worker_cpu:.1f} s; load {self.load:.2f}")


def summary(values: list[float]) -> tuple[float, float, float]:
    ms = np.asarray(values) * 1000.0
    if not len(ms):
        return (float("nan"),) * 3
    return (float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), float(ms.max()))


def window(scenario: str, run: int, args: argparse.Namespace,
           requests: list[FitRequest]) -> Window:
    workers = None
    pids: list[int] = []
    if scenario in PRIORITIES:
        workers = BusyWorkers(args.workers, PRIORITIES[scenario], requests)
        pids = workers.wait_spawned(args.workers)
    server_end, port_end = SPAWN.Pipe()
    server = SPAWN.Process(target=serve, args=(port_end,), daemon=True)
    server.start()
    port = server_end.recv()
    calls_in, calls_out = SPAWN.Pipe(duplex=False)
    wake_in, wake_out = SPAWN.Pipe(duplex=False)
    client = SPAWN.Process(target=call_open_loop, args=(port, args.rate, args.seconds, calls_out))
    probe = SPAWN.Process(target=wake_probe, args=(args.seconds, wake_out))
    cpu_before = sum(cpu_seconds(pid) for pid in pids)
    landed_before = workers.landed if workers else 0
    client.start()
    probe.start()
    late = wake_in.recv()
    latencies, failures = calls_in.recv()
    cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
    fits = (workers.landed - landed_before) if workers else 0
    load = os.getloadavg()[0]
    for process in (client, probe):
        process.join(10)
    server.kill()
    server.join(10)
    if workers is not None:
        workers.stop()
    return Window(scenario, run, summary(late), summary(latencies), len(latencies), failures,
                  fits, cpu, load)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="auto")
    parser.add_argument("--rate", type=float, default=500.0, help="GetMetrics calls/s")
    parser.add_argument("--scenarios", default="none,nice,idle")
    args = parser.parse_args(argv)
    scenarios = args.scenarios.split(",")
    unknown = set(scenarios) - {"none", "nice", "idle"}
    if unknown:
        parser.error(f"--scenarios: unknown {sorted(unknown)}; choose from none, nice, idle")
    requests = fit_requests(args.model)
    print(f"{os.cpu_count()} CPUs; {args.workers} workers fitting {args.model!r}; "
          f"GetMetrics at {args.rate:g}/s; {args.seconds:g} s windows", flush=True)
    windows: list[Window] = []
    for run in range(1, args.runs + 1):
        # Rotate the order each run: no scenario always follows the same one.
        shift = (run - 1) % len(scenarios)
        for scenario in scenarios[shift:] + scenarios[:shift]:
            result = window(scenario, run, args, requests)
            print(result.line(), flush=True)
            windows.append(result)
    print("\nmedian over runs (ms):")
    print(f"{'scenario':>8} {'wake p50':>9} {'wake p99':>9} {'wake max':>9} {'call p50':>9} "
          f"{'call p99':>9} {'call max':>9} {'fits':>5} {'wCPU s':>7}")
    for scenario in scenarios:
        mine = [w for w in windows if w.scenario == scenario]

        def med(values: list[float]) -> float:
            return statistics.median(values)

        wake = [med([w.wake_ms[k] for w in mine]) for k in range(3)]
        call = [med([w.grpc_ms[k] for w in mine]) for k in range(3)]
        fits = med([w.fits for w in mine])
        cpu = med([w.worker_cpu for w in mine])
        print(f"{scenario:>8} {wake[0]:9.2f} {wake[1]:9.2f} {wake[2]:9.2f} {call[0]:9.2f} "
              f"{call[1]:9.2f} {call[2]:9.2f} {fits:5.0f} {cpu:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
