"""Pure scaling policy: from a forecast to the load to plan for, and the HPA's arithmetic.

The planned load is the chosen quantile of demand in the interval that newly started pods
will serve (lead time = pod start-up), averaged over recent origins with a short half-life,
and floored by the demand sustained over the last two intervals. The HPA arithmetic is
Kubernetes' own (tolerance, scale-down stabilization, bounds), so a backtest of the planned
load shows what a real HPA fed with it would have done.

Why the average and the two-interval floor: a quantile forecast moves with every new point,
and a plan that follows that noise pays for capacity in the wrong intervals; a floor at a
one-interval spike pays, after the spike, for load that has already gone. Both cost more to
hold the same share of under-provisioned intervals (README.md, "How it decides", has the
figures).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from forecaster.errors import InvalidInputError
from forecaster.models import Forecast

DEFAULT_TOLERANCE = 0.1
# Load / target within this of a whole number counts as that number: 33.4 / 16.7 is
# 2.0000000000000004 in floats, and means 2 replicas.
ROUNDING_TOLERANCE = 1e-9

Mode = Literal["forecast", "reactive", "dry_run", "outage"]


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
        check_replica_bounds(self.min_replicas, self.max_replicas)
        if not 0 <= self.tolerance < 1:
            raise InvalidInputError("tolerance", f"must be in [0, 1), got {self.tolerance}")
        if self.stabilization_steps < 1:
            raise InvalidInputError(
                "stabilization", f"must cover at least 1 step, got {self.stabilization_steps}"
            )


def check_replica_bounds(
    min_replicas: int, max_replicas: int | None,
    names: tuple[str, str] = ("min_replicas", "max_replicas"),
) -> None:
    """The HPA's bounds as Kubernetes takes them: a minimum of 0 or more, a maximum (if any) of
    at least 1 and at least the minimum; InvalidInputError names each as `names` call them
    (the CLI's flags, the REST API's parameters)."""
    low, high = names
    if min_replicas < 0:
        raise InvalidInputError(low, f"must be 0 or more, got {min_replicas}")
    if max_replicas is not None and max_replicas < max(1, min_replicas):
        raise InvalidInputError(
            high, f"must be at least 1 and at least {low} ({min_replicas}); got {max_replicas}"
        )


def planned_load(forecast_at_quantile: float, current_demand: float, reactive_floor: bool) -> float:
    """The load to provision for: the (smoothed) forecast, and at least `current_demand` (the
    sustained demand, see sustained_demand) if floored.

    A missing forecast (NaN) plans for the current demand; a missing current demand is no floor.
    """
    if math.isnan(forecast_at_quantile):
        return current_demand
    if reactive_floor and not math.isnan(current_demand):
        return max(forecast_at_quantile, current_demand)
    return forecast_at_quantile


def smoothing_weight(step_seconds: float, half_life_seconds: float) -> float:
    """Weight of the newest forecast in the plan's moving average, one step after the last:
    1 - 2^(-step / half-life). A half-life of 0 means no averaging (weight 1)."""
    if half_life_seconds < 0:
        raise InvalidInputError(
            "plan_half_life", f"must be >= 0 seconds, got {half_life_seconds!r}"
        )
    if half_life_seconds == 0:
        return 1.0
    return 1.0 - 2.0 ** (-step_seconds / half_life_seconds)


def sustained_demand(current: float, previous: float) -> float:
    """The demand held over the last two readings (the lower one), so that a one-interval
    spike does not raise the floor; either alone when the other is missing (NaN)."""
    if math.isnan(previous):
        return current
    if math.isnan(current):
        return previous
    return min(current, previous)


class ForecastSmoother:
    """Exponential moving average of one target's quantile forecasts, origin by origin.

    `smooth(origin, forecast)` folds in the forecast made at `origin` (seconds). A later origin
    moves the average on, decayed by the time since the last one (a gap of k steps weighs
    the new forecast 1 - (1 - w)^k); the same origin again (a refit re-forecasting it)
    replaces that origin's forecast instead of counting it twice; an earlier origin starts
    over. A missing forecast (NaN) leaves the average where it was.

    >>> smoother = ForecastSmoother(weight=0.5, step_seconds=300)
    >>> smoother.smooth(0, 100.0), smoother.smooth(300, 200.0), smoother.smooth(300, 300.0)
    (100.0, 150.0, 200.0)
    """

    __slots__ = ("_before", "_origin", "_smoothed", "_steps", "step_seconds", "weight")

    def __init__(self, weight: float, step_seconds: float) -> None:
        if not 0.0 < weight <= 1.0:
            raise InvalidInputError("plan_half_life", f"gives a weight outside (0, 1]: {weight}")
        self.weight = weight
        self.step_seconds = step_seconds
        self._origin: float | None = None
        self._steps = 1.0
        self._before = math.nan  # the average as of the origin before `_origin`
        self._smoothed = math.nan

    def smooth(self, origin: float, forecast: float) -> float:
        if self._origin is None or origin < self._origin:
            self._before, self._smoothed, self._steps = math.nan, math.nan, 1.0
        elif origin > self._origin:
            self._before = self._smoothed
            self._steps = (origin - self._origin) / self.step_seconds
        self._origin = origin
        if math.isnan(forecast):
            self._smoothed = self._before
        elif math.isnan(self._before):
            self._smoothed = forecast
        else:
            weight = 1.0 - (1.0 - self.weight) ** self._steps
            self._smoothed = self._before + weight * (forecast - self._before)
        return self._smoothed


def recommend(value: float, current_replicas: int | None, policy: ScalingPolicy) -> int:
    """The HPA's raw recommendation for a metric value: max(1, ceil(v / target)), held at the
    current count when the ratio is within the tolerance."""
    if current_replicas and current_replicas > 0:
        ratio = value / (current_replicas * policy.target_per_replica)
        if abs(ratio - 1.0) <= policy.tolerance:
            return current_replicas
    return max(1, planned_replicas(value, policy.target_per_replica))


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
    return HpaState(_desired(state.replicas, recommendation, recent, policy), recent)


def hpa_replay(values: Iterable[float], policy: ScalingPolicy) -> list[int | None]:
    """The replicas after each of hpa_step's evaluations of `values`, from no replicas: the
    same arithmetic without a state object per step, for the replays of thousands of plans
    that a search for the SLO level makes."""
    replicas: int | None = None
    recent: deque[int] = deque(maxlen=policy.stabilization_steps)
    found: list[int | None] = []
    for value in values:
        if not math.isnan(value):
            recommendation = recommend(value, replicas, policy)
            recent.append(recommendation)
            replicas = _desired(replicas, recommendation, recent, policy)
        found.append(replicas)
    return found


def _desired(
    replicas: int | None, recommendation: int, recent: Iterable[int], policy: ScalingPolicy
) -> int:
    """A rise applies at once; a fall only to the highest recommendation in the window
    (`recent`, this one included); then min/max."""
    if replicas is None or recommendation >= replicas:
        desired = recommendation
    else:
        desired = min(replicas, max(recent))
    desired = max(desired, policy.min_replicas)
    if policy.max_replicas is not None:
        desired = min(desired, policy.max_replicas)
    return desired


def oracle_replicas(demand: float, target_per_replica: float) -> int:
    """Perfect foresight: just enough replicas for the demand, at least one."""
    return max(1, planned_replicas(demand, target_per_replica))


def planned_replicas(load: float, target_value: float) -> int:
    """The replicas a load implies at `target_value` per replica: ceil(load / target), with
    float noise within ROUNDING_TOLERANCE of a whole number rounded away."""
    return math.ceil(load / target_value - ROUNDING_TOLERANCE)


@dataclass(frozen=True)
class PlannedLoad:
    """The load to plan for and the numbers behind it."""

    value: float
    current: float
    forecast: float | None  # the quantile forecast for the interval new pods will serve
    peak_over_lead: float | None  # the highest quantile forecast up to that interval
    quantile: float
    horizon_steps: int
    mode: Mode
    # Replicas x targetValue of a scheduledMinReplicas window over the lead time, if any.
    scheduled_minimum: float | None = None
    # The quantile forecast averaged over recent origins (planHalfLife): what is planned for.
    smoothed: float | None = None
    # The reactive floor: the lower of the current load and the last grid point's.
    floor: float = math.nan
    # The log of the factor a maxUnderProvisioned controller put on the plan (None: none).
    slo_level: float | None = None
    # In an outage (mode "outage"): when the source stopped answering (epoch seconds).
    outage_since: float | None = None

    @property
    def floored(self) -> bool:
        return self.smoothed is not None and self.floor > self.smoothed


def plan(
    forecast: Forecast | None,
    current: float,
    quantile: float,
    horizon: int,
    *,
    smoother: ForecastSmoother | None = None,
    last_point: float = math.nan,
    reactive_floor: bool = True,
) -> PlannedLoad:
    """The planned load: the quantile forecast `horizon` steps ahead, averaged over recent
    origins by `smoother` (if any), and (with `reactive_floor`) at least the load sustained
    over the current value and the last grid point; with no forecast yet, the current load.

    The engine, the backtest and selection all plan with this function."""
    if forecast is None:
        return PlannedLoad(current, current, None, None, quantile, horizon, "reactive",
                           floor=current)
    band = forecast.quantile(quantile)
    ahead = float(band[horizon - 1])
    smoothed = ahead if smoother is None else smoother.smooth(forecast.origin.timestamp(), ahead)
    floor = sustained_demand(current, last_point)
    return PlannedLoad(
        value=planned_load(smoothed, floor, reactive_floor),
        current=current,
        forecast=ahead,
        peak_over_lead=float(band[:horizon].max()),
        quantile=quantile,
        horizon_steps=horizon,
        mode="forecast",
        smoothed=smoothed,
        floor=floor,
    )
