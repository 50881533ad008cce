"""Load benchmark of the KEDA external scaler: 1,000 targets, concurrent GetMetrics, refits.

    .venv/bin/python bench/bench_scaler_load.py [--targets 1000] [--clients 16] [--seconds 20]
        [--rate 2000] [--client h2load|aio|sync] [--prometheus | --no-prometheus]
        [--profile DIR] [--json FILE] [--no-floor] [--repeat N] [--fit-priority idle|nice]

The real service (`forecaster.service.Service`, 127.0.0.1, ports 0) runs its engine in this
process and its gRPC front (forecaster.scaler.front) in a child process, as in production:

1. History: Debian's Prometheus, backfilled by promtool with one metric,
   `bench_requests{target="0".."N-1"}`, each series a scaled, time-shifted copy of
   data/aws_elb_request_count_8c0756.csv: 14 days at 5 minutes, then a sample a minute from
   10 minutes ago to 3 hours ahead (instant queries always find a fresh sample; range queries
   on the 5-minute grid return the grid values). If promtool cannot backfill every series
   within --backfill-timeout, fewer distinct series are used (100, then 10) and the targets'
   queries differ by a constant factor (`sum(...) * k`); the summary says so.
   --no-prometheus serves the same numbers from memory (no Prometheus on the machine).
2. GetMetricSpec registers every target (serverAddress, query, targetValue, model, step 5m,
   historyWindow 14d). The time until all have a first forecast (14-day range query + first
   fit) is "the first fit"; a second full round, forced with `Engine.refit_now`, is timed
   alone.
3. Load windows of --seconds from --client-procs processes of their own (on this same
   machine, as the goal says) calling GetMetrics as KEDA does (with GetMetricSpec's metric
   name): closed loop with --clients concurrent callers (the throughput), and open loop at
   --rate calls/s (default 2,000). The load generator is h2load (nghttp2's HTTP/2 load tool,
   written in C, like KEDA's Go client and unlike a Python one, which costs more CPU per
   call than the service itself): each of its processes sends one target's request, the
   targets spread over the fleet, and every call's gRPC status is counted by the service's
   request hook. Open loop paces 50 calls/s per connection, one call per h2load tick, over
   --open-loop-procs processes started spread over one tick (see open_loop_layout).
   `--client aio|sync` uses Python callers instead, round-robin over all targets, with
   latency counted from each call's scheduled time. Closed-loop latency is set by Little's
   law (mean = callers / throughput: 16 callers at 2,000/s average 8 ms), so the p99 goal is
   judged open loop.
   Both run in steady state and during a full refit round forced at the start (the goal's
   condition).
4. Memory: RSS of the service (this process, which hosts the engine, plus the gRPC front
   process) idle, with the targets forecast, after the refits and the load; the fit worker
   processes separately. Every cyclic garbage collection in the engine's process is timed in
   each window.
5. A summary against the goals: >= 2,000 GetMetrics/s with p99 < 5 ms during refits, load
   generator included; < 200 MB above idle; the refit times.

The framework's floor is printed beside the service: the same windows against a do-nothing
servicer on a grpc.aio server like the service's front, in a process of its own like it
(--no-floor skips it; --repeat N runs its steady windows N times in rotation with the
service's). --fit-priority sets the fit workers' CPU priority (the service's choice,
SCHED_IDLE, or nice 10), to compare them in separate runs.

The machine's load average and every party's CPU time in each window (service, fit workers,
Prometheus, load generator, everything else) are printed: on a shared machine the figures
mean little without them. --profile DIR records the gRPC front process with py-spy in each
window (folded stacks, GIL holders by default) and prints the hottest frames; py-spy slows
the service, so take throughput from runs without it.
"""

from __future__ import annotations

import os

# Before numpy is imported, here and in every process spawned from this module.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import pickle  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from array import array  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable  # noqa: E402
from concurrent import futures  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for tests.support when run as a script

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from forecaster.fitting import release_free_memory  # noqa: E402
from forecaster.scaler.generated import externalscaler_pb2 as pb  # noqa: E402
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc  # noqa: E402
from waiting import wait_until  # noqa: E402

TRACE = ROOT / "data" / "aws_elb_request_count_8c0756.csv"
METRIC = "bench_requests"
STEP = 300
FINE = 60  # resolution of the recent and future samples
HISTORY_SECONDS = 14 * 86_400
FUTURE_SECONDS = 3 * 3600
REPLAY_ADDRESS = "http://replay.invalid:9090"
GOAL_CALLS_PER_SECOND = 2000.0
OPEN_LOOP_CONNECTION_RATE = 50.0  # calls/s per h2load connection (see open_loop_layout)
GOAL_P99_MS = 5.0
GOAL_MEMORY_MB = 200.0
REPORTS_WAIT_SECONDS = 5.0  # for the front's call counts after a window: ten of its reports
FLOOR = "floor: do-nothing servicer"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the fleet of series ---------------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    """`targets` targets over `series` distinct series (scaled, shifted copies of one trace);
    target i reads series i % series, times 1 + i // series."""

    base: np.ndarray  # the trace on its 5-minute grid
    targets: int
    series: int

    @classmethod
    def from_trace(cls, targets: int, series: int) -> Fleet:
        from tests.support.prometheus import load_trace

        grid = load_trace(TRACE).resample(f"{STEP}s").mean().ffill().bfill()
        return cls(grid.to_numpy(dtype=float), targets, min(series, targets))

    def query(self, i: int) -> str:
        selector = f'sum({METRIC}{{target="{i % self.series}"}})'
        factor = 1 + i // self.series
        return selector if factor == 1 else f"{selector} * {factor}"

    def series_values(self, j: int, stamps: np.ndarray) -> np.ndarray:
        """Series j at epoch seconds `stamps`: the 5-minute value holding each stamp."""
        offset = (j * 7 * 12) % self.base.size  # seven hours further along per series
        scale = 0.5 + j / self.series
        return np.round(self.base[(stamps // STEP + offset) % self.base.size] * scale, 3)

    def target_values(self, i: int, stamps: np.ndarray) -> np.ndarray:
        return self.series_values(i % self.series, stamps) * (1 + i // self.series)


def sample_times(now: float) -> np.ndarray:
    """14 days and an hour at 5 minutes, then each minute from 10 minutes ago to 3 h ahead."""
    aligned = int(now // STEP * STEP)
    switch = aligned - 2 * STEP
    coarse = np.arange(aligned - HISTORY_SECONDS - 3600, switch, STEP, dtype=np.int64)
    fine = np.arange(switch, aligned + FUTURE_SECONDS + 1, FINE, dtype=np.int64)
    return np.concatenate([coarse, fine])


def write_fleet_openmetrics(fleet: Fleet, stamps: np.ndarray, path: Path) -> int:
    """Every series in one OpenMetrics gauge family; returns the number of samples."""
    times = stamps.tolist()
    with path.open("w", encoding="utf-8") as out:
        out.write(f"# TYPE {METRIC} gauge\n")
        for j in range(fleet.series):
            prefix = f'{METRIC}{{target="{j}"}}'
            values = fleet.series_values(j, stamps).tolist()
            out.write("".join(f"{prefix} {v!r} {t}\n" for t, v in zip(times, values, strict=True)))
        out.write("# EOF\n")
    return fleet.series * len(times)


class ReplaySource:
    """The fleet's numbers from memory, with Prometheus's range and instant semantics."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._by_query = {fleet.query(i): i for i in range(fleet.targets)}

    def query_range(
        self, query: str, start: datetime, end: datetime, step_seconds: int
    ) -> pd.Series:
        stamps = np.arange(
            math.ceil(start.timestamp()), int(end.timestamp()) + 1, step_seconds, dtype=np.int64
        )
        values = self.fleet.target_values(self._by_query[query], stamps)
        index = pd.DatetimeIndex(pd.to_datetime(stamps, unit="s", utc=True)).as_unit("ns")
        return pd.Series(values, index=index, name=query)

    def query_instant(self, query: str, at: datetime | None = None) -> tuple[datetime, float]:
        at = at or datetime.now(UTC)
        stamp = np.array([int(at.timestamp())], dtype=np.int64)
        return at, float(self.fleet.target_values(self._by_query[query], stamp)[0])


# -- process measurements --------------------------------------------------------------------


def rss_mb(pid: int | str = "self", field: str = "VmRSS") -> float:
    """Resident set size in MB (psutil if installed, else /proc/PID/status); VmHWM: the peak."""
    if field == "VmRSS":
        try:
            import psutil

            process = psutil.Process(None if pid == "self" else int(pid))
            return float(process.memory_info().rss) / 2**20
        except ImportError:
            pass
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time of a process (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, summed over cores (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def front_pid(service: Any) -> int:
    return int(service.scaler.pid)


def fit_worker_pids(service: Any) -> list[int]:
    """The fit worker processes (spawned on the first fit)."""
    return list(service.engine.fits.pids())


@dataclass
class MemoryPoint:
    label: str
    service_mb: float  # the engine's process and the gRPC front's
    trimmed_mb: float
    peak_mb: float
    front_mb: float
    workers_mb: list[float]

    def line(self) -> str:
        workers = ", ".join(f"{m:.0f}" for m in self.workers_mb) or "not started"
        return (
            f"{self.label:<30} service RSS {self.service_mb:6.1f} MB (after gc + malloc_trim "
            f"{self.trimmed_mb:6.1f}, peak so far {self.peak_mb:6.1f}; of which the gRPC "
            f"front {self.front_mb:5.1f}); fit workers {workers} MB"
        )


def measure_memory(label: str, service: Any) -> MemoryPoint:
    gc.collect()
    front = rss_mb(front_pid(service))
    raw = rss_mb() + front
    release_free_memory()  # what of the RSS is freed memory the allocator kept
    point = MemoryPoint(label, raw, rss_mb() + front,
                        rss_mb(field="VmHWM") + rss_mb(front_pid(service), field="VmHWM"),
                        front, [rss_mb(p) for p in fit_worker_pids(service)])
    log(point.line())
    return point


# -- the framework's floor -------------------------------------------------------------------


class TrivialScaler(pb_grpc.ExternalScalerServicer):
    """Answers GetMetrics with a constant: what the gRPC framework alone costs."""

    def __init__(self) -> None:
        self.response = pb.GetMetricsResponse(
            metricValues=[pb.MetricValue(metricName="fc-0", metricValue=1, metricValueFloat=1.0)]
        )

    async def GetMetrics(self, request: Any, context: Any) -> pb.GetMetricsResponse:
        return self.response


class _CaptureAbort:
    """A stand-in context for timing the handler in process: no deadline; an abort raises."""

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


class FloorServer:
    """A do-nothing servicer on a grpc.aio server on uvloop, like the service's gRPC front,
    and like it in a process of its own (this script with --serve-floor)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve-floor"],
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


def serve_floor() -> None:
    """--serve-floor: print the port, serve until killed."""
    from forecaster.scaler.server import new_event_loop

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_ExternalScalerServicer_to_server(TrivialScaler(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()

    new_event_loop().run_until_complete(serve())


# -- the load generator (processes of its own) -----------------------------------------------


@dataclass(frozen=True)
class ClientJob:
    port: int
    requests: list[bytes]  # serialized GetMetricsRequest, one per target
    first_client: int
    concurrency: int  # callers in this process
    total_clients: int
    seconds: float
    warmup_calls: int
    timeout: float
    kind: str  # "sync": a thread per caller; "aio": a coroutine per caller
    rate: float = 0.0  # calls/s this process sends on a fixed schedule (open loop); 0: closed


def client_process(job: ClientJob, ready: Any, go: Any, results: Any) -> None:
    """One load-generator process: `job.concurrency` closed-loop callers on one channel,
    each walking the targets round-robin (caller c asks c, c + clients, ...)."""
    requests = [pb.GetMetricsRequest.FromString(raw) for raw in job.requests]
    run = _aio_callers if job.kind == "aio" or job.rate else _sync_callers
    latencies, codes, cpu, elapsed = run(job, requests, ready, go)
    results.put((latencies.tobytes(), dict(codes), cpu, elapsed))


def _sync_callers(
    job: ClientJob, requests: list[Any], ready: Any, go: Any
) -> tuple[array[int], Counter[str], float, float]:
    channel = grpc.insecure_channel(f"127.0.0.1:{job.port}")
    stub = pb_grpc.ExternalScalerStub(channel)
    latencies = [array("q") for _ in range(job.concurrency)]
    codes: list[Counter[str]] = [Counter() for _ in range(job.concurrency)]
    start = threading.Event()
    deadline = [0]

    def caller(slot: int) -> None:
        position = job.first_client + slot
        for _ in range(job.warmup_calls):
            with contextlib.suppress(grpc.RpcError):
                stub.GetMetrics(requests[position % len(requests)], timeout=job.timeout)
            position += job.total_clients
        start.wait()
        own, seen, end, clock = latencies[slot], codes[slot], deadline[0], time.perf_counter_ns
        while (began := clock()) < end:
            try:
                stub.GetMetrics(requests[position % len(requests)], timeout=job.timeout)
                seen["OK"] += 1
            except grpc.RpcError as exc:
                seen[exc.code().name] += 1
            own.append(clock() - began)
            position += job.total_clients

    threads = [threading.Thread(target=caller, args=(s,)) for s in range(job.concurrency)]
    for thread in threads:
        thread.start()
    ready.wait()
    go.wait()
    cpu, began = time.process_time(), time.perf_counter()
    deadline[0] = time.perf_counter_ns() + int(job.seconds * 1e9)
    start.set()
    for thread in threads:
        thread.join()
    cpu, elapsed = time.process_time() - cpu, time.perf_counter() - began
    channel.close()
    merged, total = array("q"), Counter[str]()
    for own, seen in zip(latencies, codes, strict=True):
        merged.extend(own)
        total.update(seen)
    return merged, total, cpu, elapsed


def _aio_callers(
    job: ClientJob, requests: list[Any], ready: Any, go: Any
) -> tuple[array[int], Counter[str], float, float]:
    """Closed loop: each caller sends its next call when the last one returns. Open loop
    (job.rate): calls leave on a fixed schedule whatever the answers, and latency counts from
    the scheduled time, so a stalled server is not hidden by callers that stopped sending."""
    loop = asyncio.new_event_loop()
    latencies = array("q")
    codes: Counter[str] = Counter()
    clock = time.perf_counter_ns

    async def open_channel() -> tuple[Any, Any]:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{job.port}")
        return channel, pb_grpc.ExternalScalerStub(channel)

    channel, stub = loop.run_until_complete(open_channel())

    async def call(position: int, since: int, record: bool) -> None:
        try:
            await stub.GetMetrics(requests[position % len(requests)], timeout=job.timeout)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        if record:
            codes[code] += 1
            latencies.append(clock() - since)

    async def caller(slot: int, calls: int, end: int) -> None:
        position = job.first_client + slot
        while calls > 0 if end == 0 else (began := clock()) < end:
            await call(position, began if end else 0, bool(end))
            calls -= 1
            position += job.total_clients

    async def closed(calls: int, end: int) -> None:
        await asyncio.gather(*(caller(s, calls, end) for s in range(job.concurrency)))

    async def scheduled(end: int) -> None:
        interval = 1e9 / job.rate
        start, sent, pending = clock(), 0, set()
        position = job.first_client
        while (due := start + int(sent * interval)) < end:
            ahead = due - clock()
            if ahead > 200_000:  # asyncio sleeps are coarse: send a little early batch
                await asyncio.sleep(ahead / 1e9)
            task = asyncio.ensure_future(call(position, due, True))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
            position += 1
        if pending:
            await asyncio.wait(pending)

    loop.run_until_complete(closed(job.warmup_calls, 0))
    ready.wait()
    go.wait()
    cpu, began = time.process_time(), time.perf_counter()
    end = clock() + int(job.seconds * 1e9)
    loop.run_until_complete(scheduled(end) if job.rate else closed(0, end))
    cpu, elapsed = time.process_time() - cpu, time.perf_counter() - began
    loop.run_until_complete(channel.close())
    loop.close()
    return latencies, codes, cpu, elapsed


@dataclass
class Window:
    """One load window's figures."""

    label: str
    seconds: float  # from the start until the last answer (open loop: the late ones too)
    latencies_ns: np.ndarray  # of every answered call, errors included
    codes: dict[str, int]
    cpu: dict[str, float]  # CPU seconds per party in the window
    capacity: float  # CPU seconds the machine had in the window
    loadavg: tuple[float, float, float]
    rate: float = 0.0  # the offered rate of an open-loop window
    refits_done: int | None = None
    profile: str | None = None
    gc_pauses: dict[int, list[float]] | None = None  # seconds of each collection, by generation

    @property
    def calls(self) -> int:
        return int(self.latencies_ns.size)

    @property
    def throughput(self) -> float:
        """Calls answered OK per second."""
        return self.codes.get("OK", 0) / self.seconds

    def ms(self, q: float) -> float:
        if not self.calls:
            return float("nan")
        return float(np.percentile(self.latencies_ns, q)) / 1e6

    @property
    def worst_ms(self) -> float:
        return float(self.latencies_ns.max()) / 1e6 if self.calls else float("nan")

    @property
    def errors(self) -> dict[str, int]:
        return {code: n for code, n in self.codes.items() if code != "OK"}

    def gc_summary(self) -> str:
        """Collections by generation in the service process: count and longest pause."""
        if not self.gc_pauses:
            return ""
        return "; gc " + ", ".join(
            f"gen{g} {len(p)}x max {1000 * max(p, default=0.0):.1f} ms"
            for g, p in sorted(self.gc_pauses.items())
        )

    def line(self) -> str:
        refits = "" if self.refits_done is None else f"; {self.refits_done} refits in window"
        return (
            f"{self.label:<36} {self.calls:7,} calls {self.throughput:6,.0f} OK/s  ms p50 "
            f"{self.ms(50):7.2f} p90 {self.ms(90):7.2f} p99 {self.ms(99):8.2f} max "
            f"{self.worst_ms:8.2f}  errors {self.errors or 0}{refits}{self.gc_summary()}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "seconds": self.seconds, "calls": self.calls,
            "ok_calls_per_second": self.throughput,
            "latency_ms": {"p50": self.ms(50), "p90": self.ms(90), "p99": self.ms(99),
                           "p99.9": self.ms(99.9), "max": self.worst_ms},
            "status_codes": self.codes, "cpu_seconds": self.cpu, "capacity": self.capacity,
            "loadavg": self.loadavg, "rate": self.rate, "refits_done": self.refits_done,
            "profile": self.profile,
            "gc_pauses_ms": {
                str(g): {"count": len(p), "max": 1000 * max(p, default=0.0),
                         "total": 1000 * sum(p)}
                for g, p in (self.gc_pauses or {}).items()
            },
        }


class GcPauses:
    """Times every cyclic garbage collection in this process (the service's) while open:
    a full collection stops every thread, requests included."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._began = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._began)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)


# -- the benchmark ---------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds of each party over a load window, and what the rest of the machine used
    or left idle; `extra` parties are measured by the caller (e.g. reaped children)."""

    def __init__(self, parties: dict[str, list[str]]) -> None:
        self.parties = parties
        self.before = {name: sum(cpu_seconds(p) for p in pids) for name, pids in parties.items()}
        self.busy, self.total = machine_cpu_seconds()

    def stop(self, extra: dict[str, float] | None = None) -> tuple[dict[str, float], float]:
        """Each party's CPU seconds since the start, and the machine's capacity in them."""
        cpu = {name: sum(cpu_seconds(p) for p in pids) - self.before[name]
               for name, pids in self.parties.items()}
        cpu.update(extra or {})
        busy, total = machine_cpu_seconds()
        ours = sum(v for v in cpu.values() if not math.isnan(v))
        cpu["everything else on the machine"] = max(0.0, busy - self.busy - ours)
        cpu["idle"] = max(0.0, (total - self.total) - (busy - self.busy))
        return cpu, total - self.total


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.notes: list[str] = []
        self.loads: dict[str, tuple[float, float, float]] = {}
        self.figures: dict[str, Any] = {}
        self.windows: list[Window] = []
        self.floor_windows: list[Window] = []
        self.memory: list[MemoryPoint] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-scaler-"))
        self.prometheus: Any = None
        self.service: Any = None
        self.floor_pids: dict[str, list[str]] = {}  # the floor's server, for CPU

    def close(self) -> None:
        if self.service is not None:
            self.service.stop()
        if self.prometheus is not None:
            self.prometheus.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def note_load(self, label: str) -> None:
        self.loads[label] = os.getloadavg()
        log(f"load average (1/5/15 min) {label}: {loadavg()}")

    # -- history ---------------------------------------------------------------------------

    def start_history(self) -> tuple[Fleet, str, Any]:
        """The fleet, the address triggers name, and a source to inject (None: Prometheus)."""
        args = self.args
        if not args.prometheus:
            fleet = Fleet.from_trace(args.targets, args.series or args.targets)
            self.notes.append(f"history from memory (--no-prometheus), {fleet.series} series")
            return fleet, REPLAY_ADDRESS, ReplaySource(fleet)
        from tests.support.prometheus import PrometheusServer, PrometheusServerError, backfill

        self.prometheus = PrometheusServer(workdir=self.workdir / "prometheus")
        stamps = sample_times(time.time())
        tries = [args.series or args.targets]
        if args.series is None:
            tries += [n for n in (100, 10) if n < tries[0]]
        data_dir = self.prometheus.data_dir
        for series in tries:
            fleet = Fleet.from_trace(args.targets, series)
            path = self.workdir / f"{METRIC}.om"
            began = time.perf_counter()
            samples = write_fleet_openmetrics(fleet, stamps, path)
            log(f"wrote {samples:,} samples of {fleet.series} series "
                f"({path.stat().st_size / 2**20:.0f} MB) in {time.perf_counter() - began:.1f} s")
            began = time.perf_counter()
            try:
                _run_with_timeout(partial(backfill, [path], data_dir), args.backfill_timeout)
            except (PrometheusServerError, subprocess.TimeoutExpired, TimeoutError) as exc:
                took = time.perf_counter() - began
                log(f"backfill of {fleet.series} series failed after {took:.0f} s: "
                    f"{str(exc)[:300]}")
                self.notes.append(f"backfill of {fleet.series} series failed or was too slow "
                                  f"({took:.0f} s); fell back to fewer series")
                shutil.rmtree(data_dir, ignore_errors=True)
                continue
            finally:
                path.unlink(missing_ok=True)
            took = time.perf_counter() - began
            self.figures["backfill"] = {"series": fleet.series, "samples": samples,
                                        "seconds": took}
            log(f"promtool backfilled {fleet.series} series in {took:.1f} s")
            self.notes.append(f"Prometheus {_prometheus_version()}: {fleet.series} distinct "
                              f"series, {samples:,} samples, promtool backfill {took:.0f} s")
            if fleet.series < fleet.targets:
                self.notes.append(f"{fleet.targets} targets share {fleet.series} series; their "
                                  "queries differ by a constant factor (`sum(...) * k`)")
            self.prometheus.start()
            log(f"Prometheus ready at {self.prometheus.url}")
            return fleet, self.prometheus.url, None
        raise SystemExit("could not backfill Prometheus at all; try --no-prometheus")

    # -- service ---------------------------------------------------------------------------

    def start_service(self, address: str, source: Any) -> Any:
        from forecaster.config import EngineSettings, Settings
        from forecaster.fitting import FitPool, spawn_workers
        from forecaster.service import Service
        from forecaster.sources.prometheus import PrometheusServerConfig

        args = self.args
        engine = EngineSettings(refresh_seconds=args.refresh_seconds, refit_seconds=3600.0,
                                fit_workers=args.fit_workers)
        servers = () if source is not None else (
            PrometheusServerConfig(url=address, timeout_seconds=30.0),
        )
        settings = Settings(engine=engine, servers=servers, grpc_port=0, http_port=0,
                            host="127.0.0.1")
        workers = FitPool(args.fit_workers, executor_factory=partial(
            spawn_workers, args.fit_workers, priority=args.fit_priority
        ))
        self.service = Service(settings, source=source, fit_pool=workers)
        self.service.start()
        log(f"service on gRPC port {self.service.grpc_port}; {engine}; fit workers at "
            f"priority {args.fit_priority}")
        return self.service

    def refs(self, fleet: Fleet, address: str) -> list[pb.ScaledObjectRef]:
        return [
            pb.ScaledObjectRef(
                namespace="bench",
                name=f"web-{i}",
                scalerMetadata={
                    "scalerAddress": "forecaster.autoscaling:50051",  # KEDA's own key
                    "serverAddress": address,
                    "query": fleet.query(i),
                    "targetValue": "16.7",
                    "model": self.args.model,
                    "step": "5m",
                    "historyWindow": "14d",
                },
            )
            for i in range(fleet.targets)
        ]

    def register(self, refs: list[pb.ScaledObjectRef]) -> tuple[list[str], list[bytes]]:
        """GetMetricSpec, then a first GetMetrics, for every target, as KEDA does when a
        ScaledObject appears: the spec comes from the metadata alone, the first GetMetrics
        registers the target with the engine."""
        names = [""] * len(refs)
        seconds = [0.0] * len(refs)
        refused: Counter[str] = Counter()
        with grpc.insecure_channel(f"127.0.0.1:{self.service.grpc_port}") as channel:
            stub = pb_grpc.ExternalScalerStub(channel)

            def one(i: int) -> None:
                began = time.perf_counter()
                names[i] = stub.GetMetricSpec(refs[i], timeout=30).metricSpecs[0].metricName
                request = pb.GetMetricsRequest(scaledObjectRef=refs[i], metricName=names[i])
                try:
                    stub.GetMetrics(request, timeout=30)
                except grpc.RpcError as exc:  # registered all the same: KEDA asks again
                    refused[exc.code().name] += 1
                seconds[i] = time.perf_counter() - began

            began = time.perf_counter()
            with futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(one, range(len(refs))))
            took = time.perf_counter() - began
        ms = np.array(seconds) * 1000
        self.figures["register"] = {"seconds": took, "p50_ms": float(np.percentile(ms, 50)),
                                    "p99_ms": float(np.percentile(ms, 99)),
                                    "first_getmetrics_refused": dict(refused)}
        log(f"registered {len(refs)} targets via GetMetricSpec and a first GetMetrics in "
            f"{took:.2f} s (8 callers; p50 {np.percentile(ms, 50):.2f} ms, p99 "
            f"{np.percentile(ms, 99):.2f} ms; refused {dict(refused) or 0})")
        ids = [f"{r.namespace}/{r.name}/{n}" for r, n in zip(refs, names, strict=True)]
        requests = [
            pb.GetMetricsRequest(scaledObjectRef=r, metricName=n).SerializeToString()
            for r, n in zip(refs, names, strict=True)
        ]
        return ids, requests

    # -- fits ------------------------------------------------------------------------------

    def wait_first_forecasts(self, ids: list[str], began: float) -> float | None:
        """Seconds from `began` until every target has a first forecast or a failed fit;
        None past --fit-timeout."""
        engine = self.service.engine
        seen = {"values": 0, "forecasts": 0, "failed": 0}

        def all_forecast() -> float | None:
            targets = [engine.get(tid) for tid in ids]
            seen["values"] = sum(t.snapshot.current_value is not None for t in targets)
            seen["forecasts"] = sum(t.snapshot.forecast is not None for t in targets)
            seen["failed"] = sum(t.snapshot.forecast is None and t.fit_failures > 0
                                 for t in targets)
            now = time.perf_counter()
            if seen["values"] == len(ids) and "first_values_seconds" not in self.figures:
                self.figures["first_values_seconds"] = now - began
                log(f"all {len(ids)} targets have a current value (history loaded) after "
                    f"{now - began:.1f} s")
            return now - began if seen["forecasts"] + seen["failed"] >= len(ids) else None

        def progress(_: float) -> None:
            log(f"  {time.perf_counter() - began:5.0f} s: {seen['values']} current values, "
                f"{seen['forecasts']} forecasts; load {loadavg()}")

        took = wait_until(all_forecast, self.args.fit_timeout - (time.perf_counter() - began),
                          progress=progress)
        if took is None:
            self.notes.append(f"first fit: {seen['forecasts']}/{len(ids)} targets had a "
                              f"forecast after --fit-timeout {self.args.fit_timeout:.0f} s")
        else:
            log(f"all {len(ids)} targets have a first forecast after {took:.1f} s "
                f"({seen['failed']} without: fit failed)")
        return took

    def force_refits(self, ids: list[str]) -> dict[str, int]:
        """Make every target due for a refit at the engine loop's next pass."""
        before = {}
        for tid in ids:
            target = self.service.engine.get(tid)
            before[tid] = target.fits + target.fit_failures
            self.service.engine.refit_now(tid)
        return before

    def refits_done(self, before: dict[str, int]) -> int:
        get = self.service.engine.get
        return sum(get(t).fits + get(t).fit_failures > n for t, n in before.items())

    def wait_refits(self, before: dict[str, int], began: float, label: str) -> float | None:
        """Seconds from `began` until every target in `before` has refitted; None past
        --fit-timeout."""

        def all_refitted() -> float | None:
            done = self.refits_done(before) == len(before)
            return time.perf_counter() - began if done else None

        def progress(_: float) -> None:
            log(f"  {label}: {time.perf_counter() - began:5.0f} s, {self.refits_done(before)} "
                f"refitted; load {loadavg()}")

        took = wait_until(all_refitted, self.args.fit_timeout - (time.perf_counter() - began),
                          progress=progress, progress_every=15.0)
        if took is None:
            log(f"{label}: gave up after {time.perf_counter() - began:.0f} s, "
                f"{self.refits_done(before)} refitted")
        else:
            log(f"{label}: all {len(before)} targets refitted in {took:.1f} s")
        return took

    def measure_memory(self, label: str) -> MemoryPoint:
        point = measure_memory(label, self.service)
        self.memory.append(point)
        return point

    def fit_cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in fit_worker_pids(self.service))

    def per_target_memory(self, ids: list[str]) -> dict[str, float]:
        """What one target holds, by part (pickled sizes approximate the live objects)."""
        buffers = models = snapshots = 0
        for tid in ids:
            target = self.service.engine.get(tid)
            buffers += target.buffer.values.nbytes
            models += len(pickle.dumps(target.model)) if target.model is not None else 0
            snapshots += len(pickle.dumps(target.snapshot))
        n = max(1, len(ids))
        return {"buffer_kb": buffers / n / 1024, "model_pickled_kb": models / n / 1024,
                "snapshot_pickled_kb": snapshots / n / 1024}

    # -- load windows ----------------------------------------------------------------------

    def window(
        self, label: str, port: int, requests: list[bytes], *, rate: float = 0.0,
        refits: dict[str, int] | None = None,
    ) -> Window:
        """Run the load generator against `port` for --seconds: closed loop, or open loop at
        `rate` calls/s. `refits`: the fit counts of a forced refit round, to count progress."""
        args = self.args
        if args.client == "h2load":
            return self.h2load_window(label, port, requests, rate=rate, refits=refits)
        context = multiprocessing.get_context("spawn")
        procs = max(1, min(args.client_procs, args.clients))
        ready, go = context.Barrier(procs + 1), context.Barrier(procs + 1)
        results = context.Queue()
        processes, first = [], 0
        for p in range(procs):
            concurrency = args.clients // procs + (p < args.clients % procs)
            job = ClientJob(port, requests, first, concurrency, args.clients, args.seconds,
                            args.warmup_calls, args.call_timeout, args.client, rate / procs)
            first += concurrency
            process = context.Process(target=client_process, args=(job, ready, go, results),
                                      name=f"bench-client-{p}", daemon=True)
            process.start()
            processes.append(process)
        ready.wait(timeout=300)
        meter = CpuMeter({**self.parties(), "load generator": [str(p.pid) for p in processes]})
        profiler, profile = self.start_profiler(label)
        how = f"open loop at {rate:,.0f}/s" if rate else f"{args.clients} {args.client} callers"
        log(f"window {label!r}: {how} from {procs} processes, {args.seconds:.0f} s; "
            f"load {loadavg()}")
        with GcPauses() as pauses:
            go.wait(timeout=60)
            collected = [results.get(timeout=args.seconds + 120) for _ in processes]
        cpu, capacity = meter.stop()
        done = self.refits_done(refits) if refits is not None else None
        load = os.getloadavg()
        for process in processes:
            process.join(timeout=30)
        self.finish_profiler(profiler, profile)
        latencies = np.concatenate([np.frombuffer(c[0], dtype=np.int64) for c in collected])
        codes: Counter[str] = Counter()
        for _, seen, _, _ in collected:
            codes.update(seen)
        elapsed = max(c[3] for c in collected)
        result = Window(label, elapsed, latencies, dict(codes), cpu, capacity, load, rate, done,
                        profile=profile, gc_pauses=pauses.pauses)
        log(result.line())
        self.windows.append(result)
        return result

    def parties(self) -> dict[str, list[str]]:
        """The service's processes whose CPU a window reports (pids, "self" for this one)."""
        parties = {"service: engine (this process)": ["self"],
                   "service: gRPC front": [str(front_pid(self.service))],
                   "fit workers": [str(p) for p in fit_worker_pids(self.service)]}
        if self.prometheus is not None and self.prometheus.pid is not None:
            parties["prometheus"] = [str(self.prometheus.pid)]
        parties.update(self.floor_pids)
        return parties

    def h2load_window(
        self, label: str, port: int, requests: list[bytes], *, rate: float = 0.0,
        refits: dict[str, int] | None = None,
    ) -> Window:
        """The same window with h2load as the load generator: processes each sending one
        target's GetMetricsRequest (gRPC over HTTP/2 is a POST of the framed message), spread
        over the fleet. Closed loop: --clients connections over --client-procs processes, one
        call in flight each. Open loop: see `open_loop_layout`, up to 64 calls in flight per
        connection. Latency comes from h2load's per-request log; the gRPC status of every call
        from the service's own call counts (h2load sees only HTTP statuses, and a gRPC error
        is HTTP 200), which the gRPC front reports to the engine every half second."""
        args = self.args
        if rate:
            procs, per_proc, tick = open_loop_layout(rate, args.open_loop_procs)
            total = procs * per_proc
        else:
            procs, total, tick = max(1, min(args.client_procs, args.clients)), args.clients, 0.0
        url = f"http://127.0.0.1:{port}/externalscaler.ExternalScaler/GetMetrics"
        commands, logs, shares = [], [], []
        for p in range(procs):
            connections = total // procs + (p < total % procs)
            body = self.workdir / f"request-{p}.bin"
            message = requests[(p * len(requests)) // procs]
            body.write_bytes(b"\x00" + len(message).to_bytes(4, "big") + message)
            log_path = self.workdir / f"h2load-{p}.log"
            log_path.unlink(missing_ok=True)
            logs.append(log_path)
            shares.append(connections / total)
            command = [
                "h2load", "-D", f"{args.seconds:g}", "-c", str(connections),
                "-m", "64" if rate else "1", "--log-file", str(log_path), "-d", str(body),
                "-H", "content-type: application/grpc", "-H", "te: trailers",
            ]
            if rate:
                command += ["--rps", f"{rate / total:g}"]
            commands.append([*command, url])
        meter = CpuMeter(self.parties())
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        profiler, profile = self.start_profiler(label)
        how = f"open loop at {rate:,.0f}/s" if rate else f"{args.clients} connections"
        log(f"window {label!r}: h2load, {how} from {len(commands)} processes, "
            f"{args.seconds:.0f} s; load {loadavg()}")
        counted = port == self.service.grpc_port  # the floor's server counts nothing
        before = grpc_calls(self.service.registry) if counted else Counter[str]()
        began = time.perf_counter()
        with GcPauses() as pauses:
            running = []
            for p, command in enumerate(commands):
                # open loop: the processes' ticks spread evenly over one tick
                time.sleep(max(0.0, began + p * tick / len(commands) - time.perf_counter()))
                running.append(subprocess.Popen(command, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT))
            outputs = [r.communicate(timeout=args.seconds + 120)[0].decode() for r in running]
        elapsed = time.perf_counter() - began
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu, capacity = meter.stop({"load generator": (after.ru_utime + after.ru_stime) - (
            children.ru_utime + children.ru_stime
        )})
        done = self.refits_done(refits) if refits is not None else None
        load = os.getloadavg()
        self.finish_profiler(profiler, profile)
        answered, lost = 0, 0
        for command, output in zip(commands, outputs, strict=True):
            counts = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout",
                               output)
            if counts is None:
                raise SystemExit(f"h2load printed no summary ({' '.join(command)}):\n{output}")
            answered += int(counts.group(1))
            lost += sum(int(n) for n in counts.groups()[1:])
        codes: Counter[str] = Counter()
        if counted:  # every answered call, once the front's reports are in

            def reported() -> tuple[Counter[str]] | None:
                delta = grpc_calls(self.service.registry) - before
                return (delta,) if delta.total() >= answered else None

            found = wait_until(reported, REPORTS_WAIT_SECONDS, every=0.05)
            if found is None:
                log(f"  the front's call counts fell short of h2load's {answered:,} answers "
                    f"after {REPORTS_WAIT_SECONDS:g} s")
            codes.update(found[0] if found else grpc_calls(self.service.registry) - before)
        else:
            codes["OK"] = answered  # HTTP 200 with a response; its gRPC status unseen
        if lost:
            codes["h2load: failed, errored or timed out"] += lost
        latencies = np.concatenate([
            _h2load_latencies_ns(path, rate * share)
            for path, share in zip(logs, shares, strict=True)
        ])
        result = Window(label, min(elapsed, args.seconds), latencies, dict(codes), cpu,
                        capacity, load, rate, done, profile=profile, gc_pauses=pauses.pauses)
        log(result.line())
        self.windows.append(result)
        return result

    def windows_for(self, name: str, port: int, requests: list[bytes],
                    refits: dict[str, int] | None = None) -> list[Window]:
        """A closed-loop window and, with --rate, an open-loop one."""
        suffix = ", refits" if refits is not None else ""
        found = [self.window(f"{name}{suffix}", port, requests, refits=refits)]
        if self.args.rate:
            found.append(self.window(f"{name}{suffix}, {self.args.rate:,.0f}/s", port, requests,
                                     rate=self.args.rate, refits=refits))
        return found

    def during_refits(
        self, label: str, ids: list[str], run: Callable[[dict[str, int]], object]
    ) -> float | None:
        """Force a full refit round, run the windows in it, wait for the round to end."""
        before = self.force_refits(ids)
        began = time.perf_counter()
        run(before)
        return self.wait_refits(before, began, label)

    def start_profiler(self, label: str) -> tuple[subprocess.Popen[bytes] | None, str | None]:
        if not self.args.profile:
            return None, None
        py_spy = self.args.py_spy or shutil.which("py-spy")
        if py_spy is None:
            log("--profile: py-spy not found (pip install py-spy, or --py-spy PATH); skipped")
            return None, None
        Path(self.args.profile).mkdir(parents=True, exist_ok=True)
        output = str(Path(self.args.profile) / f"{re.sub(r'[^A-Za-z0-9]+', '-', label)}.txt")
        command = [py_spy, "record", "--pid", str(front_pid(self.service)), "--duration",
                   str(math.ceil(self.args.seconds)), "--rate", "200", "--nonblocking",
                   "--format", "raw", "--output", output]
        if not self.args.profile_all_threads:
            command.append("--gil")
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return process, output

    def finish_profiler(self, profiler: subprocess.Popen[bytes] | None, path: str | None) -> None:
        if profiler is None or path is None:
            return
        _, err = profiler.communicate(timeout=120)
        if profiler.returncode != 0:
            log(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
            return
        summarize_folded(Path(path), top=self.args.profile_top,
                         what="GIL-holding" if not self.args.profile_all_threads else "all")

    # -- the request path in process, without gRPC -----------------------------------------

    def micro(self, request: bytes) -> dict[str, float]:
        """The GetMetrics path's pieces timed in this process (microseconds per call): the
        front's handler over a Board primed as the engine's process would prime it, and the
        engine's side."""
        from forecaster.scaler.board import Board
        from forecaster.scaler.messages import RESOLVED, Answer, Trigger
        from forecaster.scaler.servicer import ExternalScaler

        service = self.service
        resolver, engine = service.resolver, service.engine
        message = pb.GetMetricsRequest.FromString(request)
        ref = message.scaledObjectRef
        metadata = dict(ref.scalerMetadata)
        target = resolver.resolve(ref.namespace, ref.name, metadata)
        planned = engine.serve(target.target_id)
        sent: list[tuple[Any, ...]] = []
        board = Board(sent.append)
        servicer = ExternalScaler(board, first_value_wait_seconds=1.0)
        context = _CaptureAbort()
        loop = asyncio.new_event_loop()

        async def prime() -> None:
            servicer.bind(asyncio.get_running_loop())
            pending = asyncio.ensure_future(board.trigger(ref.namespace, ref.name, metadata))
            await asyncio.sleep(0)
            trigger = Trigger(target.target_id, target.spec.effective_metric_name,
                              target.spec.target_value)
            board.receive((RESOLVED, sent[-1][1], trigger, Answer(True, planned.value, True)))
            await pending

        loop.run_until_complete(prime())

        async def handled(times: int) -> pb.GetMetricsResponse:
            for _ in range(times):
                response = await servicer.GetMetrics(message, context)
            return response

        parts: dict[str, Callable[[], object]] = {
            "GetMetricsRequest.FromString": lambda: pb.GetMetricsRequest.FromString(request),
            "dict(ref.scalerMetadata)": lambda: dict(ref.scalerMetadata),
            "trigger-cache key (frozenset)": lambda: (
                ref.namespace, ref.name, frozenset(metadata.items())
            ),
            "engine: resolver.resolve (dict + cache)": lambda: resolver.resolve(
                ref.namespace, ref.name, dict(ref.scalerMetadata)
            ),
            "engine: engine.serve": lambda: engine.serve(target.target_id),
            "build the response": lambda: pb.GetMetricsResponse(
                metricValues=[pb.MetricValue(metricName="fc-0", metricValue=3,
                                             metricValueFloat=planned.value)]
            ),
            "response.SerializeToString": loop.run_until_complete(handled(1)).SerializeToString,
        }
        timings = {name: _time_call(call) for name, call in parts.items()}
        # The async handler, awaited 100 times per loop pass so the loop's cost stays small.
        timings["front: servicer.GetMetrics (handler, awaited)"] = _time_call(
            lambda: loop.run_until_complete(handled(100)), batch=2
        ) / 100
        loop.close()
        # The background work that shares the GIL with the requests, per target.
        quantiles = sorted({0.05, 0.1, 0.5, 0.9, 0.95, target.spec.quantile})
        horizon = 1 + target.lead_steps
        now = datetime.now(UTC)

        busy = [0]  # calls that found the loop's own refresh of the target in flight

        def refresh() -> None:
            if not engine.run_refresh(target.target_id):
                busy[0] += 1

        background: dict[str, Callable[[], object]] = {
            "background: model.predict (one target)": lambda: target.model.predict(
                horizon, quantiles
            ),
            "background: refresh, no new bin (one target)": refresh,
            "background: query_range 14 d, 5 min (one target)": lambda: target.source.query_range(
                target.spec.query, now - pd.Timedelta(days=14) + pd.Timedelta(minutes=5), now,
                STEP,
            ),
            "background: buffer.series() for a fit (one target)": target.buffer.series,
        }
        for name, call in background.items():
            try:
                timings[name] = _time_call(call, batch=5)
            except AttributeError as exc:  # a target with no model yet
                log(f"skipped {name!r}: {exc}")
        if busy[0]:
            log(f"  {busy[0]} timed refreshes found the loop's refresh in flight and did nothing")
        return timings

    # -- main ------------------------------------------------------------------------------

    def run(self) -> None:
        args = self.args
        self.note_load("at start")
        fleet, address, source = self.start_history()
        service = self.start_service(address, source)
        time.sleep(1.0)
        idle = self.measure_memory("idle (no targets)")
        began = time.perf_counter()
        ids, requests = self.register(self.refs(fleet, address))
        fit_cpu = self.fit_cpu()
        self.figures["first_fit_seconds"] = self.wait_first_forecasts(ids, began)
        engine = service.engine
        models = Counter(engine.get(t).snapshot.model for t in ids)
        log(f"models: {dict(models)}; fallbacks {sum(engine.get(t).fallbacks for t in ids)}")
        loaded = self.measure_memory(f"{len(ids)} targets forecast")
        self.figures["per_target"] = self.per_target_memory(ids)
        log("per target: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                       self.figures["per_target"].items()))

        if not args.skip_refit_round:
            self.note_load("before the second refit round")
            fit_cpu = self.fit_cpu()
            before = self.force_refits(ids)
            self.figures["second_refit_seconds"] = self.wait_refits(
                before, time.perf_counter(), "second refit round (no load)"
            )
            self.figures["refit_cpu_seconds"] = self.fit_cpu() - fit_cpu
            log(f"fit workers used {self.figures['refit_cpu_seconds']:.1f} CPU s for that "
                f"round ({1000 * self.figures['refit_cpu_seconds'] / len(ids):.0f} ms a target)")
            self.measure_memory("after the second refit round")

        self.figures["micro_us"] = self.micro(requests[0])
        log("in process, no gRPC (median CPU us per call of the calling thread):")
        for name, us in self.figures["micro_us"].items():
            log(f"  {us:8.2f} us  {name}")

        # Background CPU of the service with no requests and no fits, over one refresh cycle.
        cpu, began = cpu_seconds(), time.perf_counter()
        time.sleep(min(max(5.0, args.refresh_seconds), 60.0))
        self.figures["idle_service_cpu_share"] = (cpu_seconds() - cpu) / (
            time.perf_counter() - began
        )
        log(f"service background CPU with no requests (refreshes, engine loop): "
            f"{100 * self.figures['idle_service_cpu_share']:.1f} % of a core")

        port = service.grpc_port
        self.steady = self.windows_for("service", port, requests)
        self.refit_windows: list[Window] = []
        self.figures["refit_under_load_seconds"] = self.during_refits(
            "refit round under load", ids,
            lambda before: self.refit_windows.extend(
                self.windows_for("service", port, requests, before)
            ),
        )
        after_load = self.measure_memory("after refits and load")
        if args.floor:
            self.floor(requests)
        self.report(fleet, idle, loaded, after_load)

    def floor(self, requests: list[bytes]) -> None:
        """The floor's steady windows, --repeat times in rotation with the service's (so that
        drifts of the machine's load show)."""
        server = FloorServer()
        self.floor_pids[FLOOR] = [str(server.process.pid)]
        try:
            for round_ in range(self.args.repeat):
                tag = f" #{round_ + 1}" if self.args.repeat > 1 else ""
                self.note_load(f"before floor round{tag or ' 1'}")
                if round_:
                    self.windows_for(f"service{tag}", self.service.grpc_port, requests)
                found = self.windows_for(f"{FLOOR}{tag}", server.port, requests)
                self.floor_windows = self.floor_windows or found  # the summary's: the first
        finally:
            server.stop()
            self.floor_pids.clear()

    # -- report ----------------------------------------------------------------------------

    def report(
        self, fleet: Fleet, idle: MemoryPoint, loaded: MemoryPoint, after: MemoryPoint
    ) -> None:
        args = self.args
        closed, opened = self.refit_windows[0], self.refit_windows[-1]
        above, above_after = loaded.service_mb - idle.service_mb, after.service_mb - idle.service_mb
        figures = self.figures
        print()
        print("=" * 100)
        print(f"forecaster scaler load bench: {fleet.targets} targets on {fleet.series} series, "
              f"model {args.model}, fit workers {args.fit_workers} at priority "
              f"{args.fit_priority}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
              f"grpcio {grpc.__version__}")
        for label, values in self.loads.items():
            print(f"  load average {label:<36} {' '.join(f'{v:.2f}' for v in values)}")
        for note in self.notes:
            print(f"  note: {note}")
        print("-" * 100)
        print(f"GetMetrics load windows, {args.seconds:.0f} s each, from "
              f"{min(args.client_procs, args.clients)} processes: closed loop with "
              f"{args.clients} {args.client} callers, or open loop at the rate named")
        for window in self.windows:
            print(f"  {window.line()}")
        print(f"  (closed loop: mean latency = callers / throughput, Little's law: "
              f"{args.clients} callers at {GOAL_CALLS_PER_SECOND:,.0f}/s wait "
              f"{1000 * args.clients / GOAL_CALLS_PER_SECOND:.0f} ms on average; latency "
              f"goals are judged on the open-loop windows)")
        print("  CPU seconds per window by party (% of the machine; us per GetMetrics call):")
        parties = list(self.windows[0].cpu)
        print("    " + f"{'':<36}" + "".join(f"{p[:18]:>20}" for p in parties))
        for window in self.windows:
            cells = []
            for party in parties:
                used = window.cpu.get(party, float("nan"))
                per_call = used / window.calls * 1e6 if window.calls else float("nan")
                cells.append(f"{used:5.1f} {100 * used / window.capacity:3.0f}% {per_call:5.0f}")
            print(f"    {window.label:<36}" + "".join(f"{c:>20}" for c in cells))
        print(f"  service background CPU with no requests (refreshes, engine loop): "
              f"{100 * figures['idle_service_cpu_share']:.1f} % of a core")
        print("-" * 100)
        print("memory (RSS of this process, which hosts the service):")
        for point in self.memory:
            print(f"  {point.line()}")
        print("  per target: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                           figures["per_target"].items()))
        print("in process, no gRPC (median CPU us per call of the calling thread):")
        for name, us in figures["micro_us"].items():
            print(f"  {us:10.1f}  {name}")
        print("=" * 100)
        print("SUMMARY (goals: load generator on the same machine; GetMetrics during refits)")

        def seconds(value: float | None, skipped: bool = False) -> str:
            if skipped:
                return "skipped"
            return "did not finish" if value is None else f"{value:.1f} s"

        def verdict(ok: bool) -> str:
            return "PASS" if ok else "FAIL"

        kept_up = not opened.rate or opened.throughput >= 0.98 * opened.rate
        judged = [*self.steady, *self.refit_windows]
        errors: Counter[str] = Counter()
        for window in judged:
            errors.update(window.errors)
        steady, steady_open = self.steady[0], self.steady[-1]
        rate = f", offered {opened.rate:,.0f}/s" if opened.rate else ""
        rows = [
            ("GetMetrics/s during refits (closed loop)", f"{closed.throughput:,.0f}/s",
             f">= {GOAL_CALLS_PER_SECOND:,.0f}/s",
             verdict(closed.throughput >= GOAL_CALLS_PER_SECOND)),
            (f"GetMetrics p99 during refits{rate}", f"{opened.ms(99):.2f} ms",
             f"< {GOAL_P99_MS:.0f} ms", verdict(opened.ms(99) < GOAL_P99_MS and kept_up)),
            ("  answered OK", f"{opened.throughput:,.0f}/s", "", ""),
            ("  closed loop: p50 / p99", f"{closed.ms(50):.2f} / {closed.ms(99):.2f} ms", "", ""),
            ("steady state (no refits), closed loop", f"{steady.throughput:,.0f}/s, p99 "
             f"{steady.ms(99):.2f} ms", "", ""),
            (f"  open loop{rate}", f"{steady_open.throughput:,.0f}/s OK, p99 "
             f"{steady_open.ms(99):.2f} ms", "", ""),
            ("GetMetrics errors (these windows)", f"{sum(errors.values())} {dict(errors) or ''}",
             "0", verdict(not errors)),
            (f"memory above idle, {fleet.targets} targets", f"{above:.0f} MB",
             f"< {GOAL_MEMORY_MB:.0f} MB", verdict(above < GOAL_MEMORY_MB)),
            ("  after refits and load", f"{above_after:.0f} MB", f"< {GOAL_MEMORY_MB:.0f} MB",
             verdict(above_after < GOAL_MEMORY_MB)),
            (f"first fit, {fleet.targets} targets (load + fit)",
             seconds(figures.get("first_fit_seconds")), "", ""),
            (f"refit of {fleet.targets} targets, no load",
             seconds(figures.get("second_refit_seconds"), args.skip_refit_round), "", ""),
            ("  fit workers' CPU for it",
             seconds(figures.get("refit_cpu_seconds"), args.skip_refit_round), "", ""),
            (f"refit of {fleet.targets} targets, under load",
             seconds(figures.get("refit_under_load_seconds")), "", ""),
        ]
        if self.floor_windows:
            floor, floor_open = self.floor_windows[0], self.floor_windows[-1]
            rows[6:6] = [
                (f"{FLOOR}, closed loop", f"{floor.throughput:,.0f}/s, p99 "
                 f"{floor.ms(99):.2f} ms", "", ""),
                (f"  open loop{rate}", f"{floor_open.throughput:,.0f}/s OK, p99 "
                 f"{floor_open.ms(99):.2f} ms", "", ""),
            ]
        for name, value, goal, ok in rows:
            goal_text = f"goal {goal}" if goal else ""
            print(f"  {name:<44} {value:>30}   {goal_text:<16} {ok}")
        print("=" * 100)
        if args.json:
            payload = {
                "args": vars(args), "loadavg": self.loads, "notes": self.notes,
                "figures": figures, "windows": [w.as_dict() for w in self.windows],
                "memory": [vars(p) for p in self.memory],
            }
            Path(args.json).write_text(json.dumps(payload, indent=2, default=str) + "\n")
            print(f"figures written to {args.json}")


def open_loop_layout(rate: float, max_procs: int) -> tuple[int, int, float]:
    """h2load processes, connections per process and the tick (s) for `rate` calls/s.

    h2load paces a connection with a timer of max(10 ms, 1 / its rate) and sends at each
    tick the calls that fell due since the last. Above 100 calls/s a connection sends bursts
    every 10 ms, and its connections (which open together) tick together: 2,000/s from 16
    connections arrived as about 20 calls at once every 10 ms, which alone put a do-nothing
    server's p99 at 6 ms. So each connection sends OPEN_LOOP_CONNECTION_RATE calls/s, one
    per tick, and the processes start spread over one tick, as independent clients would."""
    connections = max(1, math.ceil(rate / OPEN_LOOP_CONNECTION_RATE))
    procs = max(1, min(max_procs, connections))
    per_proc = math.ceil(connections / procs)
    return procs, per_proc, 1.0 / (rate / (procs * per_proc))


def _h2load_latencies_ns(path: Path, rate: float) -> np.ndarray:
    """Per-call latency from an h2load log (start µs since the epoch, HTTP status, µs to the
    end of the response); failed streams (status -1) are left out, they are counted as errors.

    Open loop (`rate` calls/s from this process): h2load times a call from when it actually
    sent it. If it sent late (starved of CPU, or out of free streams), the delay since the
    call was due is added, so that a stall is not hidden (coordinated omission): the k-th
    call was due at first start + k / rate."""
    log_rows = np.loadtxt(path, usecols=(0, 1, 2), dtype=np.int64, ndmin=2)
    log_rows = log_rows[log_rows[:, 1] > 0]
    if not len(log_rows):
        return np.empty(0, dtype=np.int64)
    starts, took = log_rows[:, 0], log_rows[:, 2]
    if rate:
        order = np.argsort(starts, kind="stable")
        due = starts[order][0] + np.arange(len(starts)) * (1e6 / rate)
        late = np.zeros(len(starts))
        late[order] = np.maximum(starts[order] - due, 0.0)
        took = took + late.astype(np.int64)
    return took * 1000


def grpc_calls(registry: Any, method: str = "GetMetrics") -> Counter[str]:
    """The service's calls of `method` so far by gRPC status, from its own metrics."""
    calls: Counter[str] = Counter()
    for metric in registry.collect():
        for sample in metric.samples if metric.name == "forecaster_requests" else ():
            labels = sample.labels
            if (sample.name == "forecaster_requests_total" and labels["interface"] == "grpc"
                    and labels["method"] == method):
                calls[labels["code"]] += int(sample.value)
    return calls


def _prometheus_version() -> str:
    done = subprocess.run(["prometheus", "--version"], capture_output=True, check=False,
                          timeout=10)
    words = (done.stdout + done.stderr).decode().split()
    return words[2] if len(words) > 2 else "?"


def _time_call(call: Callable[[], object], budget: float = 0.3, batch: int = 200) -> float:
    """Median microseconds of this thread's CPU time per call, over batches: robust to a
    busy machine and to other threads holding the GIL, which wall-clock timing is not."""
    call()
    samples: list[float] = []
    deadline = time.perf_counter() + budget
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 50):
        began = time.thread_time_ns()
        for _ in range(batch):
            call()
        samples.append((time.thread_time_ns() - began) / batch / 1000)
    return float(np.median(samples))


def _run_with_timeout(work: Callable[[], None], timeout: float) -> None:
    """Run `work` in a thread; TimeoutError if it is not done in `timeout` seconds (the
    promtool helper has its own 120 s limit per file; this bounds the whole backfill)."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"backfill still running after {timeout:.0f} s")
    if failure:
        raise failure[0]


def summarize_folded(path: Path, top: int = 25, what: str = "") -> None:
    """Print the hottest frames of py-spy's folded stacks ("thread;f1;f2 count" lines)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short_frame(f) for f in stack.split(";")[1:]]  # [0] names the thread
        if frames:
            own[frames[-1]] += count
            for frame in set(frames):
                inclusive[frame] += count
    if not total:
        log(f"profile {path}: no samples")
        return
    print(f"\npy-spy, {what} samples of the service process: {total} ({path})")
    print("  self %  frame                                                incl %  frame")
    for (a, n), (b, m) in zip(own.most_common(top), inclusive.most_common(top), strict=False):
        print(f"  {100 * n / total:6.1f}  {a[:52]:<52} {100 * m / total:6.1f}  {b}")


def _short_frame(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)": lines merged per function
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].split(':')[0]})" if where else name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--targets", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16, help="concurrent GetMetrics callers")
    parser.add_argument("--client-procs", type=int, default=None,
                        help="load-generator processes (default: 8 for h2load, each on its own "
                        "target; 2 for Python callers)")
    parser.add_argument("--open-loop-procs", type=int, default=20,
                        help="h2load processes for the open-loop windows (see open_loop_layout)")
    parser.add_argument("--client", choices=("h2load", "aio", "sync"),
                        default="h2load" if shutil.which("h2load") else "aio",
                        help="the load generator: h2load (nghttp2's HTTP/2 load tool, in C; "
                        "the default when installed, `make bench` installs it), or Python "
                        "callers as coroutines on grpc.aio or as threads")
    parser.add_argument("--seconds", type=float, default=20.0, help="each load window")
    parser.add_argument("--rate", type=float, default=GOAL_CALLS_PER_SECOND,
                        help="offered calls/s of the open-loop windows (0: none); these "
                        "judge the latency goal")
    parser.add_argument("--prometheus", action=argparse.BooleanOptionalAction, default=True,
                        help="history from a backfilled Prometheus (default) or from memory")
    parser.add_argument("--series", type=int, default=None,
                        help="distinct series (default one per target; 100 then 10 if the "
                        "backfill fails or is too slow)")
    parser.add_argument("--backfill-timeout", type=float, default=600.0)
    parser.add_argument("--model", default="holt_winters",
                        help="the triggers' model (auto backtests: ~70x slower fits)")
    parser.add_argument("--fit-workers", type=int, default=2, help="the engine's fit processes")
    parser.add_argument("--fit-priority", choices=("idle", "nice"), default="idle",
                        help="the fit workers' CPU priority: SCHED_IDLE (the service's) or "
                        "nice 10 (its fallback where SCHED_IDLE is refused)")
    parser.add_argument("--refresh-seconds", type=float, default=30.0,
                        help="the engine's refresh interval (the service's default: 30 s)")
    parser.add_argument("--fit-timeout", type=float, default=1800.0,
                        help="stop waiting for a fit round after this long")
    parser.add_argument("--skip-refit-round", action="store_true",
                        help="do not time a refit round without load")
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                        help="windows against a do-nothing servicer too: the framework's floor")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of the floor's steady windows, with the service's again")
    parser.add_argument("--warmup-calls", type=int, default=50, help="per caller, unmeasured")
    parser.add_argument("--call-timeout", type=float, default=10.0, help="per GetMetrics call")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="py-spy the service in each window; folded stacks into DIR")
    parser.add_argument("--profile-all-threads", action="store_true",
                        help="with --profile: every active thread, not only the GIL holder")
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument("--py-spy", default=None, metavar="PATH", help="the py-spy binary")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures")
    args = parser.parse_args(argv)
    if args.targets < 1 or args.clients < 1 or args.seconds <= 0:
        parser.error("--targets, --clients and --seconds must be positive")
    if args.client_procs is None:
        args.client_procs = 8 if args.client == "h2load" else 2
    return args


def main(argv: list[str] | None = None) -> None:
    bench = Bench(parse_args(argv))
    try:
        bench.run()
    finally:
        bench.close()


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve-floor"]:
        serve_floor()
    else:
        main()
