"""What a level on a backtest's own plans could cost at best, were it chosen in hindsight.

    python bench/slo_bounds.py [RUN_DIR ...] [--share S]

Reads the folders `forecaster backtest` writes (default: out/backtest/*, what `make backtest`
leaves) of runs under a share. Each decision's plan before the level is its served load over
exp(slo_level); the replicas are the HPA arithmetic's (forecaster.policy) with the run's
target, stabilization and bounds. Prints, per run, in replica-hours over the oracle's:

- as run: the replicas column, and the share it held;
- fixed: the lowest factor on every plan that holds the share over the run, in hindsight;
- a level per day, per 6 hours, per hour: one level for each block, chosen in hindsight with
  the share held over the whole run, not in each block (exact on a grid of levels 0.0025 apart,
  each block's replicas as the HPA gives them at its level over the whole run);
- a level per 6-hour slot of the day, the same slot alike on every day.

A controller learns its level from what it has seen, so none of it can beat the bound of its
own time resolution on these plans: cheaper than that needs better plans. The last column
divides by what the best hand-tuned statsforecast baseline costs to hold 5% on each bundled
trace's last 4 days, in hindsight (README.md, "`forecaster backtest`").
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from forecaster.policy import ScalingPolicy, hpa_replay

ROOT = Path(__file__).resolve().parent.parent
LEVELS = np.round(np.arange(-1.5, 3.0 + 1e-9, 0.0025), 4)
BLOCKS = (("per day", pd.Timedelta(days=1)), ("per 6h", pd.Timedelta(hours=6)),
          ("per 1h", pd.Timedelta(hours=1)))
SLOT = pd.Timedelta(hours=6)
BASELINE_AT_5 = {  # the best hand-tuned baseline's cost@5%, each trace's last 4 days
    "aws_elb_request_count_8c0756": 2.42,
    "nasa_http_1995_requests_per_minute": 1.26,
    "twitter_volume_aapl": 1.90,
}


class Run:
    """One backtest's plans, demand and HPA settings, and its replicas at every grid level."""

    def __init__(self, folder: Path) -> None:
        self.summary = json.loads((folder / "summary.json").read_text())
        rows = pd.read_csv(folder / "decisions.csv", parse_dates=["timestamp"])
        if rows["slo_level"].isna().all():
            raise SystemExit(f"{folder}: ran a fixed quantile; no level to bound")
        self.name = str(self.summary["trace"])
        self.target = float(self.summary["target"])
        step = float(self.summary["step_seconds"])
        self.policy = ScalingPolicy(
            target_per_replica=self.target,
            min_replicas=int(self.summary.get("min_replicas", 1)),
            max_replicas=self.summary.get("max_replicas"),
            stabilization_steps=max(
                1, math.ceil(float(self.summary.get("stabilization_seconds", 300)) / step)
            ),
        )
        self.times = pd.DatetimeIndex(rows["timestamp"])
        self.plans = (rows["forecast"] / np.exp(rows["slo_level"])).to_numpy()
        self.demand = rows["demand"].to_numpy()
        self.judged = np.isfinite(self.demand)
        self.as_run = rows["replicas"].to_numpy(dtype=float)
        self.oracle = float(np.nansum(rows["oracle_replicas"].to_numpy(dtype=float)))
        self.replicas = np.array(
            [hpa_replay(self.plans * math.exp(level), self.policy) for level in LEVELS],
            dtype=float,
        )  # (levels, intervals)
        self.short = (self.demand[None, :] > self.replicas * self.target) & self.judged

    def score(self, replicas: np.ndarray) -> tuple[float, float]:
        """(share of judged intervals short, replica-hours over the oracle's)."""
        short = (self.demand > replicas * self.target) & self.judged
        return short.sum() / self.judged.sum(), float(np.nansum(replicas)) / self.oracle

    def fixed(self, share: float) -> tuple[float, float]:
        """The lowest grid level whose replicas hold `share` over the run."""
        allowed = math.floor(share * self.judged.sum())
        for k in range(len(LEVELS)):
            if self.short[k].sum() <= allowed:
                return self.score(self.replicas[k])
        return math.nan, math.nan

    def per_block(self, labels: np.ndarray, share: float) -> tuple[float, float]:
        """A grid level per label (a block of time), the fewest replica-hours with at most
        `share` of the run short: a knapsack over the blocks on their misses."""
        allowed = math.floor(share * self.judged.sum())
        best = np.zeros(allowed + 1)  # replica-hours so far with at most m misses
        for label in np.unique(labels):
            mask = labels == label
            misses = self.short[:, mask].sum(axis=1)
            cost = np.nansum(self.replicas[:, mask], axis=1)
            after = np.full(allowed + 1, np.inf)
            for m_block, c_block in zip(misses, cost, strict=True):
                if m_block > allowed:
                    continue
                shifted = np.full(allowed + 1, np.inf)
                shifted[m_block:] = best[: allowed + 1 - m_block] + c_block
                after = np.minimum(after, shifted)
            best = after
        short = float(np.argmin(best)) if np.isfinite(best).any() else math.nan
        return short / self.judged.sum(), float(best.min()) / self.oracle

    def bounds(self, share: float) -> dict[str, tuple[float, float]]:
        start = self.times[0]
        found = {"as run": self.score(self.as_run), "fixed": self.fixed(share)}
        for name, length in BLOCKS:
            found[name] = self.per_block(((self.times - start) // length).to_numpy(), share)
        slot = (self.times - self.times.normalize()) // SLOT
        found["per 6h slot"] = self.per_block(np.asarray(slot), share)
        return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path,
                        help="backtest output folders (default: out/backtest/*)")
    parser.add_argument("--share", type=float, default=None,
                        help="the share to hold (default: each run's own)")
    args = parser.parse_args(argv)
    folders = args.runs or sorted(p.parent for p in (ROOT / "out/backtest").glob("*/summary.json"))
    if not folders:
        raise SystemExit("no backtest outputs: run `make backtest` first")
    ratios: dict[str, list[float]] = {}
    columns = ("as run", "fixed", *(name for name, _ in BLOCKS), "per 6h slot")
    print(f"{'trace':36s}{'asked':>7s}" + "".join(f"{c:>18s}" for c in columns))
    for folder in folders:
        run = Run(folder)
        share = args.share or float(run.summary["max_under_provisioned"])
        found = run.bounds(share)
        cells = "".join(f"{cost:>11.3f} {held:>5.1%}" for held, cost in found.values())
        print(f"{run.name[:36]:36s}{share:>7.1%}{cells}")
        baseline = BASELINE_AT_5.get(run.name)
        if baseline is not None and math.isclose(share, 0.05):
            for column, (_, cost) in found.items():
                ratios.setdefault(column, []).append(cost / baseline)
    if len(ratios.get("as run", ())) == len(BASELINE_AT_5):
        print(f"{'mean over the baselines at 5%':43s}"
              + "".join(f"{np.mean(r):>18.3f}" for r in ratios.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
