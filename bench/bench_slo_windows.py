"""The share the SLO controller holds in rolling 4-day windows one day apart, per trace.

    python bench/bench_slo_windows.py [--windows 13] [--share 0.05] [--model auto]

Each window is a full `forecaster backtest` (six days of calibration before it) whose
evaluation starts one day before the previous one's, back from each trace's last 4 days; a
window that leaves too little history to fit on is skipped. Prints one row per window: asked
and achieved share, unserved share and replica-hours over the oracle's, as run.
"""

from __future__ import annotations

import argparse
import os
import sys

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import pandas as pd  # noqa: E402

from forecaster.backtest import BacktestConfig, run_backtest  # noqa: E402
from forecaster.errors import ForecasterError  # noqa: E402
from forecaster.series import read_csv, to_grid  # noqa: E402
from run_backtests import DATA, TRACES  # noqa: E402  (bench/ is on the path when run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=13)
    parser.add_argument("--share", type=float, default=0.05)
    parser.add_argument("--model", default="auto")
    args = parser.parse_args(argv)
    print(f"{'trace':<36} {'eval start':<17} {'asked':>6} {'achieved':>8} {'unserved':>8} "
          f"{'rh/oracle':>9}", flush=True)
    for trace, (target, last_start) in TRACES.items():
        grid = to_grid(read_csv(DATA / trace), pd.Timedelta("5min"))
        for k in range(args.windows):
            start = pd.Timestamp(last_start) - pd.Timedelta(days=k)
            config = BacktestConfig(
                target=float(target), eval_start=start, model=args.model,
                max_under_provisioned=args.share,
            )
            try:
                result = run_backtest(grid, config, name=trace)
            except ForecasterError as exc:
                print(f"{trace[:36]:<36} {start:%Y-%m-%dT%H:%M} skipped: {exc}", flush=True)
                continue
            p = result.summary["policies"]["predictive"]
            print(
                f"{trace[:36]:<36} {start:%Y-%m-%dT%H:%M} {args.share:>6.1%} "
                f"{p['under_provisioned_share']:>8.2%} {p['unserved_share']:>8.2%} "
                f"{p['replica_hours_vs_oracle']:>9.2f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
