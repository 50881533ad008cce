"""A capacity model for one forecaster replica, from measured CPU-seconds.

    .venv/bin/python bench/bench_capacity.py [--samples 6] [--refits 3] [--no-prometheus]
        [--front-us 210] [--calls-per-second 0.3] [--cores 2] [--busy 0.5]

CPU-seconds, not wall times: on a shared machine a fit's wall time is whatever the neighbours
leave it, its CPU time is not. Each cost is measured where the service spends it:

- fits, in a spawned worker process (the service's `fit_job` on a live Target's own
  `fit_request`), by `time.process_time` around the fit: a full selection (a first fit, or a
  daily reselection) and warm refits an hour apart that keep it;
- in the engine's process: building the fit request (pickling the model it replaces), taking
  the fitted model back (unpickling it), and folding each refresh in (`Target.fold_in`: the
  model's update and forecast at a new bin, the plan at every refresh);
- the refresh's I/O against a real Prometheus (`read_since_last`: a range query for the new
  bin and an instant query for the current value; every 30 s, 1 in 10 has a new 5-minute bin);
- the front's CPU per GetMetrics call is given (`--front-us`, measured by
  bench_scaler_load.py), at `--calls-per-second` per target (KEDA's polls and HPA reads).

Samples are 14-day windows of the bundled sub-daily traces, each a target of its own id (its
reselection hour is its own). Prints per target per day, targets per core, and where one
replica (`--cores`, busy at most `--busy` of the time) stops being enough.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import multiprocessing  # noqa: E402

import pandas as pd  # noqa: E402

from forecaster.config import EngineSettings  # noqa: E402
from forecaster.fitting import FitRequest, fit_job, pin_math_threads  # noqa: E402
from forecaster.models import FallbackFit  # noqa: E402
from forecaster.refreshing import read_since_last  # noqa: E402
from forecaster.series import read_csv, to_grid  # noqa: E402
from forecaster.spec import TriggerSpec  # noqa: E402
from forecaster.target import Target  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRACES = (
    "aws_elb_request_count_8c0756.csv",
    "nasa_http_1995_requests_per_minute.csv",
    "twitter_volume_aapl.csv",
)
STEP = pd.Timedelta("5min")
DAY = 86_400


class NoSource:
    """A target fed by fold_in here: a source that is never read."""

    def query_range(self, *args: object) -> pd.Series:
        raise AssertionError("not read")

    def query_instant(self, *args: object) -> tuple[object, float]:
        raise AssertionError("not read")


def timed_fit(request: FitRequest) -> tuple[float, FallbackFit]:
    """Runs in the worker: the fit's CPU-seconds in this process, and the fit."""
    began = time.process_time()
    fit = fit_job(request)
    return time.process_time() - began, fit


@dataclass
class Costs:
    """CPU-seconds of each kind of work, one list entry per measurement."""

    selection: list[float]
    refit: list[float]
    request: list[float]  # engine: fit_request (pickles the model replaced)
    landing: list[float]  # engine: unpickle the fitted model, catch up, adopt
    new_bin: list[float]  # engine: fold_in of one new bin (update, forecast, plan)
    no_bin: list[float]  # engine: fold_in of a refresh with no new bin (plan only)
    model_bytes: list[int]


def cpu(work: Callable[[], Any]) -> tuple[float, Any]:
    began = time.process_time()
    result = work()
    return time.process_time() - began, result


def windows(samples: int) -> list[tuple[str, pd.Series, pd.Series]]:
    """`samples` (trace, 14 days of history, the day after) windows: the traces in turn, each
    one a day later than that trace's last (where the trace is long enough)."""
    grids = {name: to_grid(read_csv(ROOT / "data" / name), STEP).demand for name in TRACES}
    out = []
    for k in range(samples):
        name = TRACES[k % len(TRACES)]
        grid = grids[name]
        days = min(14 * 288, len(grid) - 288)
        offset = min(288 * (k // len(TRACES)), len(grid) - days - 288)
        history = grid.iloc[offset : offset + days]
        out.append((name, history, grid.iloc[offset + days : offset + days + 288]))
    return out


def measure_fits(samples: int, refits: int, log: Callable[[str], None]) -> Costs:
    costs = Costs([], [], [], [], [], [], [])
    spec = TriggerSpec(server_address="http://bench.capacity", query="q", target_value=10.0,
                       model="auto")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=pin_math_threads) as pool:
        for k, (name, history, later) in enumerate(windows(samples)):
            target = Target(f"bench/capacity-{k}/{name}", spec, NoSource())  # type: ignore[arg-type]
            last = history.index[-1]
            target.fold_in(history, (last.timestamp(), float(history.iloc[-1])), math.inf)
            fitted = 0
            for hour in range(refits + 1):
                seconds, request = cpu(target.fit_request)
                fit_cpu, fit = pool.submit(timed_fit, request).result()
                data = pickle.dumps(fit.model)  # the worker's reply, as the pool sends it

                def land(data: bytes = data, target: Target = target) -> None:
                    model = pickle.loads(data)
                    target.catch_up(model)
                    target.adopt(model, time.time(), math.inf)

                landing, _ = cpu(land)
                selected = request.previous is None
                (costs.selection if selected else costs.refit).append(fit_cpu)
                if hour > 0:
                    costs.request.append(seconds)
                    costs.landing.append(landing)
                costs.model_bytes.append(len(data))
                log(f"{name} #{k}: {'selection' if selected else 'refit'} {fit_cpu:.2f} CPU-s "
                    f"({fit.model.name}), request {seconds * 1e3:.1f} ms, landing "
                    f"{landing * 1e3:.1f} ms, model {len(data) / 1024:.0f} KB")
                for point in range(12):  # an hour of bins, refreshes without one between
                    fold_hour(target, later.iloc[fitted + point : fitted + point + 1], costs)
                fitted += 12
    return costs


def fold_hour(target: Target, new: pd.Series, costs: Costs) -> None:
    """One refresh that brings a new bin, then two that bring none (nine do in service)."""
    stamp, value = new.index[-1].timestamp(), float(new.iloc[-1])
    spent, _ = cpu(lambda: target.fold_in(new, (stamp, value), math.inf))
    costs.new_bin.append(spent)
    for later in (30.0, 60.0):
        current = (stamp + later, value)
        spent, _ = cpu(partial(target.fold_in, new.iloc[:0], current, math.inf))
        costs.no_bin.append(spent)


def measure_refresh_io(repeat: int, log: Callable[[str], None]) -> tuple[float, float] | None:
    """CPU-seconds in this process of a refresh with one new bin and of one without, read
    from a real Prometheus; None when Prometheus is not installed."""
    sys.path.insert(0, str(ROOT))
    from forecaster.sources.prometheus import PrometheusServerConfig, PrometheusSource
    from tests.support.prometheus import (
        PrometheusServer,
        PrometheusServerError,
        held_each_minute,
        load_trace,
        write_openmetrics,
    )

    now = datetime.now(UTC)
    series = held_each_minute(load_trace(ROOT / "data" / TRACES[0]), now, days=14)
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as work:
        path = Path(work) / "requests.om"
        write_openmetrics(series, "bench_requests", path)
        try:
            server = PrometheusServer([path], workdir=Path(work) / "prometheus")
            server.start()
        except (PrometheusServerError, FileNotFoundError) as exc:
            log(f"no Prometheus, refresh I/O not measured: {exc}")
            return None
        try:
            with PrometheusSource(PrometheusServerConfig(url=server.url)) as source:
                spec = TriggerSpec(server_address=server.url, query="bench_requests",
                                   target_value=10.0, model="naive")
                target = Target("bench/capacity/io", spec, source)
                clock = now.timestamp()
                points, _ = read_since_last(target, clock)  # the first refresh: 14 days
                with_bin, without = [], []
                for _ in range(repeat):
                    trimmed = Target("bench/capacity/io", spec, source)
                    trimmed.buffer.extend(points.iloc[:-1])
                    spent, (new, _) = cpu(partial(read_since_last, trimmed, clock))
                    assert len(new) == 1, len(new)
                    with_bin.append(spent)
                    full = Target("bench/capacity/io", spec, source)
                    full.buffer.extend(points)
                    spent, (new, _) = cpu(partial(read_since_last, full, clock))
                    assert new.empty, len(new)
                    without.append(spent)
        finally:
            server.close()
    return statistics.median(with_bin), statistics.median(without)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=6, help="targets (trace windows)")
    parser.add_argument("--refits", type=int, default=3, help="warm refits per target")
    parser.add_argument("--no-prometheus", action="store_true", help="skip the refresh I/O")
    parser.add_argument("--io-repeat", type=int, default=50)
    parser.add_argument("--front-us", type=float, default=210.0,
                        help="the front's CPU per GetMetrics call, µs (bench_scaler_load.py)")
    parser.add_argument("--calls-per-second", type=float, default=0.3,
                        help="GetMetrics calls per target per second (KEDA's polls, HPA reads)")
    parser.add_argument("--cores", type=float, default=2.0, help="the replica's CPU")
    parser.add_argument("--fit-workers", type=int, default=EngineSettings().fit_workers)
    parser.add_argument("--front-calls", type=float, default=2000.0,
                        help="GetMetrics/s the front serves within its goals (bench_scaler_load)")
    parser.add_argument("--busy", type=float, default=0.5,
                        help="the share of the replica's CPU to plan for (headroom for rounds)")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    pin_math_threads()
    settings = EngineSettings()
    costs = measure_fits(args.samples, args.refits, log)
    io = None if args.no_prometheus else measure_refresh_io(args.io_repeat, log)

    refits_a_day = DAY / settings.refit_seconds
    refreshes_a_day = DAY / settings.refresh_seconds
    bins_a_day = DAY / STEP.total_seconds()
    med = statistics.median
    selection, refit = med(costs.selection), med(costs.refit)
    engine_fit = med(costs.request) + med(costs.landing)
    day = {
        "reselection (workers)": selection,
        f"refits (workers, {refits_a_day - 1:.0f} a day)": (refits_a_day - 1) * refit,
        "fit requests and landings (engine)": refits_a_day * engine_fit,
        "new bins folded in (engine)": bins_a_day * med(costs.new_bin),
        "refreshes without a bin (engine)": (refreshes_a_day - bins_a_day) * med(costs.no_bin),
    }
    if io is not None:
        day["refresh I/O (engine)"] = bins_a_day * io[0] + (refreshes_a_day - bins_a_day) * io[1]
    calls = args.calls_per_second * DAY
    day[f"GetMetrics (front, {args.front_us:.0f} µs)"] = calls * args.front_us * 1e-6
    total = sum(day.values())

    print(f"{len(costs.selection)} selections, {len(costs.refit)} warm refits on "
          f"{args.samples} targets (14 days of 5-minute history, auto, share 0.05)")
    print(f"selection {selection:.2f} CPU-s (min {min(costs.selection):.2f}, max "
          f"{max(costs.selection):.2f}); warm refit {refit:.3f} (min {min(costs.refit):.3f}, "
          f"max {max(costs.refit):.3f}); model {med(costs.model_bytes) / 1024:.0f} KB")
    print(f"engine: request {med(costs.request) * 1e3:.2f} ms, landing "
          f"{med(costs.landing) * 1e3:.2f} ms, new bin {med(costs.new_bin) * 1e3:.2f} ms, "
          f"refresh without a bin {med(costs.no_bin) * 1e3:.3f} ms")
    if io is not None:
        print(f"refresh I/O: {io[0] * 1e3:.2f} ms with a new bin, {io[1] * 1e3:.2f} ms without")
    print(f"\nCPU-seconds per target per day (refitInterval {settings.refit_seconds:.0f} s, "
          f"refreshInterval {settings.refresh_seconds:.0f} s, "
          f"{args.calls_per_second} calls/s):")
    for label, seconds in day.items():
        print(f"  {label:<42} {seconds:8.1f}  ({seconds / total:5.1%})")
    print(f"  {'total':<42} {total:8.1f}")
    per_core = DAY / total
    print(f"\ntargets per core, fully busy: {per_core:,.0f}; at {args.busy:.0%} busy: "
          f"{per_core * args.busy:,.0f}")
    engine = sum(v for k, v in day.items() if "(engine)" in k)
    round_cpu = refit + selection / refits_a_day  # the day's reselections over its rounds
    limits = {
        f"the replica's CPU ({args.cores:g} cores)": per_core * args.cores * args.busy,
        "the engine's process (one core, one GIL)": DAY * args.busy / engine,
        f"a refit round within refitInterval ({args.fit_workers} fit workers)":
            settings.refit_seconds * args.fit_workers * args.busy / round_cpu,
        f"the front ({args.front_calls:,.0f} calls/s, its measured goal)":
            args.front_calls / args.calls_per_second,
    }
    print(f"where one replica stops being enough, each part at most {args.busy:.0%} busy:")
    for label, targets in limits.items():
        print(f"  {label:<58} {targets:8,.0f} targets")
    print(f"a refit round's worker CPU per target: {round_cpu:.2f} s; "
          f"a first fit (history aside) of N targets takes N x {selection:.2f} s / "
          f"{args.fit_workers} workers: {1000 * selection / args.fit_workers / 60:.0f} min "
          f"for 1,000")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
