"""Load benchmark of the KEDA external scaler: many targets, concurrent GetMetrics, refits.

    .venv/bin/python bench/bench_scaler_load.py [--targets 1000] [--clients 16] [--seconds 20]
        [--rates 300,2000] [--client h2load|aio|sync] [--no-prometheus] [--no-floor] [--repeat N]
        [--fit-priority idle|nice] [--profile DIR] [--json FILE]

The real service runs here (its engine in this process, its gRPC front in a child, as in
production) with a fleet of targets over 14 days of 5-minute history, from a backfilled
Prometheus or from memory. It measures the time to every target's first forecast and to a
forced refit round; GetMetrics throughput (closed loop) and latency (open loop) from a load
generator in processes of its own, steady and during a refit round, beside the framework's
floor (a do-nothing servicer); the service's memory; and every party's CPU. The summary checks
the goals: 2,000 GetMetrics/s and a p99 under 5 ms during refits, under 200 MB above idle.
bench/README.md says how to read it and what runs showed.
"""

from __future__ import annotations

import os

# Before numpy is imported, here and in every process spawned from this module.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import argparse  # noqa: E402
import logging  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable  # noqa: E402
from concurrent import futures  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402

import repo  # noqa: E402, F401 (puts the root on sys.path for tests.support)
from accounting import (  # noqa: E402
    CpuMeter,
    Profiler,
    cpu_seconds,
    fit_worker_pids,
    loadavg,
    measure_memory,
)
from forecaster.scaler.generated import externalscaler_pb2 as pb  # noqa: E402
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc  # noqa: E402
from load import LoadGenerator, LoadShape, Window, grpc_calls  # noqa: E402
from request_path import time_request_path  # noqa: E402
from scaler_fleet import (  # noqa: E402
    Fleet,
    History,
    ReplaySource,
    backfilled,
    in_memory,
    sample_times,
    write_fleet_openmetrics,
)
from scaler_floor import FloorServer  # noqa: E402
from scaler_report import GOAL_RATES, Run, print_report, write_json  # noqa: E402
from tests.support.waiting import poll  # noqa: E402

# Kept importable from here for the scripts that build the same fleet.
__all__ = ["Fleet", "ReplaySource", "main", "sample_times", "write_fleet_openmetrics"]

FLOOR = "floor: do-nothing servicer"

log = logging.getLogger("bench").info


class Bench:
    """One run: history, service, targets, fits, load windows, then the report."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run = Run(args)
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-scaler-"))
        self.history: History | None = None
        self.service: Any = None
        self.floor_pids: dict[str, list[str]] = {}  # the floor's server, for CPU
        profiler = None
        if args.profile:
            profiler = Profiler(Path(args.profile), args.seconds, py_spy=args.py_spy,
                                all_threads=args.profile_all_threads, top=args.profile_top)
        shape = LoadShape(args.client, args.clients, args.client_procs, args.open_loop_procs,
                          args.seconds, args.warmup_calls, args.call_timeout)
        self.load = LoadGenerator(shape, self.workdir, self.parties, profiler=profiler,
                                  profiled=lambda: int(self.service.scaler.pid))
        self.run.windows = self.load.windows

    def close(self) -> None:
        if self.service is not None:
            self.service.stop()
        if self.history is not None:
            self.history.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def note_load(self, label: str) -> None:
        self.run.loads[label] = os.getloadavg()
        log(f"load average (1/5/15 min) {label}: {loadavg()}")

    # -- the service and its targets ---------------------------------------------------------

    def start_history(self) -> History:
        args = self.args
        if not args.prometheus:
            self.history = in_memory(args.targets, args.series or args.targets)
        else:
            self.history = backfilled(self.workdir, args.targets, args.series,
                                      args.backfill_timeout, log)
        self.run.fleet = self.history.fleet
        self.run.notes += self.history.notes
        if self.history.backfill is not None:
            self.run.figures["backfill"] = self.history.backfill
        return self.history

    def start_service(self, history: History) -> Any:
        from forecaster.config import EngineSettings, Settings
        from forecaster.fitting import FitPool, spawn_workers
        from forecaster.service import Service
        from forecaster.sources.prometheus import PrometheusServerConfig

        args = self.args
        engine = EngineSettings(refresh_seconds=args.refresh_seconds, refit_seconds=3600.0,
                                fit_workers=args.fit_workers)
        servers = () if history.source is not None else (
            PrometheusServerConfig(url=history.address, timeout_seconds=30.0),
        )
        settings = Settings(engine=engine, servers=servers, grpc_port=0, http_port=0,
                            host="127.0.0.1")
        workers = FitPool(args.fit_workers, executor_factory=partial(
            spawn_workers, args.fit_workers, priority=args.fit_priority
        ))
        self.service = Service(settings, source=history.source, fit_pool=workers)
        self.service.start()
        log(f"service on gRPC port {self.service.grpc_port}; {engine}; fit workers at "
            f"priority {args.fit_priority}")
        return self.service

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
        self.run.figures["register"] = {"seconds": took, "p50_ms": float(np.percentile(ms, 50)),
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

    # -- fits --------------------------------------------------------------------------------

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
            if seen["values"] == len(ids) and "first_values_seconds" not in self.run.figures:
                self.run.figures["first_values_seconds"] = now - began
                log(f"all {len(ids)} targets have a current value (history loaded) after "
                    f"{now - began:.1f} s")
            return now - began if seen["forecasts"] + seen["failed"] >= len(ids) else None

        def progress(_: float) -> None:
            log(f"  {time.perf_counter() - began:5.0f} s: {seen['values']} current values, "
                f"{seen['forecasts']} forecasts; load {loadavg()}")

        took = poll(all_forecast, self.args.fit_timeout - (time.perf_counter() - began),
                    every=0.2, progress=progress)
        if took is None:
            self.run.notes.append(f"first fit: {seen['forecasts']}/{len(ids)} targets had a "
                                  f"forecast after --fit-timeout {self.args.fit_timeout:.0f} s")
        else:
            log(f"all {len(ids)} targets have a first forecast after {took:.1f} s "
                f"({seen['failed']} without: fit failed)")
        return took

    def force_refits(self, ids: list[str]) -> dict[str, int]:
        """Make every target due for a refit at the engine loop's next pass; returns each
        one's fits so far."""
        engine, before = self.service.engine, {}
        for tid in ids:
            target = engine.get(tid)
            before[tid] = target.fits + target.fit_failures
            engine.refit_now(tid)
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

        took = poll(all_refitted, self.args.fit_timeout - (time.perf_counter() - began),
                    every=0.2, progress=progress, progress_every=15.0)
        if took is None:
            log(f"{label}: gave up after {time.perf_counter() - began:.0f} s, "
                f"{self.refits_done(before)} refitted")
        else:
            log(f"{label}: all {len(before)} targets refitted in {took:.1f} s")
        return took

    def during_refits(
        self, label: str, ids: list[str], run: Callable[[dict[str, int]], object]
    ) -> float | None:
        """Force a full refit round, run the windows in it, wait for the round to end."""
        before = self.force_refits(ids)
        began = time.perf_counter()
        run(before)
        return self.wait_refits(before, began, label)

    def fit_cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in fit_worker_pids(self.service))

    def measure_memory(self, label: str) -> None:
        self.run.memory.append(measure_memory(label, self.service))

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

    # -- load windows ------------------------------------------------------------------------

    def parties(self) -> dict[str, list[str]]:
        """The processes whose CPU a window reports (pids, "self" for this one)."""
        parties = {"service: engine (this process)": ["self"],
                   "service: gRPC front": [str(self.service.scaler.pid)],
                   "fit workers": [str(p) for p in fit_worker_pids(self.service)]}
        prometheus = self.history.prometheus if self.history is not None else None
        if prometheus is not None and prometheus.pid is not None:
            parties["prometheus"] = [str(prometheus.pid)]
        parties.update(self.floor_pids)
        return parties

    def windows_for(self, name: str, port: int, requests: list[bytes],
                    refits: dict[str, int] | None = None) -> list[Window]:
        """A closed-loop window, then an open-loop one at each of --rates."""
        service = self.service
        calls = (lambda: grpc_calls(service.registry)) if port == service.grpc_port else None
        done = (lambda: self.refits_done(refits)) if refits is not None else None
        suffix = ", refits" if refits is not None else ""
        found = [self.load.window(f"{name}{suffix}", port, requests, calls=calls, refits=done)]
        for rate in self.args.rates:
            found.append(self.load.window(
                f"{name}{suffix}, {rate:,.0f}/s", port, requests,
                rate=rate, calls=calls, refits=done,
            ))
        return found

    def floor(self, requests: list[bytes]) -> None:
        """The floor's steady windows, --repeat times in rotation with the service's: the
        floor is the median of its rounds, since its tail varies from minute to minute."""
        server = FloorServer()
        self.floor_pids[FLOOR] = [str(server.process.pid)]
        try:
            for round_ in range(self.args.repeat):
                tag = f" #{round_ + 1}" if self.args.repeat > 1 else ""
                self.note_load(f"before floor round{tag or ' 1'}")
                if round_:
                    self.run.steady_rounds.append(
                        self.windows_for(f"service{tag}", self.service.grpc_port, requests)
                    )
                self.run.floor_rounds.append(
                    self.windows_for(f"{FLOOR}{tag}", server.port, requests)
                )
        finally:
            server.stop()
            self.floor_pids.clear()

    # -- the run -----------------------------------------------------------------------------

    def main(self) -> None:
        args, figures = self.args, self.run.figures
        self.note_load("at start")
        history = self.start_history()
        service = self.start_service(history)
        time.sleep(1.0)  # settled, before the idle reading
        self.measure_memory("idle (no targets)")
        meter = CpuMeter({k: v for k, v in self.parties().items() if k != "fit workers"})
        began = time.perf_counter()
        ids, requests = self.register(history.fleet.refs(history.address, args.model))
        figures["first_fit_seconds"] = self.wait_first_forecasts(ids, began)
        # The workers start with the first fit, so their whole CPU time is this round's.
        cpu, capacity = meter.stop({"fit workers": self.fit_cpu()})
        figures["first_fit_cpu"] = {**cpu, "machine": capacity}
        log("first fit, CPU seconds by party: " + ", ".join(
            f"{party} {used:.1f}" for party, used in cpu.items()))
        engine = service.engine
        models = Counter(engine.get(t).snapshot.model for t in ids)
        log(f"models: {dict(models)}; fallbacks {sum(engine.get(t).fallbacks for t in ids)}")
        self.measure_memory(f"{len(ids)} targets forecast")
        figures["per_target"] = self.per_target_memory(ids)
        log("per target: " + ", ".join(f"{k} {v:.1f}" for k, v in figures["per_target"].items()))

        if not args.skip_refit_round:
            self.note_load("before the second refit round")
            fit_cpu = self.fit_cpu()
            before = self.force_refits(ids)
            figures["second_refit_seconds"] = self.wait_refits(
                before, time.perf_counter(), "second refit round (no load)"
            )
            figures["refit_cpu_seconds"] = self.fit_cpu() - fit_cpu
            log(f"fit workers used {figures['refit_cpu_seconds']:.1f} CPU s for that round "
                f"({1000 * figures['refit_cpu_seconds'] / len(ids):.0f} ms a target)")
            self.measure_memory("after the second refit round")

        figures["micro_us"] = time_request_path(service, requests[0])
        log("in process, no gRPC (median CPU us per call of the calling thread):")
        for name, us in figures["micro_us"].items():
            log(f"  {us:8.2f} us  {name}")

        # Background CPU of the service with no requests and no fits, over one refresh cycle.
        cpu, began = cpu_seconds(), time.perf_counter()
        time.sleep(min(max(5.0, args.refresh_seconds), 60.0))
        figures["idle_service_cpu_share"] = (cpu_seconds() - cpu) / (time.perf_counter() - began)
        log(f"service background CPU with no requests (refreshes, engine loop): "
            f"{100 * figures['idle_service_cpu_share']:.1f} % of a core")

        port = service.grpc_port
        self.run.steady_rounds.append(self.windows_for("service", port, requests))
        figures["refit_under_load_seconds"] = self.during_refits(
            "refit round under load", ids,
            lambda before: self.run.refit_windows.extend(
                self.windows_for("service", port, requests, before)
            ),
        )
        self.measure_memory("after refits and load")
        if args.floor:
            self.floor(requests)
        print_report(self.run)
        if args.json:
            write_json(self.run, Path(args.json))


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
    parser.add_argument("--rates", type=rates, default=",".join(f"{r:g}" for r in GOAL_RATES),
                        help="offered calls/s of the open-loop windows, comma-separated "
                        "('' for none; default %(default)s); these judge the latency goals")
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
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of the floor's steady windows, each after the service's "
                        "again; the floor is their median")
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
    if args.targets < 1 or args.clients < 1 or args.seconds <= 0 or args.repeat < 1:
        parser.error("--targets, --clients, --seconds and --repeat must be positive")
    if args.client_procs is None:
        args.client_procs = 8 if args.client == "h2load" else 2
    return args


def rates(text: str) -> list[float]:
    """--rates: calls/s, comma-separated, each positive."""
    found = [float(part) for part in text.split(",") if part.strip()]
    if any(not rate > 0 for rate in found):
        raise argparse.ArgumentTypeError(f"each rate must be positive, got {text!r}")
    return found


def main(argv: list[str] | None = None) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("bench")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    bench = Bench(parse_args(argv))
    try:
        bench.main()
    finally:
        bench.close()


if __name__ == "__main__":
    from forecaster.fitting import limit_malloc_arenas, use_system_allocator

    # The engine's process as `forecaster serve` runs it: on the C allocator (unless
    # PYTHONMALLOC is set), with its malloc arenas and mmap threshold fixed.
    use_system_allocator()
    limit_malloc_arenas()
    main()
