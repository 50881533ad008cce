"""How often an outage forecast leaves capacity short, after random cut points in each trace.

    python bench/bench_outage.py [--cuts 40] [--minutes 30] [--model auto] [--seed 7]

Per sub-daily trace (the targets and evaluation starts of run_backtests.py, 5-minute steps,
5-minute start-up): a backtest with the SLO controller gives the controller's level at each
decision and the share of intervals its plan left short with data. Then, at random cut
points in the evaluated days, the data stop: a model fitted on the 14 days before the cut
predicts the path the service would hold, and every interval of the next `--minutes` is
planned from it as the service plans in an outage (the quantile at 1 + lead steps after
each moment, times exp(level + margin), level being the controller's at the cut). An
interval counts short when its demand exceeds the planned load (no replica rounding, which
would only add capacity). Printed: the share short per quantile at margin 0, per 10-minute
part of the outage, the smallest margin that holds the with-data share, and what that
margin costs (planned load over demand).
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from forecaster.backtest import BacktestConfig, run_backtest  # noqa: E402
from forecaster.models import fit_with_fallback  # noqa: E402
from forecaster.series import known_at_end, read_csv, to_grid  # noqa: E402
from run_backtests import DATA, TRACES, default_model  # noqa: E402

STEP = pd.Timedelta("5min")
STARTUP = pd.Timedelta("5min")
HISTORY = pd.Timedelta(days=14)
QUANTILES = (0.9, 0.95, 0.99)
MARGINS = tuple(round(0.05 * k, 2) for k in range(0, 41))  # log-factor 0 .. 2


def outage_runs(
    trace: str, target: float, eval_start: str, model: str, cuts: int, minutes: int,
    rng: np.random.Generator,
) -> tuple[list[dict[str, np.ndarray]], float]:
    """Per cut: demand, the level at the cut and each quantile's path over the outage; and
    the share of the evaluated intervals the with-data plan left short."""
    grid = to_grid(read_csv(DATA / trace), STEP)
    live = known_at_end(grid)
    config = BacktestConfig(target=target, step=STEP, startup=STARTUP, model=model,
                            eval_start=pd.Timestamp(eval_start))
    decisions = run_backtest(grid, config).simulation.decisions
    known = decisions["demand"].notna()
    with_data = float(np.mean(decisions["demand"][known] > decisions["forecast"][known]))
    lead = config.lead_steps
    steps = minutes * 60 // int(STEP.total_seconds())
    index = grid.demand.index
    # The decision made at the end of t is ready in t + 1 + lead: its level is the one at t.
    level_at = dict(zip(decisions["timestamp"], decisions["slo_level"], strict=True))
    first = int(index.get_loc(pd.Timestamp(eval_start))) - 1 - lead
    last = len(index) - 2 - lead - steps
    history_steps = int(HISTORY / STEP)
    runs = []
    for t in sorted(rng.choice(np.arange(first, last + 1), size=cuts, replace=False)):
        history = live.iloc[max(0, t + 1 - history_steps) : t + 1]
        fit = fit_with_fallback(model, history, STEP, quantile=config.quantile,
                                horizon=1 + lead)
        path = fit.model.predict(steps + lead + 1, QUANTILES)
        # At e steps into the outage the plan covers the interval e + 1 + lead after the cut.
        runs.append({
            "demand": grid.demand.to_numpy()[t + 1 + lead : t + 1 + lead + steps],
            "level": np.array(level_at.get(index[t + 1 + lead], math.nan)),
            **{str(q): path.quantile(q)[lead : lead + steps] for q in QUANTILES},
        })
    return runs, with_data


def short_share(runs: list[dict[str, np.ndarray]], quantile: float, margin: float,
                parts: slice = slice(None)) -> tuple[float, float]:
    """Share of known intervals short, and planned load over demand, at this margin."""
    short = planned = demand = 0.0
    count = 0
    for run in runs:
        level = float(run["level"]) if np.isfinite(run["level"]) else 0.0
        plan = run[str(quantile)][parts] * math.exp(level + margin)
        actual = run["demand"][parts]
        known = np.isfinite(actual)
        short += float(np.sum(actual[known] > plan[known]))
        planned += float(np.sum(plan[known]))
        demand += float(np.sum(actual[known]))
        count += int(known.sum())
    return (short / count if count else math.nan), (planned / demand if demand else math.nan)


def report(name: str, runs: list[dict[str, np.ndarray]], with_data: float | None,
           minutes: int) -> None:
    steps = minutes * 60 // int(STEP.total_seconds())
    third = max(1, steps // 3)
    parts = {f"{k * third * 5}-{(k + 1) * third * 5} min": slice(k * third, (k + 1) * third)
             for k in range(3)}
    print(f"\n{name}: {len(runs)} cuts x {steps} intervals"
          + (f"; with data the plan left {with_data:.1%} short" if with_data is not None else ""))
    for q in QUANTILES:
        share, cost = short_share(runs, q, 0.0)
        by_part = ", ".join(f"{label} {short_share(runs, q, 0.0, s)[0]:.1%}"
                            for label, s in parts.items())
        print(f"  q{q:g} x exp(level): {share:.1%} short ({by_part}); planned/demand {cost:.2f}")
    goal = with_data if with_data is not None else 0.05
    for q in QUANTILES[1:]:
        held = next((m for m in MARGINS if short_share(runs, q, m)[0] <= goal), None)
        if held is None:
            print(f"  q{q:g}: no margin up to {MARGINS[-1]} holds {goal:.1%}")
            continue
        share, cost = short_share(runs, q, held)
        print(f"  q{q:g}: margin {held:.2f} (x{math.exp(held):.2f}) holds {goal:.1%}: "
              f"{share:.1%} short, planned/demand {cost:.2f}")
    for margin in (0.1, 0.2, 0.3):
        share, cost = short_share(runs, 0.95, margin)
        print(f"  q0.95 x exp(level + {margin:g}): {share:.1%} short, planned/demand {cost:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", type=int, default=40, help="cut points per trace")
    parser.add_argument("--minutes", type=int, default=30, help="outage length")
    parser.add_argument("--model", default=None, help="default: the CLI's default")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    model = args.model or default_model()
    rng = np.random.default_rng(args.seed)
    pooled: list[dict[str, np.ndarray]] = []
    shares = []
    for trace, (target, eval_start) in TRACES.items():
        began = time.perf_counter()
        runs, with_data = outage_runs(trace, float(target), eval_start, model, args.cuts,
                                      args.minutes, rng)
        report(f"{Path(trace).stem} ({model}, {time.perf_counter() - began:.0f} s)", runs,
               with_data, args.minutes)
        pooled += runs
        shares.append(with_data)
    report(f"all traces ({model})", pooled, float(np.mean(shares)), args.minutes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
