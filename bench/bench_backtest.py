"""Time the backtest of a 14-day, 5-minute trace with hourly refits, for every registered model.

    python bench/bench_backtest.py [--models a,b] [--eval-days 4] [--refit 1h]

Per model: wall time of the whole backtest (simulation and scoring, no files), the number of
refits, the mean and largest fit time the simulation recorded, the time of one standalone fit
on all 14 days, and the predictive policy's cost to hold the SLO and the MASE.
"""

from __future__ import annotations

import os

# Before numpy is imported: one BLAS/OpenMP thread (see forecaster.fitting.pin_math_threads).
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from forecaster.backtest import BacktestConfig, run_backtest  # noqa: E402
from forecaster.durations import format_duration  # noqa: E402
from forecaster.errors import ForecasterError  # noqa: E402
from forecaster.models import MODEL_FACTORIES, fit_with_fallback  # noqa: E402
from forecaster.series import read_csv, to_grid  # noqa: E402

TRACE = Path(__file__).resolve().parent.parent / "data" / "aws_elb_request_count_8c0756.csv"
TARGET = 16.70  # the per-replica target bench/run_backtests.py uses for this trace
STEP = pd.Timedelta("5min")


def _cost(value: Any) -> str:
    return "unreachable" if value is None else f"{value:.3f}"


def bench_model(grid: Any, name: str, eval_days: float, refit: pd.Timedelta) -> dict[str, Any]:
    config = BacktestConfig(target=TARGET, step=STEP, eval_days=eval_days, refit=refit, model=name)
    began = time.perf_counter()
    result = run_backtest(grid, config, name=TRACE.stem)
    wall = time.perf_counter() - began
    fits = result.simulation.fit_seconds
    began = time.perf_counter()
    full = fit_with_fallback(name, grid.filled, STEP)
    standalone = time.perf_counter() - began
    predictive = result.summary["policies"]["predictive"]
    return {
        "model": name,
        "wall": wall,
        "refits": result.summary["refits"],
        "fit_mean": float(np.mean(fits)),
        "fit_max": float(np.max(fits)),
        "standalone": standalone,
        "standalone_model": full.model.name,
        "standalone_failures": full.failures,
        "fallbacks": sum(result.summary["fallback_fits"].values()),
        "cost5": predictive["cost_to_hold_slo"]["5%"],
        "cost1": predictive["cost_to_hold_slo"]["1%"],
        "mase": result.summary["forecast"]["mase"],
        "intervals": result.summary["intervals"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODEL_FACTORIES),
                        help="comma-separated registry names (default: all)")
    parser.add_argument("--eval-days", type=float, default=4.0)
    parser.add_argument("--refit", default="1h")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODEL_FACTORIES]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODEL_FACTORIES)}")

    raw = read_csv(TRACE)
    grid = to_grid(raw, STEP)
    days = (grid.demand.index[-1] + STEP - grid.demand.index[0]) / pd.Timedelta(days=1)
    print(
        f"trace {TRACE.name}: {len(raw)} points, {len(grid.demand)} steps of "
        f"{format_duration(int(STEP.total_seconds()))} "
        f"({days:.1f} days); eval window {args.eval_days:g} days, refit every {args.refit}, "
        f"target {TARGET}"
    )
    header = (
        f"{'model':<22} {'backtest s':>10} {'refits':>6} {'fit mean s':>10} {'fit max s':>9} "
        f"{'14d fit s':>9} {'fallbacks':>9} {'cost@5%':>11} {'cost@1%':>11} {'MASE':>6}"
    )
    print(header)
    print("-" * len(header))
    failed = []
    total = time.perf_counter()
    for name in models:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                row = bench_model(grid, name, args.eval_days, pd.Timedelta(args.refit))
        except ForecasterError as exc:
            failed.append(name)
            print(f"{name:<22} failed: {exc}")
            continue
        mase = "n/a" if row["mase"] is None else f"{row['mase']:.3f}"
        print(
            f"{name:<22} {row['wall']:>10.2f} {row['refits']:>6} {row['fit_mean']:>10.4f} "
            f"{row['fit_max']:>9.4f} {row['standalone']:>9.4f} {row['fallbacks']:>9} "
            f"{_cost(row['cost5']):>11} {_cost(row['cost1']):>11} {mase:>6}",
            flush=True,
        )
        for failed_model, why in row["standalone_failures"]:
            print(f"{'':<22} standalone fit: {failed_model} failed ({why[:80]}), fell back")
        if not row["standalone_failures"] and row["standalone_model"] != name:
            print(f"{'':<22} note: the fitted model calls itself {row['standalone_model']!r}, "
                  "so the backtest counts every fit as a fallback")
        kinds = sorted({f"{w.category.__name__}: {w.message}"[:110] for w in caught})
        for kind in kinds:
            print(f"{'':<22} warning: {kind}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\ntotal {time.perf_counter() - total:.1f} s for {len(models)} model(s); "
          f"load average now {load} on {os.cpu_count()} CPUs (wall times grow with it)")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
