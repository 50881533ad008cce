"""Fit and per-step costs of every registered model on 14 days of 5-minute history.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/bench_models.py \
        [trace.csv] [--models a,b] [--share S] [--target T]

Prints, per model: fit seconds and fit CPU seconds (medians of 3), and the mean seconds of
one update (one new point) plus one predict(2, [0.1, 0.9]). For `auto`, "fit" is a full
selection (a first fit) and the extra row `auto (warm refit)` is a refit that keeps the
selection, as hourly refits do; with --share, auto ranks its candidates as a target with
that maxUnderProvisioned does (a ShareScorer, `target` per replica, one step of lead).
Budget (the forecast-quality issue): 1,000 targets on 2 processes, hourly refits within
10 minutes (<= ~1 s, aim < 0.3 s per refit) and a full reselection within 2 hours (<= ~7 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import pandas as pd  # noqa: E402

from forecaster.models import MODEL_FACTORIES, ForecastModel, make_model  # noqa: E402
from forecaster.models.selection import PlanScorer  # noqa: E402
from forecaster.policy import ScalingPolicy  # noqa: E402
from forecaster.series import read_csv, to_grid  # noqa: E402
from forecaster.slo import ShareScorer  # noqa: E402

STEP = pd.Timedelta("5min")
HISTORY = pd.Timedelta(days=14)
DEFAULT_TRACE = Path(__file__).resolve().parent.parent / "data" / "twitter_volume_aapl.csv"
STEPS_TIMED = 288


def _timed_fit(
    name: str, history: pd.Series, scorer: PlanScorer | None,
    previous: ForecastModel | None = None,
) -> tuple[float, float]:
    model = make_model(name, STEP, scorer=scorer)
    if previous is not None:
        model.warm_start(previous)
    began, cpu = time.perf_counter(), time.process_time()
    model.fit(history)
    return time.perf_counter() - began, time.process_time() - cpu


def bench(
    name: str, history: pd.Series, later: pd.Series, scorer: PlanScorer | None
) -> list[tuple[str, float, float, float]]:
    fits = [_timed_fit(name, history, scorer) for _ in range(3)]
    model = make_model(name, STEP, scorer=scorer).fit(history)
    began = time.perf_counter()
    for k in range(STEPS_TIMED):
        model.update(later.iloc[k : k + 1])
        model.predict(2, [0.1, 0.9])
    per_step = (time.perf_counter() - began) / STEPS_TIMED
    rows = [(name, *_medians(fits), per_step)]
    if name == "auto":
        refit = pd.concat([history.iloc[12:], later.iloc[:12]])  # an hour later
        warm = [_timed_fit(name, refit, scorer, previous=model) for _ in range(3)]
        rows.append(("auto (warm refit)", *_medians(warm), per_step))
    return rows


def _medians(timings: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(t for t, _ in timings), statistics.median(c for _, c in timings)


def main(argv: list[str]) -> int:
    from threadpoolctl import threadpool_limits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--models", default=",".join(sorted(MODEL_FACTORIES)))
    parser.add_argument("--share", type=float, default=None,
                        help="maxUnderProvisioned auto ranks its candidates for (default none)")
    parser.add_argument("--target", type=float, default=10.0, help="load per replica")
    args = parser.parse_args(argv)
    threadpool_limits(limits=1)
    scorer = (
        ShareScorer(args.share, ScalingPolicy(target_per_replica=args.target), lead_steps=1)
        if args.share is not None else None
    )
    grid = to_grid(read_csv(args.trace), STEP).filled
    steps = int(HISTORY / STEP)
    history, later = grid.iloc[:steps], grid.iloc[steps : steps + STEPS_TIMED]
    minutes = int(STEP.total_seconds() // 60)
    print(f"{args.trace.name}: {len(history)} steps ({HISTORY.days} days of {minutes}-minute "
          f"steps), share {args.share}")
    print(f"{'model':<22} {'fit s':>8} {'fit CPU s':>10} {'update+predict ms':>18}")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        for label, fit, cpu, per_step in bench(name, history, later, scorer):
            print(f"{label:<22} {fit:>8.3f} {cpu:>10.3f} {per_step * 1000:>18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
