"""Pure scaling policy: from a forecast to the load to plan for, and the HPA's arithmetic.

The planned load is the chosen quantile of demand in the interval that newly started pods
will serve (lead time = pod start-up), floored by the current demand. The HPA arithmetic is
Kubernetes' own (tolerance, scale-down stabilization, bounds), so a backtest of the planned
load shows what a real HPA fed with it would have done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from forecaster.errors import InvalidInputError

DEFAULT_TOLERANCE = 0.1


@dataclass(frozen=True)
class ScalingPolicy:
    """How a load becomes replicas. Validated on construction.

    >>> policy = ScalingPolicy(target_per_replica=50.0, max_replicas=20)
    >>> state = hpa_step(HpaState(), 180.0, policy)
    >>> state.replicas
    4
    """

    target_per_replica: float
    min_replicas: int = 1
    max_replicas: int | None = None
    tolerance: float = DEFAULT_TOLERANCE
    stabilization_steps: int = 1
    reactive_floor: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.target_per_replica) and self.target_per_replica > 0):
            raise InvalidInputError(
                "target", f"must be a positive number, got {self.target_per_replica!r}"
            )
        if self.min_replicas < 0:
            raise InvalidInputError("min_replicas", f"must be >= 0, got {self.min_replicas}")
        if self.max_replicas is not None and self.max_replicas < max(1, self.min_replicas):
            raise InvalidInputError(
                "max_replicas",
                f"must be >= max(1, min_replicas={self.min_replicas}), got {self.max_replicas}",
            )
        if not 0 <= self.tolerance < 1:
            raise InvalidInputError("tolerance", f"must be in [0, 1), got {self.tolerance}")
        if self.stabilization_steps < 1:
            raise InvalidInputError(
                "stabilization", f"must cover at least 1 step, got {self.stabilization_steps}"
            )


def planned_load(forecast_at_quantile: float, current_demand: float, reactive_floor: bool) -> float:
    """The load to provision for: the forecast, and at least the current demand if floored.

    A missing forecast (NaN) plans for the current demand; a missing current demand is no floor.
    """
    if math.isnan(forecast_at_quantile):
        return current_demand
    if reactive_floor and not math.isnan(current_demand):
        return max(forecast_at_quantile, current_demand)
    return forecast_at_quantile


def recommend(value: float, current_replicas: int | None, policy: ScalingPolicy) -> int:
    """The HPA's raw recommendation for a metric value: max(1, ceil(v / target)), held at the
    current count when the ratio is within the tolerance."""
    if current_replicas and current_replicas > 0:
        ratio = value / (current_replicas * policy.target_per_replica)
        if abs(ratio - 1.0) <= policy.tolerance:
            return current_replicas
    return max(1, math.ceil(value / policy.target_per_replica - 1e-12))


@dataclass(frozen=True)
class HpaState:
    """Desired replicas and the recent recommendations the stabilization window looks at."""

    replicas: int | None = None
    recent: tuple[int, ...] = field(default=())


def hpa_step(state: HpaState, value: float, policy: ScalingPolicy) -> HpaState:
    """One HPA evaluation: a rise applies at once; a fall only to the highest recommendation in
    the stabilization window (this step included); then min/max. A missing value holds."""
    if math.isnan(value):
        return state
    recommendation = recommend(value, state.replicas, policy)
    recent = (*state.recent, recommendation)[-policy.stabilization_steps :]
    if state.replicas is None or recommendation >= state.replicas:
        desired = recommendation
    else:
        desired = min(state.replicas, max(recent))
    desired = max(desired, policy.min_replicas)
    if policy.max_replicas is not None:
        desired = min(desired, policy.max_replicas)
    return HpaState(desired, recent)


def oracle_replicas(demand: float, target_per_replica: float) -> int:
    """Perfect foresight: just enough replicas for the demand, at least one."""
    return max(1, math.ceil(demand / target_per_replica - 1e-12))
