"""Replay a trace decision by decision, with no look-ahead, for predictive and reactive scaling.

Time on the grid: interval t is [t, t + step). The decision made at the end of t sees the
grid up to and including t; its capacity is ready L = ceil(startup / step) intervals later,
in interval u = t + 1 + L. Models are refitted on a schedule anchored at the evaluation
start; a refit at the start of interval tau sees the grid before tau.

Inside a gap, the full grid knows whether the gap turns out long (NaN) or short (held); a
decision does not. Decisions and updates use `known_at_end` instead, and a refit's history
holds a gap still running at the refit as the grid cut there would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from forecaster.durations import format_duration
from forecaster.errors import InvalidInputError
from forecaster.models import fit_with_fallback
from forecaster.models.reselection import RESELECT_SECONDS, reselection_due
from forecaster.policy import (
    ForecastSmoother,
    HpaState,
    ScalingPolicy,
    check_replica_bounds,
    hpa_step,
    oracle_replicas,
    plan,
    smoothing_weight,
)
from forecaster.series import RegularSeries, known_at_end
from forecaster.slo import ShareScorer, SloController
from forecaster.spec import DEFAULT_PLAN_HALF_LIFE_SECONDS, DEFAULT_STABILIZATION_SECONDS

BAND_QUANTILES = (0.1, 0.9)


@dataclass(frozen=True)
class BacktestConfig:
    """What to replay and how; durations are pandas Timedeltas."""

    target: float
    step: pd.Timedelta = pd.Timedelta("5min")
    startup: pd.Timedelta = pd.Timedelta("5min")
    eval_start: pd.Timestamp | None = None
    eval_days: float = 4.0
    refit: pd.Timedelta = pd.Timedelta("1h")
    model: str = "auto"
    quantile: float = 0.9
    time_zone: str = "UTC"  # the wall clock the models' seasons and calendar follow
    reactive_floor: bool = True
    plan_half_life: pd.Timedelta = pd.Timedelta(seconds=DEFAULT_PLAN_HALF_LIFE_SECONDS)
    min_replicas: int = 1
    max_replicas: int | None = None
    stabilization: pd.Timedelta = pd.Timedelta(seconds=DEFAULT_STABILIZATION_SECONDS)
    # The share of intervals allowed short: a controller moves a level on the plan to hold
    # it (forecaster.slo). None plans the quantile as it is.
    max_under_provisioned: float | None = 0.05
    # Decisions replayed before the evaluation start for the controller to calibrate on: six
    # days, as SloController remembers in service (DEFAULT_MEMORY_STEPS).
    warmup: pd.Timedelta = pd.Timedelta(days=6)
    # The second of the day (UTC) at which `auto` selects afresh; in service a target's is
    # reselection_phase(its id). None: a day after each selection.
    reselection_phase: int | None = None

    def __post_init__(self) -> None:
        if self.step <= pd.Timedelta(0):
            raise InvalidInputError("--step", f"must be positive, got {self.step}")
        if not 0.0 < self.quantile < 1.0:
            raise InvalidInputError("--quantile", f"must be in (0, 1), got {self.quantile}")
        if self.startup < pd.Timedelta(0):
            raise InvalidInputError("--startup", f"must not be negative, got {self.startup}")
        if self.refit < self.step or self.refit % self.step != pd.Timedelta(0):
            raise InvalidInputError(
                "--refit", f"must be a whole number of steps ({self.step}), got {self.refit}"
            )
        if self.plan_half_life < pd.Timedelta(0):
            raise InvalidInputError(
                "--plan-half-life", f"must not be negative, got {self.plan_half_life}"
            )
        share = self.max_under_provisioned
        if share is not None and not 0.0 < share < 0.5:
            raise InvalidInputError(
                "--max-under-provisioned", f"must be in (0, 0.5), got {share!r}"
            )
        if self.warmup < pd.Timedelta(0):
            raise InvalidInputError("warmup", f"must not be negative, got {self.warmup}")
        phase = self.reselection_phase
        if phase is not None and not 0 <= phase < RESELECT_SECONDS:
            raise InvalidInputError(
                "reselection-phase", f"must be in [0, {RESELECT_SECONDS}) seconds, got {phase}"
            )
        if self.eval_start is None and not self.eval_days > 0:
            raise InvalidInputError("--eval-days", f"must be positive, got {self.eval_days}")
        check_replica_bounds(self.min_replicas, self.max_replicas,
                             ("--min-replicas", "--max-replicas"))

    @property
    def lead_steps(self) -> int:
        return math.ceil(self.startup / self.step)

    def smoother(self) -> ForecastSmoother:
        step = self.step.total_seconds()
        weight = smoothing_weight(step, self.plan_half_life.total_seconds())
        return ForecastSmoother(weight, step)

    def policy(self) -> ScalingPolicy:
        return ScalingPolicy(
            target_per_replica=self.target,
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            stabilization_steps=max(1, math.ceil(self.stabilization / self.step)),
            reactive_floor=self.reactive_floor,
        )

    def controller(self) -> SloController | None:
        if self.max_under_provisioned is None:
            return None
        return SloController(
            self.max_under_provisioned, self.policy(), self.lead_steps,
            memory_steps=math.ceil(self.warmup / self.step),
        )


@dataclass
class Simulation:
    """Per evaluated interval decisions, per origin forecasts, and how fitting went."""

    decisions: pd.DataFrame
    forecasts: pd.DataFrame
    planned_reactive: np.ndarray
    eval_start: pd.Timestamp
    history_demand: pd.Series
    refits: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)
    fit_seconds: list[float] = field(default_factory=list)
    selections: list[dict[str, object]] = field(default_factory=list)
    controller: SloController | None = None


def earliest_start(config: BacktestConfig) -> int:
    """Position of the earliest evaluation start: the first decision, 1 + L steps before it,
    needs the step before its own (the floor reads the last two)."""
    return 2 + config.lead_steps


def evaluation_start(grid: RegularSeries, config: BacktestConfig) -> int:
    """Position of the first evaluated interval; an off-grid --eval-start rounds up. Refuses a
    start or a number of days that leaves too little history before it or nothing after."""
    index = grid.demand.index
    earliest = earliest_start(config)
    step, startup = _shown(config.step), _shown(config.startup)
    if earliest >= len(index):
        raise InvalidInputError(
            "input",
            f"holds {len(index)} steps of {step}; a backtest with --startup {startup} needs at "
            f"least {earliest + 1} ({earliest} before the first evaluated one)",
        )
    if config.eval_start is not None:
        given = pd.Timestamp(config.eval_start)
        given = given.tz_localize("UTC") if given.tzinfo is None else given.tz_convert("UTC")
        start = given.ceil(config.step)
        position = int(index.searchsorted(start))
        if position >= len(index):
            raise InvalidInputError(
                "--eval-start",
                f"{start.isoformat()} is after the trace's last interval {index[-1].isoformat()}",
            )
        if position < earliest:
            raise InvalidInputError(
                "--eval-start",
                f"{given.isoformat()} leaves {position} of the {earliest} steps of history the "
                f"first decision needs (with --step {step} and --startup {startup}); the "
                f"earliest allowed is {index[earliest].isoformat()}, as the trace begins at "
                f"{index[0].isoformat()}",
            )
        return position
    steps = config.eval_days * 86_400 / config.step.total_seconds()
    if not 1 <= steps <= len(index) - earliest:  # NaN and infinity fail too
        step_days = config.step / pd.Timedelta(days=1)
        raise InvalidInputError(
            "--eval-days",
            f"must be from one step ({step_days:.6g}) to {(len(index) - earliest) * step_days:.6g}"
            f": the trace's {(len(index) - 1) * step_days:.4g} days ({index[0].isoformat()} .. "
            f"{index[-1].isoformat()}) less the {earliest} steps of history the first decision "
            f"needs; got {config.eval_days:g}",
        )
    return len(index) - math.ceil(steps)


def _shown(duration: pd.Timedelta) -> str:
    return format_duration(int(duration.total_seconds()))


def simulate(
    grid: RegularSeries,
    config: BacktestConfig,
    progress: Callable[[int, int], None] | None = None,
) -> Simulation:
    """Run every decision from 1 + L steps before the evaluation start to the end."""
    lead = config.lead_steps
    start = evaluation_start(grid, config)
    first = start - 1 - lead
    index = grid.demand.index
    live = known_at_end(grid)
    filled = live.to_numpy()
    n = len(index)
    last = n - 2 - lead
    refit_steps = int(config.refit / config.step)
    policy = config.policy()
    controller = config.controller()
    # What `auto` ranks its candidates by: the cost of holding the share with each one's plan.
    scorer = (
        ShareScorer.of(
            controller, config.plan_half_life.total_seconds(), config.reactive_floor
        )
        if controller is not None else None
    )
    # The controller calibrates on decisions before the evaluation start (their outcomes are
    # known by then); without one, nothing runs before it.
    warmup = math.ceil(config.warmup / config.step) if controller is not None else 0
    begin = max(1, first - warmup)
    quantiles = tuple(sorted({*BAND_QUANTILES, config.quantile}))
    horizon = 1 + lead

    sim = Simulation(
        decisions=pd.DataFrame(),
        forecasts=pd.DataFrame(),
        planned_reactive=np.array([]),
        eval_start=index[start],
        history_demand=grid.demand.iloc[:start],
    )
    predictive, reactive = HpaState(), HpaState()
    smoother = config.smoother()
    model = None
    fitted_at = None
    seen = 0  # grid positions [0, seen) are folded into the model
    count = last - first + 1
    rows = {
        key: np.full(count, np.nan)
        for key in (
            "forecast", "at_quantile", "mean", "lower", "upper", "replicas", "reactive",
            "reactive_plan", "level",
        )
    }
    fc_mean = np.full((count, horizon), np.nan)
    fc_lower = np.full((count, horizon), np.nan)
    fc_upper = np.full((count, horizon), np.nan)
    model_names: list[str] = []
    for t in range(begin, last + 1):
        i = t - first  # negative in the warm-up: not recorded
        refit_at = start + ((t + 1 - start) // refit_steps) * refit_steps
        if refit_at < 2:
            # A schedule point before the trace holds (almost) nothing to fit; a negative one
            # would even slice from the end. Fit at the first decision instead.
            refit_at = first + 1
        if refit_at != fitted_at:
            if model is not None and seen < refit_at:
                # As in service, where a refresh folds a bin in before the refit that reads
                # it: the model replaced scores its forecasts against it, and a calibrated
                # successor carries those scores on (forecaster.models.calibration).
                model.update(live.iloc[seen:refit_at])
                seen = refit_at
            began = time.perf_counter()
            history = _history_before(grid, live, refit_at)
            due = reselection_due(model, config.reselection_phase, history.index[-1])
            fit = fit_with_fallback(
                config.model, history, config.step,
                quantile=config.quantile, horizon=horizon, time_zone=config.time_zone,
                previous=None if due else model, scorer=scorer,
            )
            sim.fit_seconds.append(time.perf_counter() - began)
            sim.refits += 1
            if fit.fell_back:
                sim.fallbacks[fit.model.name] = sim.fallbacks.get(fit.model.name, 0) + 1
            _record_selection(sim, model, fit.model)
            model, fitted_at, seen = fit.model, refit_at, refit_at
        assert model is not None
        if seen <= t:
            model.update(live.iloc[seen : t + 1])
            seen = t + 1
        forecast = model.predict(horizon, quantiles)
        planned = plan(
            forecast, float(filled[t]), config.quantile, horizon, smoother=smoother,
            last_point=float(filled[t - 1]), reactive_floor=config.reactive_floor,
        )
        served, level = planned.value, math.nan
        if controller is not None:
            controller.observe(float(filled[t]))
            if t == first:
                controller.calibrate()
            level = controller.level
            served = controller.decide(planned.value)
        predictive = hpa_step(predictive, served, policy)
        reactive = hpa_step(reactive, float(filled[t]), policy)
        if i < 0:
            continue
        model_names.append(forecast.model)
        at_quantile = planned.forecast
        rows["forecast"][i] = served
        rows["level"][i] = level
        rows["at_quantile"][i] = at_quantile
        rows["mean"][i] = forecast.mean[lead]
        rows["lower"][i] = forecast.quantile(BAND_QUANTILES[0])[lead]
        rows["upper"][i] = forecast.quantile(BAND_QUANTILES[1])[lead]
        rows["replicas"][i] = predictive.replicas if predictive.replicas is not None else np.nan
        rows["reactive"][i] = reactive.replicas if reactive.replicas is not None else np.nan
        rows["reactive_plan"][i] = filled[t]
        fc_mean[i], fc_lower[i] = forecast.mean, forecast.quantile(BAND_QUANTILES[0])
        fc_upper[i] = forecast.quantile(BAND_QUANTILES[1])
        if progress is not None:
            progress(i + 1, count)

    # Decision i (made at the end of t = first + i) is ready in u = t + 1 + L, from u = start.
    ready = index[first + 1 + lead : last + 2 + lead]
    demand = grid.demand.to_numpy()[first + 1 + lead : last + 2 + lead]
    target = config.target
    sim.decisions = pd.DataFrame(
        {
            "timestamp": ready,
            "demand": demand,
            "forecast": rows["forecast"],
            "forecast_at_quantile": rows["at_quantile"],
            "replicas": rows["replicas"],
            "reactive_replicas": rows["reactive"],
            "oracle_replicas": [
                oracle_replicas(d, target) if np.isfinite(d) else np.nan for d in demand
            ],
            "slo_level": rows["level"],
            "forecast_mean": rows["mean"],
            "lower": rows["lower"],
            "upper": rows["upper"],
        }
    )
    sim.planned_reactive = rows["reactive_plan"]
    sim.controller = controller
    origins = index[first : last + 1]
    steps = np.arange(1, horizon + 1)
    sim.forecasts = pd.DataFrame(
        {
            "origin": np.repeat(origins, horizon),
            "timestamp": np.repeat(origins, horizon) + np.tile(steps, count) * config.step,
            "step_ahead": np.tile(steps, count),
            "yhat": fc_mean.ravel(),
            "lower": fc_lower.ravel(),
            "upper": fc_upper.ravel(),
            "model": np.repeat(model_names, horizon),
        }
    )
    return sim


def _history_before(grid: RegularSeries, live: pd.Series, end: int) -> pd.Series:
    """The grid before position `end` as a grid cut there would fill it: a gap still running
    at `end` is held if it is short so far, even when the full grid knows it turns out long."""
    history = grid.filled.iloc[:end]
    missing = grid.demand.iloc[:end].isna().to_numpy()
    running = int(np.argmin(missing[::-1])) if not missing.all() else len(missing)
    if 0 < running <= grid.max_fill_steps:
        history = pd.concat([history.iloc[:-running], live.iloc[end - running : end]])
    return history


def _record_selection(sim: Simulation, previous: object, fitted: object) -> None:
    """Keep each new model selection (`auto`): the choice and every candidate's scores."""
    selection = getattr(fitted, "selection_", None)
    if selection is None:
        return
    before = getattr(previous, "selection_", None)
    if before is None or before.selected_at != selection.selected_at:
        sim.selections.append(selection.as_dict())
