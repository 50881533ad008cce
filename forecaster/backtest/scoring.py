"""Pure scoring of a simulation: provisioning, cost to hold the SLO, forecast accuracy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

MULTIPLIERS = np.geomspace(0.67, 100.0, 240)
SLO_LEVELS = (0.05, 0.01)


@dataclass(frozen=True)
class PolicyScore:
    """How one policy provisioned the evaluated intervals that have a demand."""

    under_provisioned_share: float
    unserved_share: float
    replica_hours: float
    replica_hours_vs_oracle: float
    cost_to_hold_slo: dict[str, float | None]  # "5%" -> cost, None when unreachable


def provisioning(
    demand: np.ndarray, replicas: np.ndarray, target: float
) -> tuple[float, float]:
    """Share of intervals with demand above capacity, and the share of demand left unserved."""
    capacity = replicas * target
    under = demand > capacity
    total = demand.sum()
    unserved = np.maximum(demand - capacity, 0.0).sum() / total if total > 0 else 0.0
    return float(under.mean()), float(unserved)


def cost_to_hold_slo(
    planned: np.ndarray, demand: np.ndarray, oracle: np.ndarray, target: float
) -> dict[str, float | None]:
    """Smallest replica cost relative to the oracle, over headroom multipliers m applied to the
    planned load, among those keeping under-provisioned intervals at or below each SLO level."""
    replicas = np.maximum(1, np.ceil(MULTIPLIERS[:, None] * planned[None, :] / target - 1e-12))
    under_share = (demand[None, :] > replicas * target).mean(axis=1)
    cost = replicas.sum(axis=1) / oracle.sum()
    result: dict[str, float | None] = {}
    for level in SLO_LEVELS:
        ok = under_share <= level + 1e-12
        result[f"{level:.0%}"] = float(cost[ok].min()) if ok.any() else None
    return result


def score_policy(
    planned: np.ndarray,
    replicas: np.ndarray,
    demand: np.ndarray,
    oracle: np.ndarray,
    target: float,
    step_hours: float,
) -> PolicyScore:
    under, unserved = provisioning(demand, replicas, target)
    hours = float(replicas.sum() * step_hours)
    return PolicyScore(
        under_provisioned_share=under,
        unserved_share=unserved,
        replica_hours=hours,
        replica_hours_vs_oracle=float(replicas.sum() / oracle.sum()),
        cost_to_hold_slo=cost_to_hold_slo(planned, demand, oracle, target),
    )


def mase_denominator(history: pd.Series, steps_per_day: int) -> float:
    """MAE, before the evaluation start, of the naive forecast that repeats yesterday's value."""
    values = history.to_numpy(dtype=float)
    if len(values) <= steps_per_day:
        return float("nan")
    errors = np.abs(values[steps_per_day:] - values[:-steps_per_day])
    errors = errors[np.isfinite(errors)]
    return float(errors.mean()) if errors.size else float("nan")


def forecast_accuracy(
    demand: np.ndarray,
    mean: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    history: pd.Series,
    steps_per_day: int,
) -> dict[str, float]:
    """MASE and 80%-interval coverage at the decision horizon over the scored intervals."""
    mae = float(np.abs(mean - demand).mean())
    scale = mase_denominator(history, steps_per_day)
    return {
        "mae": mae,
        "naive_day_mae_before_eval": scale,
        "mase": mae / scale if scale and np.isfinite(scale) else float("nan"),
        "coverage_80": float(((demand >= lower) & (demand <= upper)).mean()),
    }
