"""Restart benchmark of saved state (stateDir): N targets fitted, the service stopped and
started again on the same directory.

    .venv/bin/python bench/bench_restart.py [--targets 1000] [--model auto] [--series 100]
        [--keep-state DIR] [--prometheus-port PORT] [--fit-workers 2] [--json FILE]

1. History: Debian's Prometheus, backfilled by promtool with the load bench's fleet
   (bench/scaler_fleet.py: `bench_requests{target=...}`, scaled, shifted copies of the
   AWS trace, 14 days at 5 minutes, then a sample a minute to 3 hours ahead). The values
   depend on the absolute time only, so a state directory kept from an earlier run
   (--keep-state) still matches a later backfill; Prometheus then listens on a fixed port
   (19091 unless --prometheus-port), since each saved spec names its server, and a target
   whose server is not configured is refused.
2. The first service registers every target with GetMetricSpec, as KEDA does, and fits them
   all (the first fit is timed), unless --keep-state DIR already holds their state: then it
   starts from that. The save after a refit is timed per target on a sample (pickling under
   the lock and the atomic write, as the saver does), and the bytes per target counted.
3. Every target is refreshed (as the loop does every 30 s: each has changed since its save),
   and the service stops; the shutdown's save is timed (its deadline is 5 s).
4. A new service starts on the same directory. Timed from the start: loading the saved
   state (start() returns once it is loaded), and the headline, until every target serves a
   forecast made after the start from history read after the start (its snapshot's
   forecast_made_at and current_time both after the start). The goal is 60 s, against the
   first fit's 1,392 s for 1,000 `auto` targets. RSS of this process is printed at each point.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent import futures  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402

import repo  # noqa: E402, F401 (puts the root on sys.path for tests.support)
from accounting import rss_mb  # noqa: E402
from forecaster.scaler.generated import externalscaler_pb2 as pb  # noqa: E402
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc  # noqa: E402
from scaler_fleet import (  # noqa: E402
    METRIC,
    Fleet,
    sample_times,
    write_fleet_openmetrics,
)
from tests.support.waiting import poll  # noqa: E402

GOAL_SECONDS = 60.0
FIRST_FIT_BEFORE_SECONDS = 1392.0  # bench/README.md: 1,000 `auto` targets, first fit
KEPT_STATE_PORT = 19091  # Prometheus's port with --keep-state, unless --prometheus-port


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class SaveLog(logging.Handler):
    """Keeps the engine's "saved the state of N targets in S s" at shutdown."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.saved: tuple[int, float] | None = None
        self.left: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("saved the state of") and isinstance(record.args, tuple):
            self.saved = (int(record.args[0]), float(record.args[1]))
        if "left unwritten" in message:
            self.left = message


def start_prometheus(args: argparse.Namespace, workdir: Path) -> tuple[Any, Fleet]:
    from tests.support.prometheus import PrometheusServer, backfill

    fleet = Fleet.from_trace(args.targets, args.series)
    port = args.prometheus_port
    if port is None and args.keep_state:
        port = KEPT_STATE_PORT  # the saved specs name the server: keep its address
    server = PrometheusServer(workdir=workdir / "prometheus", port=port)
    path = workdir / f"{METRIC}.om"
    samples = write_fleet_openmetrics(fleet, sample_times(time.time()), path)
    began = time.perf_counter()
    backfill([path], server.data_dir)
    path.unlink()
    log(f"promtool backfilled {fleet.series} series ({samples:,} samples) in "
        f"{time.perf_counter() - began:.0f} s")
    server.start()
    return server, fleet


def make_service(args: argparse.Namespace, url: str, state_dir: Path) -> Any:
    from forecaster.config import EngineSettings, Settings
    from forecaster.service import Service
    from forecaster.sources.prometheus import PrometheusServerConfig

    engine = EngineSettings(refresh_seconds=30.0, refit_seconds=3600.0,
                            fit_workers=args.fit_workers,
                            max_targets=max(5000, args.targets))
    settings = Settings(engine=engine, servers=(PrometheusServerConfig(url=url,
                                                                       timeout_seconds=30.0),),
                        grpc_port=0, http_port=0, host="127.0.0.1", state_dir=state_dir)
    return Service(settings)


def register(service: Any, fleet: Fleet, url: str, model: str) -> list[str]:
    """GetMetricSpec then IsActive for every target, as KEDA does (the second registers it
    with the engine); the target ids."""
    refs = [
        pb.ScaledObjectRef(namespace="bench", name=f"web-{i}", scalerMetadata={
            "serverAddress": url, "query": fleet.query(i), "targetValue": "16.7",
            "model": model, "step": "5m", "historyWindow": "14d",
        })
        for i in range(fleet.targets)
    ]
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = pb_grpc.ExternalScalerStub(channel)

        def one(ref: pb.ScaledObjectRef) -> str:
            name = stub.GetMetricSpec(ref, timeout=60).metricSpecs[0].metricName
            with contextlib.suppress(grpc.RpcError):  # registered even before its first value
                stub.IsActive(ref, timeout=60)
            return f"{ref.namespace}/{ref.name}/{name}"

        with futures.ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, refs))


def timed_wait(what: str, done: Any, timeout: float, progress: Any = None) -> float | None:
    """Seconds until done() holds, logging progress every 15 s; None, logged, after `timeout`."""
    began = time.perf_counter()

    def report(seconds: float) -> None:
        log(f"  {what}: {seconds:.0f} s, {progress()}")

    if not poll(done, timeout, every=0.1, progress=report if progress else None,
                progress_every=15):
        log(f"{what}: not within {timeout:.0f} s")
        return None
    return time.perf_counter() - began


def save_sample(service: Any, ids: list[str], count: int) -> dict[str, float]:
    """Time the save after a refit on `count` targets: capture under the lock (pickling the
    model and the live state) and the write, as the saver does. Restores their tokens."""
    from forecaster.state import capture

    store = service.state_store
    capture_ms, write_ms = [], []
    for tid in ids[:count]:
        target = service.engine.get(tid)
        began = time.perf_counter()
        with target.lock:
            item = capture(target, with_model=True, clock=time.time)
        middle = time.perf_counter()
        store.write(item)
        capture_ms.append((middle - began) * 1000)
        write_ms.append((time.perf_counter() - middle) * 1000)
    return {"capture_ms_mean": float(np.mean(capture_ms)),
            "capture_ms_p99": float(np.percentile(capture_ms, 99)),
            "write_ms_mean": float(np.mean(write_ms)),
            "write_ms_p99": float(np.percentile(write_ms, 99))}


def disk_usage(state_dir: Path, targets: int) -> dict[str, float]:
    model = sum(p.stat().st_size for p in state_dir.glob("*.model"))
    live = sum(p.stat().st_size for p in state_dir.glob("*.live"))
    return {"model_kb_per_target": model / targets / 1024,
            "live_kb_per_target": live / targets / 1024,
            "total_mb": (model + live) / 2**20}


def first_service(args: argparse.Namespace, url: str, fleet: Fleet, state_dir: Path,
                  figures: dict[str, Any], save_log: SaveLog) -> list[str]:
    """Register and fit every target (or restore them from --keep-state), time a save,
    refresh them all (so each changed since its save) and stop; the target ids."""
    first = make_service(args, url, state_dir)
    began = time.perf_counter()
    first.start()
    ids = register(first, fleet, url, args.model)
    engine = first.engine

    def forecasts() -> int:
        return sum(engine.get(t).snapshot.forecast is not None for t in ids)

    if figures["reused_state"]:
        log(f"reusing the saved state in {state_dir}")
    waited = timed_wait("the first forecasts", lambda: forecasts() == len(ids),
                        args.fit_timeout, lambda: f"{forecasts()} of {len(ids)} forecast")
    took = None if waited is None else time.perf_counter() - began
    figures["first_forecasts_seconds"] = took
    log(f"all {len(ids)} targets forecast {took} s after the start "
        f"({'restored' if figures['reused_state'] else 'first fit'})")
    timed_wait("the saves after the fits", engine.saver.idle, 300)
    figures["rss_mb_first"] = rss_mb()
    figures["disk"] = disk_usage(state_dir, len(ids))
    figures["save_after_refit"] = save_sample(first, ids, min(100, len(ids)))
    log(f"state on disk: {figures['disk']}; save after a refit: "
        f"{figures['save_after_refit']}")
    for tid in ids:  # as the loop does every 30 s: each target changed since its save
        engine.run_refresh(tid)
    unsaved = sum(engine.get(t).unsaved for t in ids)
    began = time.perf_counter()
    first.stop()
    figures["stop_seconds"] = time.perf_counter() - began
    figures["shutdown_unsaved"] = unsaved
    figures["shutdown_saved"] = save_log.saved
    figures["shutdown_left"] = save_log.left
    log(f"stopped in {figures['stop_seconds']:.2f} s; {unsaved} unsaved targets; "
        f"shutdown save {save_log.saved}; {save_log.left or 'none left'}")
    return ids


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-restart-"))
    state_dir = Path(args.keep_state) if args.keep_state else workdir / "state"
    reuse = state_dir.exists() and any(state_dir.glob("*.live"))
    figures: dict[str, Any] = {"targets": args.targets, "model": args.model,
                               "series": args.series, "reused_state": reuse}
    save_log = SaveLog()
    logging.getLogger("forecaster.engine").addHandler(save_log)
    logging.getLogger("forecaster.engine").setLevel(logging.INFO)
    prometheus, fleet = start_prometheus(args, workdir)
    try:
        figures["rss_mb_before"] = rss_mb()
        ids = first_service(args, prometheus.url, fleet, state_dir, figures, save_log)
        gc.collect()
        figures["rss_mb_between"] = rss_mb()

        second = make_service(args, prometheus.url, state_dir)
        started = time.time()
        began = time.perf_counter()
        second.start()
        figures["load_seconds"] = time.perf_counter() - began
        log(f"second service ready (saved state loaded) after {figures['load_seconds']:.2f} s;"
            f" {len(second.engine)} targets")
        figures["rss_mb_loaded"] = rss_mb()
        get = second.engine.get

        def served(tid: str) -> bool:
            snapshot = get(tid).snapshot
            return (snapshot.forecast_made_at is not None and snapshot.forecast_made_at > started
                    and snapshot.current_time is not None and snapshot.current_time > started)

        def count() -> int:
            return sum(served(t) for t in ids)

        took = timed_wait("forecasts after the start", lambda: count() == len(ids),
                          args.fit_timeout, lambda: f"{count()} of {len(ids)}")
        figures["serving_seconds"] = (None if took is None
                                      else took + figures["load_seconds"])
        targets = [get(t) for t in ids]
        figures["restored"] = sum(t.restored for t in targets)
        figures["fits_after_restart"] = sum(t.fits for t in targets)
        figures["rss_mb_serving"] = rss_mb()
        figures["refused"] = {
            reason: second.registry.get_sample_value("forecaster_state_refused_total",
                                                     {"reason": reason})
            for reason in ("version", "corrupt", "server", "limit")
        }
        log(f"every target serves a forecast made after the start, from history read after "
            f"it: {figures['serving_seconds']} s after the start (goal {GOAL_SECONDS:.0f} s; "
            f"first fit of 1,000 auto targets: {FIRST_FIT_BEFORE_SECONDS:.0f} s); "
            f"{figures['restored']} restored, {figures['fits_after_restart']} fits since")
        second.stop()
    finally:
        prometheus.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, default=1000)
    parser.add_argument("--series", type=int, default=100,
                        help="distinct series in Prometheus (targets share them by a factor)")
    parser.add_argument("--model", default="auto")
    parser.add_argument("--fit-workers", type=int, default=2)
    parser.add_argument("--fit-timeout", type=float, default=3600.0)
    parser.add_argument("--keep-state", default=None, metavar="DIR",
                        help="the state directory, kept after the run; a later run with the "
                        "same targets and model starts from it instead of fitting again")
    parser.add_argument("--prometheus-port", type=int, default=None,
                        help=f"Prometheus's port (default: a free one; {KEPT_STATE_PORT} with "
                        "--keep-state, since the saved specs name the server and a target "
                        "on another one is refused)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    figures = run(args)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
