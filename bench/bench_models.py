"""Fit and per-step costs of every registered model on 14 days of 5-minute history.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/bench_models.py [trace.csv]

Prints, per model: fit seconds (median of 3), and the mean seconds of one update (one new
point) plus one predict(2, [0.1, 0.9]). For `auto`, "fit" is a full selection and the
extra row `auto (warm refit)` is a refit that keeps the selection, as hourly refits do.
Budget (the forecast-quality issue): 1,000 targets on 2 processes, hourly refits within
10 minutes (<= ~1 s, aim < 0.3 s per refit) and a full reselection within 2 hours (<= ~7 s).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import pandas as pd  # noqa: E402

from forecaster.models import MODEL_FACTORIES, ForecastModel, make_model  # noqa: E402
from forecaster.series import read_csv, to_grid  # noqa: E402

STEP = pd.Timedelta("5min")
HISTORY = pd.Timedelta(days=14)
DEFAULT_TRACE = Path(__file__).resolve().parent.parent / "data" / "twitter_volume_aapl.csv"
STEPS_TIMED = 288


def _timed_fit(name: str, history: pd.Series, previous: ForecastModel | None = None) -> float:
    model = make_model(name, STEP)
    if previous is not None:
        model.warm_start(previous)
    began = time.perf_counter()
    model.fit(history)
    return time.perf_counter() - began


def bench(name: str, history: pd.Series, later: pd.Series) -> list[tuple[str, float, float]]:
    fits = [_timed_fit(name, history) for _ in range(3)]
    model = make_model(name, STEP).fit(history)
    began = time.perf_counter()
    for k in range(STEPS_TIMED):
        model.update(later.iloc[k : k + 1])
        model.predict(2, [0.1, 0.9])
    per_step = (time.perf_counter() - began) / STEPS_TIMED
    rows = [(name, statistics.median(fits), per_step)]
    if name == "auto":
        refit = pd.concat([history.iloc[12:], later.iloc[:12]])  # an hour later
        warm = [_timed_fit(name, refit, previous=model) for _ in range(3)]
        rows.append(("auto (warm refit)", statistics.median(warm), per_step))
    return rows


def main(argv: list[str]) -> int:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    path = Path(argv[0]) if argv else DEFAULT_TRACE
    grid = to_grid(read_csv(path), STEP).filled
    steps = int(HISTORY / STEP)
    history, later = grid.iloc[:steps], grid.iloc[steps : steps + STEPS_TIMED]
    minutes = int(STEP.total_seconds() // 60)
    print(f"{path.name}: {len(history)} steps ({HISTORY.days} days of {minutes}-minute steps)")
    print(f"{'model':<22} {'fit s':>8} {'update+predict ms':>18}")
    for name in sorted(MODEL_FACTORIES):
        for label, fit, per_step in bench(name, history, later):
            print(f"{label:<22} {fit:>8.3f} {per_step * 1000:>18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
