"""What one target costs in memory, measured, beside the estimate that admits it.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/bench_target_memory.py \
        [--model auto] [--cases 300:4032,60:50000:3600,...] [--startup 300] [--outage 30m]
        [--no-trace]

A case's outageHorizon is --outage (default 30m) unless it names its own:
step:points:startup:outage.

Each case (step seconds : history points [: startupSeconds, else --startup]) runs in a fresh
process, as a fit worker would:
the model's libraries are loaded and a small fit of the same model and step is made first, so
that only the fit's own working set is counted. It then prints

- the fit's seconds and its RSS growth: the peak (VmHWM, reset through /proc/self/clear_refs
  before the fit) above the RSS before it;
- the peak of the Python and numpy allocations tracemalloc sees during a second fit;
- what the engine keeps for the target once fitted and three days of points later, when the
  model's calibration windows are full (tracemalloc, in the same process): the grid buffer,
  the model as it came back from the worker and has scored its forecasts since, the
  published forecast, and the outage path; and the peak on the way (unpickling the model,
  the forecasts predicted at each refresh, and the outage path);
- the estimate `forecaster.spec.memory_estimate` gives for the same trigger, which must not
  be below the measured total (the fit's peak and the engine's peak).

The series is synthetic: a daily and a weekly wave with noise, never negative.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import time
import tracemalloc
from dataclasses import replace

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import repo  # noqa: E402, F401  (puts the repository's root on sys.path)
from forecaster.durations import format_duration, parse_duration  # noqa: E402
from forecaster.spec import CALIBRATION_SECONDS, TriggerSpec, memory_estimate  # noqa: E402

DEFAULT_CASES = ("300:2016,300:4032,300:25920,300:4032:21600,60:10080,60:50000,60:10080:3600,"
                 "10:2000,10:2000:3600,10:20000")
MIB = 2**20


def synthetic(points: int, step: int, seed: int = 1) -> np.ndarray:
    seconds = np.arange(points) * step
    noise = np.random.default_rng(seed).normal(0, 5, points)
    wave = 100 + 50 * np.sin(2 * np.pi * seconds / 86_400) + 20 * np.sin(
        2 * np.pi * seconds / (7 * 86_400))
    return np.maximum(wave + noise, 0.0)


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")  # resets VmHWM to the current RSS (Linux 4.0 and later)


def spec_for(model: str, step: int, points: int, startup: int, outage: int) -> TriggerSpec:
    return TriggerSpec(server_address="http://bench:9090", query="bench", target_value=10.0,
                       model=model, step_seconds=step, history_window_seconds=points * step,
                       startup_seconds=startup, outage_horizon_seconds=outage)


def measure_one(model: str, step: int, points: int, startup: int, outage: int,
                trace: bool) -> dict[str, float]:
    """In a fresh process: one fit's working set, and what the engine keeps for the target."""
    from forecaster.config import EngineSettings
    from forecaster.fitting import FitRequest, fit_job, release_free_memory
    from forecaster.models import Forecast
    from forecaster.target import Outage, Target, freshness_limit, outage_path

    spec = spec_for(model, step, points, startup, outage)
    values = synthetic(points, step)
    start = pd.Timestamp("2026-01-05", tz="UTC")
    lead = -(-startup // step)

    def request(count: int) -> FitRequest:
        return FitRequest(model=model, step_seconds=step, start=start, values=values[:count],
                          quantile=spec.quantile, horizon=1 + lead, previous=None)

    # A warm worker: the libraries loaded and their caches filled by the same fit once, and
    # the memory it freed handed back, so that the fit measured counts only its own.
    fit_job(request(points))
    release_free_memory()
    before = rss_bytes()
    reset_peak_rss()
    began = time.perf_counter()
    fit = fit_job(request(points))
    seconds = time.perf_counter() - began
    rss_growth = peak_rss_bytes() - before
    traced_peak = 0
    if trace:
        tracemalloc.start()
        fit_job(request(points))
        traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    returned = pickle.dumps(fit.model)

    # What the engine keeps: the target fed its whole window, its model adopted and a
    # forecast published, then an outage path taken (the longest forecast a target keeps).
    settings = EngineSettings()
    freshness = freshness_limit(settings, spec)
    index = pd.date_range(start, periods=points, freq=pd.Timedelta(seconds=step))
    now = index[-1].timestamp() + step
    # Between fits the model keeps scoring its forecasts as points arrive: the calibration
    # window's worth of points (3 days) is fed in hourly refreshes, so its score windows are
    # as full as in service, before the outage path is predicted from it.
    more = CALIBRATION_SECONDS // step
    later = synthetic(points + more, step)[points:]
    hour = max(1, 3_600 // step)

    def keep() -> tuple[Target, Forecast]:
        target = Target("bench/bench/fc", spec, source=None)  # type: ignore[arg-type]
        later_now = now
        with target.lock:
            target.fold_in(pd.Series(values, index=index), (now, float(values[-1])), freshness)
            kept_model = pickle.loads(returned)
            target.adopt(kept_model, now, freshness)
            for first in range(0, more, hour):
                chunk = later[first:first + hour]
                stamps = index[-1] + (first + 1 + np.arange(len(chunk))) * index.freq
                later_now = stamps[-1].timestamp() + step
                target.fold_in(pd.Series(chunk, index=stamps), (later_now, float(chunk[-1])),
                               freshness)
            path = outage_path(target, kept_model, later_now, freshness)
            target.snapshot = replace(target.snapshot, outage=Outage(later_now, path, 0.95))
        return target, path

    # Once unmeasured, so that what the process builds once (the inputs' pandas caches, the
    # libraries' own) is not counted as the target's.
    keep()
    tracemalloc.start()
    before_kept = tracemalloc.get_traced_memory()[0]
    target, path = keep()
    kept, engine_peak = (traced - before_kept for traced in tracemalloc.get_traced_memory())
    tracemalloc.stop()
    request_bytes = len(pickle.dumps(target.fit_request()))
    return {
        "model": model, "chosen": getattr(getattr(fit.model, "selection_", None), "chosen",
                                          fit.model.name),
        "step": step, "points": points, "startup": startup, "outage": outage,
        "seconds": round(seconds, 1),
        "fit_rss_growth": rss_growth, "fit_traced_peak": traced_peak,
        "kept": kept, "engine_peak": engine_peak, "model_pickle": len(returned),
        "fit_request": request_bytes, "outage_steps": path.horizon,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="auto")
    parser.add_argument("--cases", default=DEFAULT_CASES,
                        help="step seconds:history points[:startupSeconds], comma-separated")
    parser.add_argument("--startup", type=int, default=300, help="startupSeconds")
    parser.add_argument("--outage", default="30m", help="outageHorizon")
    parser.add_argument("--no-trace", action="store_true",
                        help="skip the traced second fit (tracemalloc slows a fit 3 to 5 times)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    outage = parse_duration(args.outage, "outage")
    if args.one:
        step, points, startup, outage = (int(part) for part in args.one.split(":"))
        print(json.dumps(measure_one(args.model, step, points, startup, outage,
                                     not args.no_trace)))
        return 0
    print(f"model {args.model}; MiB")
    print(f"{'step':>5} {'points':>7} {'history':>8} {'startup':>7} {'outage':>6} {'fit s':>7} "
          f"{'fit RSS':>8} {'traced':>7} {'kept':>6} {'peak':>6} {'model':>6} {'total':>7} "
          f"{'estimate':>8}  chosen")
    worst = 0.0
    for case in args.cases.split(","):
        parts = case.split(":")
        if len(parts) < 3:
            parts.append(str(args.startup))
        parts.append(str(parse_duration(parts[3], "outage") if len(parts) > 3 else outage))
        command = [sys.executable, __file__, "--one", ":".join(parts[:3] + parts[-1:]),
                   "--model", args.model]
        if args.no_trace:
            command.append("--no-trace")
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False,
                                  timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{case}: no result within {args.timeout:.0f}s")
            continue
        if done.returncode != 0:
            print(f"{case}: failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["estimate"] = memory_estimate(spec_for(
            args.model, row["step"], row["points"], row["startup"], row["outage"])).total
        fit_peak = max(row["fit_rss_growth"], row["fit_traced_peak"])
        total = fit_peak + row["engine_peak"]
        worst = max(worst, total / row["estimate"])
        history = format_duration(row["step"] * row["points"])
        print(f"{row['step']:>5} {row['points']:>7} {history:>8} {row['startup']:>7} "
              f"{format_duration(row['outage']):>6} {row['seconds']:>7} "
              f"{row['fit_rss_growth'] / MIB:>8.1f} {row['fit_traced_peak'] / MIB:>7.1f} "
              f"{row['kept'] / MIB:>6.2f} {row['engine_peak'] / MIB:>6.2f} "
              f"{row['model_pickle'] / MIB:>6.2f} "
              f"{total / MIB:>7.1f} {row['estimate'] / MIB:>8.1f}  {row['chosen']}")
    print(f"largest measured total / estimate: {worst:.2f} (must stay below 1)")
    return 0 if worst < 1 else 1


if __name__ == "__main__":
    sys.exit(main())
