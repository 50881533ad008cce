"""The load generators: h2load or Python callers in processes of their own, closed or open
loop, each window measured with every party's CPU and this process's GC pauses.

This process may host the service whose memory a bench reports, so a window keeps only its
latencies' summary, and h2load's logs (up to 200,000 calls a window) are read in a process
of their own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import re
import resource
import subprocess
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

import repo  # noqa: F401 (puts the root on sys.path for tests.support)
from accounting import CpuMeter, GcPauses, Profiler, loadavg
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from tests.support.waiting import poll

OPEN_LOOP_CONNECTION_RATE = 50.0  # calls/s per h2load connection (see open_loop_layout)
REPORTS_WAIT_SECONDS = 5.0  # for the front's call counts after a window: ten of its reports
PERCENTILES = (50.0, 90.0, 99.0, 99.9)  # what a window keeps of its latencies

log = logging.getLogger("bench").info


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


@dataclass(frozen=True)
class Latency:
    """A window's latencies, summarised: the calls answered and PERCENTILES and worst, in ms."""

    calls: int
    percentiles_ms: dict[float, float]
    worst_ms: float

    @classmethod
    def of(cls, latencies_ns: np.ndarray) -> Latency:
        if not latencies_ns.size:
            return cls(0, dict.fromkeys(PERCENTILES, math.nan), math.nan)
        found = np.percentile(latencies_ns, PERCENTILES) / 1e6
        return cls(int(latencies_ns.size), dict(zip(PERCENTILES, map(float, found),
                                                    strict=True)),
                   float(latencies_ns.max()) / 1e6)


@dataclass
class Window:
    """One load window's figures."""

    label: str
    seconds: float  # from the start until the last answer (open loop: the late ones too)
    latency: Latency  # of every answered call, errors included
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
        return self.latency.calls

    @property
    def throughput(self) -> float:
        """Calls answered OK per second."""
        return self.codes.get("OK", 0) / self.seconds

    def ms(self, q: float) -> float:
        """The q-th percentile of the latencies in ms; q is one of PERCENTILES."""
        return self.latency.percentiles_ms[q]

    @property
    def worst_ms(self) -> float:
        return self.latency.worst_ms

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


@dataclass(frozen=True)
class LoadShape:
    """How the load generator calls (the bench's options for it)."""

    client: str  # "h2load"; or Python callers, "aio" (coroutines) or "sync" (threads)
    clients: int  # closed loop: callers (h2load: connections), one call in flight each
    client_procs: int  # processes for the closed loop's callers
    open_loop_procs: int  # h2load processes for the open loop (see open_loop_layout)
    seconds: float
    warmup_calls: int  # per Python caller, unmeasured
    call_timeout: float  # per Python caller's call


class LoadGenerator:
    """Load windows against a gRPC port, each measured with the CPU seconds of the parties
    `parties()` names (pids, "self" for this process) and this process's GC pauses; with a
    `profiler`, `profiled()` (a pid) is recorded in each window.

    >>> load = LoadGenerator(shape, workdir, parties)                 # doctest: +SKIP
    >>> load.window("service", port, requests, rate=2000.0)           # doctest: +SKIP
    """

    def __init__(
        self, shape: LoadShape, workdir: Path, parties: Callable[[], dict[str, list[str]]], *,
        profiler: Profiler | None = None, profiled: Callable[[], int] | None = None,
    ) -> None:
        self.shape = shape
        self.workdir = workdir
        self.parties = parties
        self.profiler = profiler
        self.profiled = profiled
        self.windows: list[Window] = []

    def window(
        self, label: str, port: int, requests: list[bytes], *, rate: float = 0.0,
        calls: Callable[[], Counter[str]] | None = None,
        refits: Callable[[], int] | None = None,
    ) -> Window:
        """Load `port` for the shape's seconds: closed loop, or open loop at `rate` calls/s.
        `calls`: the server's own count of its calls by gRPC status, for h2load (None: the
        server counts nothing, every HTTP answer is taken as OK); `refits`: targets refitted
        so far in a forced refit round."""
        if self.shape.client == "h2load":
            result = self._h2load(label, port, requests, rate, calls, refits)
        else:
            result = self._python(label, port, requests, rate, refits)
        log(result.line())
        self.windows.append(result)
        return result

    def _start_profile(self, label: str) -> tuple[subprocess.Popen[bytes], str] | None:
        if self.profiler is None or self.profiled is None:
            return None
        return self.profiler.start(label, self.profiled())

    def _finish_profile(self, started: tuple[subprocess.Popen[bytes], str] | None) -> str | None:
        return self.profiler.finish(started) if self.profiler is not None else None

    def _python(
        self, label: str, port: int, requests: list[bytes], rate: float,
        refits: Callable[[], int] | None,
    ) -> Window:
        shape = self.shape
        context = multiprocessing.get_context("spawn")
        procs = max(1, min(shape.client_procs, shape.clients))
        ready, go = context.Barrier(procs + 1), context.Barrier(procs + 1)
        results = context.Queue()
        processes, first = [], 0
        for p in range(procs):
            concurrency = shape.clients // procs + (p < shape.clients % procs)
            job = ClientJob(port, requests, first, concurrency, shape.clients, shape.seconds,
                            shape.warmup_calls, shape.call_timeout, shape.client, rate / procs)
            first += concurrency
            process = context.Process(target=client_process, args=(job, ready, go, results),
                                      name=f"bench-client-{p}", daemon=True)
            process.start()
            processes.append(process)
        ready.wait(timeout=300)
        meter = CpuMeter({**self.parties(), "load generator": [str(p.pid) for p in processes]})
        profile = self._start_profile(label)
        how = f"open loop at {rate:,.0f}/s" if rate else f"{shape.clients} {shape.client} callers"
        log(f"window {label!r}: {how} from {procs} processes, {shape.seconds:.0f} s; "
            f"load {loadavg()}")
        with GcPauses() as pauses:
            go.wait(timeout=60)
            collected = [results.get(timeout=shape.seconds + 120) for _ in processes]
        cpu, capacity = meter.stop()
        done = refits() if refits is not None else None
        load = os.getloadavg()
        for process in processes:
            process.join(timeout=30)
        path = self._finish_profile(profile)
        latency = Latency.of(
            np.concatenate([np.frombuffer(c[0], dtype=np.int64) for c in collected])
        )
        codes: Counter[str] = Counter()
        for _, seen, _, _ in collected:
            codes.update(seen)
        elapsed = max(c[3] for c in collected)
        return Window(label, elapsed, latency, dict(codes), cpu, capacity, load, rate, done,
                      profile=path, gc_pauses=pauses.pauses)

    def _h2load(
        self, label: str, port: int, requests: list[bytes], rate: float,
        calls: Callable[[], Counter[str]] | None, refits: Callable[[], int] | None,
    ) -> Window:
        """h2load processes each sending one target's GetMetricsRequest (gRPC over HTTP/2 is
        a POST of the framed message), spread over the fleet. Closed loop: the shape's
        clients as connections over its processes, one call in flight each. Open loop: see
        `open_loop_layout`, up to 64 calls in flight per connection. Latency comes from
        h2load's per-request log; the gRPC status of every call from `calls` (h2load sees
        only HTTP statuses, and a gRPC error is HTTP 200)."""
        shape = self.shape
        if rate:
            procs, per_proc, tick = open_loop_layout(rate, shape.open_loop_procs)
            total = procs * per_proc
        else:
            procs, total, tick = max(1, min(shape.client_procs, shape.clients)), shape.clients, 0.0
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
                "h2load", "-D", f"{shape.seconds:g}", "-c", str(connections),
                "-m", "64" if rate else "1", "--log-file", str(log_path), "-d", str(body),
                "-H", "content-type: application/grpc", "-H", "te: trailers",
            ]
            if rate:
                command += ["--rps", f"{rate / total:g}"]
            commands.append([*command, url])
        meter = CpuMeter(self.parties())
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        profile = self._start_profile(label)
        how = f"open loop at {rate:,.0f}/s" if rate else f"{shape.clients} connections"
        log(f"window {label!r}: h2load, {how} from {len(commands)} processes, "
            f"{shape.seconds:.0f} s; load {loadavg()}")
        before = calls() if calls is not None else Counter[str]()
        began = time.perf_counter()
        with GcPauses() as pauses:
            running = []
            for p, command in enumerate(commands):
                # open loop: the processes' ticks spread evenly over one tick
                time.sleep(max(0.0, began + p * tick / len(commands) - time.perf_counter()))
                running.append(subprocess.Popen(command, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT))
            outputs = [r.communicate(timeout=shape.seconds + 120)[0].decode() for r in running]
        elapsed = time.perf_counter() - began
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu, capacity = meter.stop({"load generator": (after.ru_utime + after.ru_stime) - (
            children.ru_utime + children.ru_stime
        )})
        done = refits() if refits is not None else None
        load = os.getloadavg()
        path = self._finish_profile(profile)
        answered, lost = 0, 0
        for command, output in zip(commands, outputs, strict=True):
            counts = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout",
                               output)
            if counts is None:
                raise SystemExit(f"h2load printed no summary ({' '.join(command)}):\n{output}")
            answered += int(counts.group(1))
            lost += sum(int(n) for n in counts.groups()[1:])
        codes: Counter[str] = Counter()
        if calls is not None:  # every answered call, once the server's counts are in

            def reported() -> tuple[Counter[str]] | None:
                delta = calls() - before
                return (delta,) if delta.total() >= answered else None

            found = poll(reported, REPORTS_WAIT_SECONDS, every=0.05)
            if found is None:
                log(f"  the server's call counts fell short of h2load's {answered:,} answers "
                    f"after {REPORTS_WAIT_SECONDS:g} s")
            codes.update(found[0] if found else calls() - before)
        else:
            codes["OK"] = answered  # HTTP 200 with a response; its gRPC status unseen
        if lost:
            codes["h2load: failed, errored or timed out"] += lost
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as reader:
            latency = reader.submit(
                h2load_latency, logs, [rate * share for share in shares]
            ).result()
        return Window(label, min(elapsed, shape.seconds), latency, dict(codes), cpu,
                      capacity, load, rate, done, profile=path, gc_pauses=pauses.pauses)


def open_loop_layout(rate: float, max_procs: int) -> tuple[int, int, float]:
    """h2load processes, connections per process and the tick (s) for `rate` calls/s.

    h2load paces a connection with a timer of max(10 ms, 1 / its rate), and the connections
    of one process tick together: above 100 calls/s each sends bursts that alone lift a
    server's tail (bench/README.md). So each connection sends OPEN_LOOP_CONNECTION_RATE
    calls/s, one per tick, and the processes start spread over one tick, as independent
    clients would."""
    connections = max(1, math.ceil(rate / OPEN_LOOP_CONNECTION_RATE))
    procs = max(1, min(max_procs, connections))
    per_proc = math.ceil(connections / procs)
    return procs, per_proc, 1.0 / (rate / (procs * per_proc))


def h2load_latency(logs: list[Path], rates: list[float]) -> Latency:
    """The summary of h2load logs, each from a process sending at its rate (0: closed loop);
    see h2load_latencies_ns."""
    return Latency.of(np.concatenate([
        h2load_latencies_ns(path, rate) for path, rate in zip(logs, rates, strict=True)
    ]))


def h2load_latencies_ns(path: Path, rate: float) -> np.ndarray:
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
