"""The share the SLO controller holds in rolling 4-day windows one day apart, per trace.

    python bench/bench_slo_windows.py [--windows 13] [--share 0.05] [--model auto] [--separate]

By default each trace is one continuous backtest (six days of calibration before it, as
`make backtest`), from the first window's start to the end of the last 4 days, and each
window is scored on its slice of the decisions: the controller calibrates once, before the
first window, and every later window inherits its level and the models their selections,
as in a service that has been running. `--separate` runs one full backtest per window
instead, each calibrated on the six days before its own start: that is 13 times the work,
and each window starts from a level fitted to the days just before it. Windows start one
day apart, back from each trace's last 4 days; one that leaves less than a day of history
before it is left out. Prints one row per window: asked and achieved share, unserved share
and replica-hours over the oracle's, as run, then the worst window per trace.
"""

from __future__ import annotations

import argparse
import os
import sys

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from forecaster.backtest import BacktestConfig, run_backtest  # noqa: E402
from forecaster.backtest.scoring import PolicyScore, score_policy  # noqa: E402
from forecaster.errors import ForecasterError  # noqa: E402
from forecaster.series import RegularSeries, read_csv, to_grid  # noqa: E402
from run_backtests import DATA, TRACES  # noqa: E402  (bench/ is on the path when run)

STEP = pd.Timedelta("5min")
WINDOW = pd.Timedelta(days=4)
MIN_HISTORY = pd.Timedelta(days=1)


def window_starts(
    grid: RegularSeries, last_start: pd.Timestamp, windows: int
) -> list[pd.Timestamp]:
    """Window starts one day apart back from `last_start`, oldest first, each with at least
    MIN_HISTORY of the trace before it."""
    first = grid.demand.index[0] + MIN_HISTORY
    starts = [last_start - pd.Timedelta(days=k) for k in range(windows)]
    return sorted(start for start in starts if start >= first)


def scored(decisions: pd.DataFrame, target: float, start: pd.Timestamp) -> PolicyScore:
    """The predictive policy over the 4 days of decisions ready from `start`, scored as
    run_backtest scores a whole run."""
    ready = decisions["timestamp"]
    window = decisions[(ready >= start) & (ready < start + WINDOW)]
    window = window[window["demand"].notna()]
    return score_policy(
        window["forecast"].ffill().to_numpy(), window["replicas"].to_numpy(),
        window["demand"].to_numpy(), window["oracle_replicas"].to_numpy(), target,
        STEP / pd.Timedelta(hours=1),
    )


def row(trace: str, start: pd.Timestamp, share: float, score: PolicyScore) -> str:
    return (
        f"{trace[:36]:<36} {start:%Y-%m-%dT%H:%M} {share:>6.1%} "
        f"{score.under_provisioned_share:>8.2%} {score.unserved_share:>8.2%} "
        f"{score.replica_hours_vs_oracle:>9.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=13)
    parser.add_argument("--share", type=float, default=0.05)
    parser.add_argument("--model", default="auto")
    parser.add_argument("--separate", action="store_true",
                        help="one backtest per window, each calibrated before its own start")
    args = parser.parse_args(argv)
    print(f"{'trace':<36} {'eval start':<17} {'asked':>6} {'achieved':>8} {'unserved':>8} "
          f"{'rh/oracle':>9}", flush=True)
    worst: list[str] = []
    for trace, (target, last_start) in TRACES.items():
        grid = to_grid(read_csv(DATA / trace), STEP)
        starts = window_starts(grid, pd.Timestamp(last_start), args.windows)
        scores: list[PolicyScore] = []
        if not args.separate:
            config = BacktestConfig(
                target=float(target), eval_start=starts[0], model=args.model,
                max_under_provisioned=args.share,
            )
            decisions = run_backtest(grid, config, name=trace).simulation.decisions
        for start in starts:
            if args.separate:
                config = BacktestConfig(
                    target=float(target), eval_start=start, model=args.model,
                    max_under_provisioned=args.share,
                )
                try:
                    decisions = run_backtest(grid, config, name=trace).simulation.decisions
                except ForecasterError as exc:
                    print(f"{trace[:36]:<36} {start:%Y-%m-%dT%H:%M} skipped: {exc}", flush=True)
                    continue
            score = scored(decisions, float(target), start)
            scores.append(score)
            print(row(trace, start, args.share, score), flush=True)
        if scores:
            off = np.array([abs(s.under_provisioned_share - args.share) for s in scores])
            far = scores[int(off.argmax())]
            worst.append(
                f"{trace[:36]:<36} {len(scores):>2} windows: achieved "
                f"{min(s.under_provisioned_share for s in scores):.2%} to "
                f"{max(s.under_provisioned_share for s in scores):.2%} (furthest "
                f"{far.under_provisioned_share - args.share:+.2%}), rh/oracle mean "
                f"{np.mean([s.replica_hours_vs_oracle for s in scores]):.2f}"
            )
    print()
    print("\n".join(worst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
