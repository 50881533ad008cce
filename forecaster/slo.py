"""Hold a share of under-provisioned intervals: a per-target level on the planned load.

The quantile a plan follows says little about how often capacity falls short: at 0.9, the
bundled traces ran short in 7% to 11% of their intervals. `SloController` closes that loop.
It multiplies each decision's planned load by exp(level), feeds the product to the same HPA
arithmetic the scaler's HPA runs (`forecaster.policy.hpa_step`), and once an interval's demand
is known compares it with the replicas its own decision had ready. Each miss raises the level
by gain x (1 - share), each interval served lowers it by gain x share: adaptive conformal
inference (Gibbs & Candes 2021) on the log of a factor, so the running share of misses
converges to `share` whatever the demand does, as long as the level can move far enough.

That alone holds the share over the long run, not over any few days: the misses in a stretch
exceed share x n by the rise of the level over it divided by the gain, and a regime that needs
the level e^0.43 higher costs 17 misses (1.5 points of four days) before it is met. A larger
gain shortens that but chases every burst, at a cost. So a second term watches the last four
days (WINDOW_STEPS judged intervals): the excess of their misses over share x n, in units of
WINDOW_BAND of them, through tan(pi/2 x), times WINDOW_GAIN and capped at +-WINDOW_CAP. Near
the share it is negligible; as four days' share nears WINDOW_BAND from it, the term grows
fast and pulls the next intervals back, up after a run of misses, down (cheaper) after a calm
stretch: the saturating integral of conformal PID control (Angelopoulos, Candes & Tibshirani
2023) on a sliding window. It is bounded, so the long-run guarantee keeps its form, with the
level's range widened by twice the cap.

The window term waits for four days to go wrong, and the base level, at its small gain,
answers a day of bursts only after it is over, then pays for it with days of too few misses.
A third term follows the last day or so: `recent_gain` times the misses' excess over the
share, each judged interval's weight halving after RECENT_HALF_LIFE_STEPS more. Misses come
in bursts that last hours (a run of misses is often followed by another soon after), so the
level rises while a burst lasts and falls back within a day or two after it, which the base
level's memory of every miss cannot: a fast integrator that forgets, as a leaky integral
term does in control. It is bounded, by recent_gain / (1 - its decay), so the
long-run guarantee keeps its form here too.

The gain sets how close: over n judged intervals the misses differ from share x n by at most
the range the level travels divided by the gain (Gibbs & Candes 2021). The misses allowed,
share x n, shrink with the share, so below the default share the gain grows as 1 / share:
the bound then stays the same fraction of the allowed misses, and the level falls between
misses (by gain x share per interval served) as fast as at the default. At larger shares the
tolerance is in points of share, not in misses, and the gain stays.

A controller that starts cold spends its first misses finding the level: `calibrate()` sets
the level, from the decisions it remembers (past plans and their demands only), to the
lowest one that would have held the share over them, and starts counting anew. It remembers
six days: bursts of demand come on some days and not others, and a level calibrated on two
days that held none starts far below the one the next days need, which the gain then has to
make up in misses (at 5%, two days allow 29 misses, six days 86). Starting close, the level
only has to follow slow drifts, and a small gain does that without chasing each burst (a
burst raises the level for the intervals after it, which rarely need it).

It holds no model: its state survives a refit or a change of model, and it pickles, so with
`stateDir` it survives a restart too (forecaster/state.py).

`ShareScorer` is what `auto` chooses its candidates by when a share is asked: the cost of
holding it with each candidate's plan over the validation window, the plan made by
`forecaster.policy.plan` and served through the HPA's arithmetic, as here.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from forecaster.errors import InvalidInputError
from forecaster.models import RunCost, ValidationRun
from forecaster.policy import (
    ForecastSmoother,
    HpaState,
    ScalingPolicy,
    hpa_replay,
    hpa_step,
    oracle_replicas,
    plan,
    smoothing_weight,
)

DEFAULT_SHARE = 0.05
DEFAULT_GAIN = 0.025  # at DEFAULT_SHARE and above; see default_gain
# How far the level may go: a factor of e^-3 (0.05) to e^5 (148) on the plan.
LEVEL_BOUNDS = (-3.0, 5.0)
DEFAULT_MEMORY_STEPS = 1728  # six days of 5-minute decisions to calibrate on
# The window term (see the module's docstring): four days of 5-minute intervals; it saturates
# as their share nears 1.25 points from the asked one; WINDOW_GAIN at half of that.
WINDOW_STEPS = 1152
WINDOW_BAND = 0.0125
WINDOW_GAIN = 0.05
WINDOW_CAP = 0.2
# The recent term (see the module's docstring): the misses' excess over the share, each
# judged interval's weight halving after a day of them, times RECENT_GAIN.
RECENT_HALF_LIFE_STEPS = 288
RECENT_GAIN = 0.05
# Where tan(pi/2 x) is cut before it reaches infinity at |x| = 1 (the cap then rules).
_WINDOW_SATURATION = 0.999
# Calibration finds its level to within 24 halvings of LEVEL_BOUNDS; the scorer to within 12
# (0.2% of the factor), in a bracket it guesses first (see ShareScorer).
CALIBRATION_RESOLUTION = (LEVEL_BOUNDS[1] - LEVEL_BOUNDS[0]) / 2**24
SCORING_RESOLUTION = (LEVEL_BOUNDS[1] - LEVEL_BOUNDS[0]) / 2**12
# How far the HPA's tolerance (10%) can hold capacity below the plan times the factor.
TOLERANCE_PAD = 0.1


def default_gain(share: float) -> float:
    """The level's gain for a share: DEFAULT_GAIN, times DEFAULT_SHARE / share below it."""
    return DEFAULT_GAIN * max(1.0, DEFAULT_SHARE / share)


class SloController:
    """Moves a level on the planned load so that at most `share` of intervals run short.

    Call `observe(demand)` at the end of each interval with its demand (NaN when unknown),
    then `decide(planned_load)`: it returns the load to serve. The decision made at the end
    of interval t is ready in t + 1 + `lead_steps`, and is judged when that interval's
    demand arrives. `gain` defaults to `default_gain(share)`. The level is `base_level`,
    which integrates every judged interval, plus `window_term()`, which looks at the last
    `window_steps` only, plus `recent_term()`, which forgets by half every
    `recent_half_life_steps`; a gain of 0 turns either term off.

    >>> from forecaster.policy import ScalingPolicy
    >>> slo = SloController(0.05, ScalingPolicy(target_per_replica=10.0), lead_steps=1)
    >>> served = [slo.decide(100.0) for _ in range(2)]
    >>> slo.observe(150.0)  # the first decision's interval: 10 replicas, 150 > 100
    >>> slo.misses, slo.intervals, round(slo.base_level, 4), round(slo.level, 4)
    (1, 1, 0.0238, 0.0765)
    """

    def __init__(
        self,
        share: float,
        policy: ScalingPolicy,
        lead_steps: int,
        *,
        gain: float | None = None,
        level: float = 0.0,
        memory_steps: int = DEFAULT_MEMORY_STEPS,
        window_steps: int = WINDOW_STEPS,
        window_gain: float = WINDOW_GAIN,
        recent_gain: float = RECENT_GAIN,
        recent_half_life_steps: int = RECENT_HALF_LIFE_STEPS,
    ) -> None:
        if not 0.0 < share < 0.5:
            raise InvalidInputError(
                "maxUnderProvisioned", f"must be in (0, 0.5), got {share!r}"
            )
        if lead_steps < 0:
            raise InvalidInputError("lead_steps", f"must be >= 0, got {lead_steps!r}")
        if gain is None:
            gain = default_gain(share)
        if not (math.isfinite(gain) and gain > 0):
            raise InvalidInputError("gain", f"must be a positive number, got {gain!r}")
        if memory_steps < 0:
            raise InvalidInputError("memory_steps", f"must be >= 0, got {memory_steps!r}")
        if window_steps < 1:
            raise InvalidInputError("window_steps", f"must be >= 1, got {window_steps!r}")
        if not (math.isfinite(window_gain) and window_gain >= 0):
            raise InvalidInputError(
                "window_gain", f"must be a number >= 0, got {window_gain!r}"
            )
        if not (math.isfinite(recent_gain) and recent_gain >= 0):
            raise InvalidInputError(
                "recent_gain", f"must be a number >= 0, got {recent_gain!r}"
            )
        if recent_half_life_steps < 1:
            raise InvalidInputError(
                "recent_half_life_steps", f"must be >= 1, got {recent_half_life_steps!r}"
            )
        self.share = share
        self.policy = policy
        self.lead_steps = lead_steps
        self.gain = gain
        self.window_steps = window_steps
        self.window_gain = window_gain
        self.recent_gain = recent_gain
        self.recent_decay = 0.5 ** (1.0 / recent_half_life_steps)
        # The misses' excess over the share, each judged interval weighted by recent_decay
        # to the power of the intervals judged since.
        self.recent_excess = 0.0
        self.base_level = _bounded(level)
        self.level = self.base_level
        self.misses = 0
        self.intervals = 0
        # 1 per judged interval that ran short, 0 per one served: the last window_steps, a
        # ring whose oldest entry is at _window_at once full.
        self._window = bytearray()
        self._window_at = 0
        self._window_misses = 0
        self._hpa = HpaState()
        self._hpa_before = HpaState()  # before the latest decision, for `redecide`
        # Decisions not yet judged: (planned load, replicas), oldest first.
        self._pending: deque[tuple[float, int | None]] = deque()
        self._memory = _Memory(memory_steps)  # judged decisions to calibrate on

    def __setstate__(self, state: dict[str, object]) -> None:
        # Saved before the recent term existed: it starts at the defaults, with no excess.
        self.__dict__.update(state)
        if "recent_excess" not in state:
            self.recent_gain = RECENT_GAIN
            self.recent_decay = 0.5 ** (1.0 / RECENT_HALF_LIFE_STEPS)
            self.recent_excess = 0.0

    @property
    def achieved(self) -> float:
        """The share of judged intervals that ran short since counting began (NaN before)."""
        return self.misses / self.intervals if self.intervals else math.nan

    @property
    def replicas(self) -> int | None:
        """The replicas the last decision asks for."""
        return self._hpa.replicas

    def decide(self, planned_load: float) -> float:
        """The load to serve for a plan: planned_load x exp(level); NaN (no plan) holds."""
        served = planned_load * math.exp(self.level)
        self._hpa_before = self._hpa
        self._hpa = hpa_step(self._hpa, served, self.policy)
        self._pending.append((planned_load, self._hpa.replicas))
        return served

    def redecide(self, planned_load: float) -> float:
        """Replace the latest decision with a plan restated for the same interval (the live
        service plans again at each refresh, and after a refit): the last plan made for an
        interval is its decision, as in a backtest's one plan per interval."""
        if self._pending:
            self._pending.pop()
            self._hpa = self._hpa_before
        return self.decide(planned_load)

    def observe(self, demand: float) -> None:
        """The demand of the interval that just ended; judges the decision ready in it."""
        if len(self._pending) <= self.lead_steps:
            return  # no decision of this controller was ready in that interval
        planned, replicas = self._pending.popleft()
        if math.isnan(demand) or replicas is None:
            return
        self.remember(planned, demand)
        miss = demand > replicas * self.policy.target_per_replica
        self.intervals += 1
        self.misses += int(miss)
        self._slide(miss)
        self.base_level = _bounded(self.base_level + self.gain * (float(miss) - self.share))
        self.recent_excess = self.recent_decay * self.recent_excess + float(miss) - self.share
        self.level = _bounded(self.base_level + self.window_term() + self.recent_term())

    def recent_term(self) -> float:
        """What the recent misses add to the level: recent_gain x their excess over the
        share, fading by half over each recent_half_life_steps judged intervals; within
        +-recent_gain / (1 - recent_decay)."""
        return self.recent_gain * self.recent_excess

    def window_term(self) -> float:
        """What the last window_steps judged intervals add to the level: WINDOW_GAIN x
        tan(pi/2 x), x their misses' excess over the share in units of WINDOW_BAND x
        window_steps, capped at +-WINDOW_CAP; 0 before any is judged."""
        if not self._window or self.window_gain == 0:
            return 0.0
        excess = self._window_misses - self.share * len(self._window)
        x = excess / (WINDOW_BAND * self.window_steps)
        x = min(max(x, -_WINDOW_SATURATION), _WINDOW_SATURATION)
        term = self.window_gain * math.tan(math.pi / 2 * x)
        return min(max(term, -WINDOW_CAP), WINDOW_CAP)

    def _slide(self, miss: bool) -> None:
        if len(self._window) < self.window_steps:
            self._window.append(int(miss))
        else:
            self._window_misses -= self._window[self._window_at]
            self._window[self._window_at] = int(miss)
            self._window_at = (self._window_at + 1) % self.window_steps
        self._window_misses += int(miss)

    def calibrate(self) -> None:
        """Set the level to the lowest that would have held the share over the remembered
        decisions (see lowest_level), then count anew from here, the window and the recent
        term included."""
        if self._memory:
            self.level = self.lowest_level()
        self.base_level = self.level
        self.recent_excess = 0.0
        self.misses = 0
        self.intervals = 0
        self._window = bytearray()
        self._window_at = 0
        self._window_misses = 0

    def lowest_level(
        self, resolution: float = CALIBRATION_RESOLUTION,
        guess: tuple[float, float] = LEVEL_BOUNDS,
    ) -> float:
        """The lowest level in LEVEL_BOUNDS that would have held the share over the
        remembered decisions, to within `resolution`: bisection on a replay of the HPA,
        within `guess` when the level lies in it (two replays tell), else beside it."""
        floor, ceiling = LEVEL_BOUNDS
        low, high = max(guess[0], floor), min(guess[1], ceiling)
        if self.shortfall_at(low) <= self.share:  # at or below the guess
            if low == floor or self.shortfall_at(floor) <= self.share:
                return floor
            low, high = floor, low
        elif high < ceiling and self.shortfall_at(high) > self.share:  # above it
            low, high = high, ceiling
        while high - low > resolution:
            middle = (low + high) / 2
            if self.shortfall_at(middle) <= self.share:
                high = middle
            else:
                low = middle
        return high

    def remember(self, planned: float, demand: float) -> None:
        """Keep a decision and its interval's demand to calibrate on, as `observe` keeps the
        ones it judges; a missing demand (NaN) is not kept."""
        if not math.isnan(demand):
            self._memory.append(planned, demand)

    def shortfall_at(self, level: float) -> float:
        """The share of remembered intervals a fixed `level` would have left short."""
        if not self._memory:
            return 0.0
        target = self.policy.target_per_replica
        short = sum(
            1 for ready, demand in zip(self.replicas_at(level), self._memory.demand(), strict=True)
            if ready is not None and demand > ready * target
        )
        return short / len(self._memory)

    def replicas_at(self, level: float) -> list[int | None]:
        """The replicas the HPA would have had ready in each remembered interval, had the
        plans been served at a fixed `level`."""
        factor = math.exp(level)
        return hpa_replay([planned * factor for planned in self._memory.planned()], self.policy)

    def remembered(self) -> list[tuple[float, float]]:
        """The remembered decisions, (planned load, demand), oldest first."""
        return list(self._memory)


def _bounded(level: float) -> float:
    low, high = LEVEL_BOUNDS
    return min(max(level, low), high)


class _Memory:
    """The last `size` (planned load, demand) pairs, in two float arrays rather than a deque
    of tuples, because every target of the service keeps one: rings once full, so that each
    holds `size` floats (trimmed in blocks, they held up to twice that)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._planned = array("d")
        self._demand = array("d")
        self._next = 0  # once full, where the next pair goes: the oldest's place

    def __setstate__(self, state: dict[str, object]) -> None:
        # Saved when the arrays were trimmed in blocks: the last `size` pairs, oldest first.
        self.__dict__.update(state)
        if "_next" not in state:
            self._next = 0
            del self._planned[: -self.size or len(self._planned)]
            del self._demand[: -self.size or len(self._demand)]

    def append(self, planned: float, demand: float) -> None:
        if self.size == 0:
            return
        if len(self._planned) < self.size:
            self._planned.append(planned)
            self._demand.append(demand)
            return
        self._planned[self._next] = planned
        self._demand[self._next] = demand
        self._next = (self._next + 1) % self.size

    def __len__(self) -> int:
        return len(self._planned)

    def __iter__(self) -> Iterator[tuple[float, float]]:
        return zip(self.planned(), self.demand(), strict=True)

    def planned(self) -> array[float]:
        return self._planned[self._next :] + self._planned[: self._next]

    def demand(self) -> array[float]:
        return self._demand[self._next :] + self._demand[: self._next]


@dataclass(frozen=True)
class ShareScorer:
    """The cost of holding `share` with a candidate's plan over its validation run, for
    `auto` (forecaster.models.selection.PlanScorer): replica-hours over the oracle's.

    Each origin of the run is planned by `forecaster.policy.plan` (the plan's moving average
    and sustained floor included), and the run is priced at the lowest level that would have
    held the share over all of it, served through the HPA's arithmetic: the level
    `SloController.calibrate` finds (here to within 0.2%), which is where the controller
    starts from and, within its gain, stays near. Pricing the run as the controller serves
    it instead (calibrated on its first half, priced on the second) ranked on half the data
    and chose worse (bench/README.md, "Model selection").

    >>> scorer = ShareScorer(0.05, ScalingPolicy(target_per_replica=10.0), lead_steps=1)
    >>> scorer(run).cost                                          # doctest: +SKIP
    """

    share: float
    policy: ScalingPolicy
    lead_steps: int
    plan_half_life_seconds: float = 0.0
    reactive_floor: bool = True

    @classmethod
    def of(
        cls, controller: SloController, plan_half_life_seconds: float,
        reactive_floor: bool = True,
    ) -> ShareScorer:
        """The scorer for the plans a controller serves: its share, policy and lead."""
        return cls(
            controller.share, controller.policy, controller.lead_steps,
            float(plan_half_life_seconds), reactive_floor,
        )

    def __call__(self, run: ValidationRun) -> RunCost:
        if run.horizon != 1 + self.lead_steps:
            raise InvalidInputError(
                "horizon", f"the run forecasts {run.horizon} steps, the plan needs "
                f"{1 + self.lead_steps} (lead + 1)"
            )
        planned = self.planned_loads(run)
        judged = max(len(run) - self.lead_steps, 0)  # origins whose interval is in the run
        controller = SloController(
            self.share, self.policy, self.lead_steps, memory_steps=judged
        )
        for k in range(judged):
            controller.remember(planned[k], float(run.actual[k + self.lead_steps]))
        remembered = controller.remembered()
        level = controller.lowest_level(SCORING_RESOLUTION, self.level_bounds(remembered))
        demand = [d for _, d in remembered]
        return _priced(demand, controller.replicas_at(level), self.policy, level)

    def level_bounds(self, decisions: list[tuple[float, float]]) -> tuple[float, float]:
        """Where the lowest level holding the share lies, were the HPA's capacity the plan
        times the factor rounded up to whole replicas: an interval is served once the
        factor covers demand / plan, and short until it covers (demand - target) / plan.
        Padded by what the HPA's tolerance can hold back; only a guess to search from."""
        target = self.policy.target_per_replica
        sure = sorted(_log_ratio(d, p) for p, d in decisions)
        possible = sorted(_log_ratio(d - target, p) for p, d in decisions)
        allowed = math.floor(self.share * len(decisions))  # intervals that may run short
        rank = len(decisions) - allowed - 1
        if rank < 0:
            return LEVEL_BOUNDS
        low = possible[rank] - TOLERANCE_PAD
        high = sure[rank] + TOLERANCE_PAD
        return (low, high) if low < high else LEVEL_BOUNDS

    def planned_loads(self, run: ValidationRun) -> list[float]:
        """The load planned at each origin of the run, by the one plan."""
        step = run.step.total_seconds()
        smoother = ForecastSmoother(smoothing_weight(step, self.plan_half_life_seconds), step)
        return [
            plan(
                run.forecast(k), run.current(k), run.quantile, run.horizon,
                smoother=smoother, last_point=run.last_point(k),
                reactive_floor=self.reactive_floor,
            ).value
            for k in range(len(run))
        ]


def _log_ratio(demand: float, planned: float) -> float:
    """log(demand / planned): -inf when nothing is demanded, inf for a zero or missing plan."""
    if demand <= 0:
        return -math.inf
    if not planned > 0:
        return math.inf
    return math.log(demand / planned)


def _priced(
    demand: list[float], replicas: list[int | None], policy: ScalingPolicy, level: float
) -> RunCost:
    """Replica-hours over the oracle's, and the share of intervals short, where both the
    demand and the replicas are known; inf (and NaN) when none is."""
    target = policy.target_per_replica
    known = [
        (d, ready) for d, ready in zip(demand, replicas, strict=True)
        if ready is not None and not math.isnan(d)
    ]
    if not known:
        return RunCost(math.inf, math.nan, level)
    oracle = sum(oracle_replicas(d, target) for d, _ in known)
    short = sum(1 for d, ready in known if d > ready * target)
    return RunCost(sum(ready for _, ready in known) / oracle, short / len(known), level)
