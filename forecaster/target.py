"""One live target: its spec, history, model and published snapshot, and how it is named.

A target's mutable parts change only under its lock, in the engine's threads; readers take
the immutable `Snapshot` without one. What a refresh reads is folded in here, and a new
snapshot published from the model's forecast and the plan. Each decision-horizon forecast
is kept until its bin arrives and then scored, so the service reports how its recent
forecasts fared.
"""

from __future__ import annotations

import copy
import logging
import math
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from forecaster.config import EngineSettings
from forecaster.durations import format_duration
from forecaster.errors import ForecasterError, NotReadyError
from forecaster.fitting import FitRequest
from forecaster.models import Forecast, ForecastModel
from forecaster.models.calibration import ScoreWindow
from forecaster.models.reselection import reselection_due, reselection_phase
from forecaster.policy import (
    ForecastSmoother,
    PlannedLoad,
    ScalingPolicy,
    plan,
    smoothing_weight,
)
from forecaster.series import GridBuffer, mask_windows
from forecaster.slo import ShareScorer, SloController
from forecaster.sources import HistorySource
from forecaster.spec import TriggerSpec
from forecaster.windows import scheduled_minimum

log = logging.getLogger(__name__)

BAND_QUANTILES = (0.05, 0.1, 0.5, 0.9, 0.95)  # the forecast's published quantiles, and the spec's
ACCURACY_WINDOW = 288  # decision-horizon forecasts scored against what then happened
SHARE_WINDOWS = {"1d": 86_400, "7d": 7 * 86_400}  # the achieved share is reported over these
# Through an outage the plan holds at least this quantile (or the spec's, if higher), times
# exp(the SLO level + OUTAGE_MARGIN): bench/README.md, "Outages", has the figures behind both.
OUTAGE_QUANTILE = 0.95
OUTAGE_MARGIN = 0.1


def target_labels(target_id: str) -> tuple[str, str, str]:
    """(namespace, name, metric) of a `namespace/name/metric` id.

    The metric name never holds a slash (trigger metadata forbids it) and a namespace is a
    DNS label, so a slash in the middle part belongs to the name.
    """
    namespace, _, rest = target_id.partition("/")
    name, _, metric = rest.rpartition("/")
    return namespace, name, metric


@dataclass(frozen=True)
class Accuracy:
    """How the decision-horizon forecasts of the last ACCURACY_WINDOW intervals fared."""

    scored: int
    mae: float | None
    coverage_80: float | None
    last_abs_error: float | None


@dataclass(frozen=True)
class Outage:
    """The source stopped answering at `since` (epoch seconds); `path` is what the model then
    forecast, far enough ahead to plan from to the end of outageHorizon (None: no model)."""

    since: float
    path: Forecast | None
    quantile: float


def outage_quantile(spec: TriggerSpec) -> float:
    """The quantile an outage plan holds: OUTAGE_QUANTILE, or the spec's when higher."""
    return max(OUTAGE_QUANTILE, spec.quantile)


def outage_factor(level: float) -> float:
    """The factor on the outage path's quantile: OUTAGE_MARGIN above `level`, the SLO
    controller's log-factor on the target's plans (0 without one)."""
    return math.exp(level + OUTAGE_MARGIN)


@dataclass(frozen=True)
class Snapshot:
    """What a target knows at one moment; replaced whole, never mutated."""

    current_value: float | None = None
    current_time: float | None = None  # when the current value was read (epoch seconds)
    forecast: Forecast | None = None
    model: str | None = None
    fitted_at: float | None = None
    planned: PlannedLoad | None = None
    last_error: str | None = None
    history_points: int = 0
    share: ShareHeld | None = None
    outage: Outage | None = None  # set while the source cannot be reached
    forecast_made_at: float | None = None  # when `forecast` was predicted (epoch seconds)


@dataclass(frozen=True)
class ShareHeld:
    """How a target holds its maxUnderProvisioned: the share asked, the share of judged
    intervals short of capacity over each of SHARE_WINDOWS (None before the first), and the
    controller's level (the log of its factor on the plan)."""

    asked: float
    level: float
    achieved: dict[str, float | None]
    judged: dict[str, int]


@dataclass
class Target:
    """One forecast target; mutable parts change only under `lock`, in the engine's threads."""

    target_id: str
    spec: TriggerSpec
    source: HistorySource
    configured: bool = False
    created_at: float = 0.0  # the engine's time when it was registered
    snapshot: Snapshot = field(default_factory=Snapshot)
    last_requested: float = 0.0
    next_refresh: float = 0.0
    next_refit: float = math.inf
    refreshing: bool = False
    fit_pending: bool = False
    fits: int = 0
    fit_failures: int = 0
    fallbacks: int = 0
    refresh_failures: int = 0
    fit_seconds: list[float] = field(default_factory=list)
    spec_conflict: TriggerSpec | None = None
    scores: AccuracyKeeper = field(default_factory=lambda: AccuracyKeeper())
    first_value: threading.Event = field(default_factory=threading.Event)  # first refresh done
    first_value_callbacks: list[Callable[[], None]] = field(default_factory=list)
    first_value_lock: threading.Lock = field(default_factory=threading.Lock)  # for those two
    lock: threading.Lock = field(default_factory=threading.Lock)
    clock: Callable[[], float] = time.time  # the engine's, for when a forecast was made
    unsaved: bool = True  # changed since its state was last saved (forecaster.state)
    model_token: str | None = None  # the saved model file the current model is in
    model_saved_through: pd.Timestamp | None = None  # the saved model's newest bin
    restored: bool = False  # the model came from saved state and has not been refitted since
    retired: bool = False  # dropped or replaced: no longer in the registry, never saved again

    def __post_init__(self) -> None:
        step = pd.Timedelta(seconds=self.spec.step_seconds)
        self.buffer = GridBuffer(step, pd.Timedelta(seconds=self.spec.history_window_seconds))
        self.smoother = ForecastSmoother(
            smoothing_weight(self.spec.step_seconds, self.spec.plan_half_life_seconds),
            self.spec.step_seconds,
        )
        controller = controller_for(self.spec, self.lead_steps)
        self.share_keeper = ShareKeeper(controller, self.spec.step_seconds) if controller else None
        self.model: ForecastModel | None = None
        # The model and origin the published forecast came from: a refresh that adds no new
        # point (most of them, with a 30 s refresh and a 5 m step) reuses that forecast.
        self.forecast_made_by: tuple[ForecastModel, pd.Timestamp] | None = None
        # Restored from saved state: the newest bin that state had seen, until the first
        # refresh folds in the history read since (see fold_in).
        self.resuming = False
        self.resumed_through: pd.Timestamp | None = None

    @property
    def step(self) -> pd.Timedelta:
        return self.buffer.step

    def mark_first_value(self) -> None:
        """The first refresh is done (a value or an error): wake everyone waiting for it."""
        with self.first_value_lock:
            self.first_value.set()
            callbacks, self.first_value_callbacks = self.first_value_callbacks, []
        for callback in callbacks:
            callback()

    def when_first_value(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from any thread) once the first refresh is done; at once if it is."""
        with self.first_value_lock:
            if not self.first_value.is_set():
                self.first_value_callbacks.append(callback)
                return
        callback()

    @property
    def lead_steps(self) -> int:
        return math.ceil(self.spec.startup_seconds / self.spec.step_seconds)

    def accuracy(self) -> Accuracy:
        return self.scores.summary()

    # -- what the engine's threads do to a target ------------------------------------------

    def training_view(self, points: pd.Series) -> pd.Series:
        """What the models see: bins in the target's excludeFromTraining windows missing."""
        return mask_windows(points, self.spec.step_seconds, self.spec.exclude_from_training)

    def fold_in(self, points: pd.Series, current: tuple[float, float], freshness: float) -> None:
        """Add what a refresh read, bring the model up to date and publish; under `lock`."""
        end_outage(self)
        added = self.buffer.extend(points)
        resuming, self.resuming = self.resuming, False
        if resuming and self.resumed_through is not None:
            # The first refresh after a restore reads the whole window: the accuracy and the
            # SLO keeper have seen the bins up to their save (the model, up to its fit).
            added = added[added.index > self.resumed_through]
        self.resumed_through = None
        self.scores.score_arrivals(added)
        if self.share_keeper is not None:
            self.share_keeper.judge(added)
        if resuming:
            self.resume_model()
        elif self.model is not None and not added.empty:
            try:
                self.model.update(self.training_view(added))
            except ForecasterError as exc:
                log.warning("update of %s failed, refitting: %s", self.target_id, exc)
                self.model = None
        self.unsaved = True
        self.publish(current, freshness)
        self.mark_first_value()

    def resume_model(self) -> None:
        """Bring a restored model up to the newest bin, or drop it (to refit) when the history
        read no longer reaches back to its last bin or it cannot be updated; under `lock`."""
        model = self.model
        if model is None:
            return
        series = self.buffer.series()
        gap = series.index[0] - model.last_timestamp_ if len(series) else None
        if gap is None or gap > self.step:
            log.info("target %s: the history read starts after its saved model's last bin "
                     "%s; refitting", self.target_id, model.last_timestamp_.isoformat())
            self.drop_restored_model()
            return
        try:
            self.catch_up(model)
        except ForecasterError as exc:
            log.warning("saved model of %s could not catch up, refitting: %s",
                        self.target_id, exc)
            self.drop_restored_model()

    def drop_restored_model(self) -> None:
        self.model = None
        self.model_token = None
        self.restored = False
        self.snapshot = replace(self.snapshot, fitted_at=None, model=None)

    def fit_request(self) -> FitRequest:
        """What a worker needs to refit this target; under `lock`, so that the model it
        replaces is pickled as a consistent copy. Once the target's second of the day has
        passed since its model was selected, the model is left out and the worker selects
        afresh (forecaster.models.reselection)."""
        series = self.training_view(self.buffer.series())
        previous = self.model
        if reselection_due(previous, reselection_phase(self.target_id), series.index[-1]):
            previous = None
        return FitRequest(
            model=self.spec.model,
            step_seconds=self.spec.step_seconds,
            start=series.index[0],
            values=series.to_numpy(),
            quantile=self.spec.quantile,
            horizon=1 + self.lead_steps,
            previous=pickle.dumps(previous) if previous is not None else None,
            time_zone=self.spec.time_zone,
            scorer=(
                ShareScorer.of(self.share_keeper.controller, self.spec.plan_half_life_seconds)
                if self.share_keeper is not None else None
            ),
        )

    def catch_up(self, model: ForecastModel) -> None:
        """Bring a fitted model up to the newest bin (it was fitted on an older copy); under
        `lock`. ForecasterError when it cannot."""
        newer = self.training_view(self.buffer.series())
        model.update(newer[newer.index > model.last_timestamp_])

    def adopt(self, model: ForecastModel, now: float, freshness: float) -> None:
        """Make a caught-up model the target's and publish its forecast; under `lock`."""
        self.model = model
        self.restored = False
        self.unsaved = True
        self.snapshot = replace(self.snapshot, fitted_at=now, model=model.chosen_name)
        current = self.snapshot.current_value
        if current is not None and self.snapshot.current_time is not None:
            self.publish((self.snapshot.current_time, current), freshness)

    def publish(self, current: tuple[float, float], freshness: float) -> None:
        """Predict from the model (if any) and swap in a new snapshot; under `lock`.
        `freshness` is the target's freshness_limit."""
        spec = self.spec
        horizon = 1 + self.lead_steps
        forecast = None
        made_at = None
        error = None
        model = self.model
        if model is not None:
            behind = current[0] - model.last_timestamp_.timestamp()
            if behind > freshness + spec.step_seconds:
                # New points stopped arriving while the current value still does: a forecast
                # from the old origin would plan for a time already past. Serve reactively.
                error = f"history is {behind:.0f}s behind the current value; serving it"
            elif (self.snapshot.forecast is not None
                  and self.forecast_made_by == (model, model.last_timestamp_)):
                forecast = self.snapshot.forecast  # no new point since: the same forecast
                made_at = self.snapshot.forecast_made_at
            else:
                try:
                    quantiles = sorted({*BAND_QUANTILES, spec.quantile})
                    forecast = model.predict(horizon, quantiles)
                    made_at = self.clock()
                    self.forecast_made_by = (model, model.last_timestamp_)
                except Exception as exc:  # a broken model must not stop the target: refit it
                    log.exception("prediction for %s failed; refitting", self.target_id)
                    self.model = None
                    self.fit_failures += 1
                    error = f"prediction failed: {exc}"
        if forecast is not None:
            self.scores.expect(forecast)
        last_point = self.reading_before(current[0])
        planned = plan(forecast, current[1], spec.quantile, horizon,
                       smoother=self.smoother, last_point=last_point)
        # A scheduled event counts from now to the end of the interval new pods will serve.
        replicas = scheduled_minimum(
            spec.scheduled_min_replicas, current[0], current[0] + horizon * spec.step_seconds
        )
        if self.share_keeper is not None and self.buffer.last is not None:
            planned = self.share_keeper.hold(planned, self.buffer.last)
        if replicas is not None:
            minimum = replicas * spec.target_value
            planned = replace(planned, value=max(planned.value, minimum),
                              scheduled_minimum=minimum)
        self.snapshot = Snapshot(
            current_value=current[1],
            current_time=current[0],
            forecast=forecast,
            model=self.snapshot.model,
            fitted_at=self.snapshot.fitted_at,
            planned=planned,
            last_error=error,
            history_points=len(self.buffer),
            share=self.share_keeper.status() if self.share_keeper is not None else None,
            outage=self.snapshot.outage,
            forecast_made_at=made_at,
        )

    def reading_before(self, current_time: float) -> float:
        """The grid point before the current reading, for the floor's "last two readings":
        the last one, unless the current reading is that point itself (NaN when none)."""
        values, last = self.buffer.values, self.buffer.last
        if last is not None and current_time <= last.timestamp():
            return float(values[-2]) if len(values) > 1 else math.nan
        return float(values[-1]) if len(values) else math.nan


class AccuracyKeeper:
    """Each decision-horizon forecast, kept until its bin arrives and then scored: the last
    ACCURACY_WINDOW absolute errors, and 1.0 for each actual inside the 80% interval."""

    def __init__(self, window: int = ACCURACY_WINDOW) -> None:
        self.pending: dict[pd.Timestamp, tuple[float, float, float]] = {}
        self.abs_errors = ScoreWindow(window)
        self.inside_80 = ScoreWindow(window, np.uint8)  # 0 or 1: a byte each

    def summary(self) -> Accuracy:
        errors = self.abs_errors.values()
        if not errors.size:
            return Accuracy(0, None, None, None)
        return Accuracy(
            scored=int(errors.size),
            mae=float(np.mean(errors)),
            coverage_80=float(np.mean(self.inside_80.values())),
            last_abs_error=float(errors[-1]),
        )

    def record_score(self, abs_error: float, inside_80: bool) -> None:
        """One decision-horizon forecast scored against what then happened."""
        self.abs_errors.append(abs_error)
        self.inside_80.append(1.0 if inside_80 else 0.0)

    def expect(self, forecast: Forecast) -> None:
        """Keep the forecast's decision-horizon bin, to score when that bin arrives."""
        self.pending[forecast.timestamps[-1]] = (
            float(forecast.mean[-1]),
            float(forecast.quantile(0.1)[-1]),
            float(forecast.quantile(0.9)[-1]),
        )

    def score_arrivals(self, added: pd.Series) -> None:
        """Score the decision-horizon forecasts made for bins that have now arrived."""
        for timestamp, actual in added.items():
            made = self.pending.pop(pd.Timestamp(timestamp), None)  # type: ignore[arg-type]
            if made is not None and np.isfinite(actual):
                mean, low, high = made
                self.record_score(abs(float(actual) - mean), low <= actual <= high)
        if self.pending and len(added):
            newest = added.index[-1]
            self.pending = {t: v for t, v in self.pending.items() if t > newest}


class ShareKeeper:
    """A target's maxUnderProvisioned: its controller, the decisions it judged over the last
    week, and the origin of its latest decision. Calls come under the target's lock."""

    def __init__(self, controller: SloController, step_seconds: int) -> None:
        self.controller = controller
        self.step_seconds = step_seconds
        # 1 per judged interval that ran short, 0 per interval served: the last week, with
        # each interval's start beside it for the page's plot, as the steps from the judged
        # interval before (0 for the first; 1 but where a gap left bins unjudged), and the
        # newest start in epoch seconds: a byte and two a week's interval rather than sixteen.
        week = max(1, SHARE_WINDOWS["7d"] // step_seconds)
        self.shortfalls = ScoreWindow(week, np.uint8)
        self.judged_gaps = ScoreWindow(week, np.uint16)
        self.judged_last: float | None = None
        self.decided_at: pd.Timestamp | None = None

    def __setstate__(self, state: dict[str, object]) -> None:
        # Saved with each start as seconds after `judged_origin` (or, before that, as epoch
        # seconds): the same starts, as steps between them.
        times = state.pop("judged_times", None)
        origin = state.pop("judged_origin", 0.0)
        self.__dict__.update(state)
        if isinstance(times, ScoreWindow):
            starts = times.values() + (origin or 0.0)
            week = max(1, SHARE_WINDOWS["7d"] // self.step_seconds)
            self.judged_gaps = ScoreWindow(week, np.uint16)
            self.judged_gaps.extend(np.diff(starts, prepend=starts[:1]) / self.step_seconds)
            self.judged_last = float(starts[-1]) if starts.size else None

    def judge(self, added: pd.Series) -> None:
        """Tell the controller each new interval's demand, in order, so that it judges the
        decision that was ready in it. Intervals that arrived together past the first had no
        decision of their own: each gets a held one, which keeps decisions and intervals in
        step."""
        if self.decided_at is None:
            return  # no decision yet: nothing to judge
        controller = self.controller
        starts = added.index
        for position, demand in enumerate(added.to_numpy(dtype=float)):
            if position:
                controller.decide(math.nan)
            judged, short = controller.intervals, controller.misses
            controller.observe(float(demand))
            if controller.intervals > judged:
                self.shortfalls.append(float(controller.misses > short))
                start = pd.Timestamp(starts[position]).timestamp()
                last, self.judged_last = self.judged_last, start
                steps = 0.0 if last is None else (start - last) / self.step_seconds
                self.judged_gaps.append(steps)

    def hold(self, planned: PlannedLoad, origin: pd.Timestamp) -> PlannedLoad:
        """The plan the controller serves, and counts as its decision for the interval it
        will be ready in: a later plan at the same origin (a refresh between two points, a
        refit landing) replaces that decision, so the last plan made is the one judged."""
        if origin != self.decided_at:
            served = self.controller.decide(planned.value)
            self.decided_at = origin
        else:
            served = self.controller.redecide(planned.value)
        return replace(planned, value=served, slo_level=self.controller.level)

    def history(self) -> tuple[np.ndarray, np.ndarray]:
        """The judged intervals of the last week, oldest first: their starts (epoch seconds)
        and 1.0 for each that ran short, 0.0 for each served; copies."""
        gaps = self.judged_gaps.values()
        steps_after = np.cumsum(gaps[::-1])[::-1] - gaps  # from each start to the newest
        newest = self.judged_last if self.judged_last is not None else 0.0
        return newest - steps_after * self.step_seconds, self.shortfalls.values()

    def status(self) -> ShareHeld:
        shortfalls = self.shortfalls.values()
        achieved: dict[str, float | None] = {}
        judged: dict[str, int] = {}
        for window, seconds in SHARE_WINDOWS.items():
            recent = shortfalls[-max(1, seconds // self.step_seconds):]
            judged[window] = int(recent.size)
            achieved[window] = float(recent.mean()) if recent.size else None
        controller = self.controller
        return ShareHeld(controller.share, controller.level, achieved, judged)


def controller_for(spec: TriggerSpec, lead_steps: int) -> SloController | None:
    """The target's maxUnderProvisioned controller, replaying the HPA arithmetic of the
    trigger's targetValue and scaleDownStabilization; None for a fixed quantile."""
    if spec.max_under_provisioned is None:
        return None
    policy = ScalingPolicy(
        target_per_replica=spec.target_value,
        stabilization_steps=max(
            1, math.ceil(spec.scale_down_stabilization_seconds / spec.step_seconds)
        ),
    )
    return SloController(spec.max_under_provisioned, policy, lead_steps)


def freshness_limit(settings: EngineSettings, spec: TriggerSpec) -> float:
    """Seconds a forecast stays usable after its newest data: max(2 x refresh, 2 x step)."""
    return max(2 * settings.refresh_seconds, 2 * spec.step_seconds)


# -- through an outage of the source ------------------------------------------------------

def outage_path(target: Target, model: ForecastModel, now: float, freshness: float) -> Forecast:
    """What `model` forecasts from its last bin to the interval that pods started at the
    end of an outage beginning `now` would serve: the end of outageHorizon, or of the
    data's freshness if later. Predicts only; call with a copy of the model, unlocked."""
    spec, step = target.spec, target.spec.step_seconds
    current_time = target.snapshot.current_time
    end = now + spec.outage_horizon_seconds
    if current_time is not None:
        end = max(end, current_time + freshness)
    elapsed = (math.floor(end / step) * step - model.last_timestamp_.timestamp()) // step
    quantiles = sorted({*BAND_QUANTILES, spec.quantile, outage_quantile(spec)})
    return model.predict(max(0, int(elapsed)) + 1 + target.lead_steps, quantiles)

def outage_plan(target: Target, snapshot: Snapshot, now: float) -> PlannedLoad | None:
    """The load to plan for at `now` from the snapshot's outage path, for the interval
    pods started now would serve; None when the path does not reach it."""
    outage = snapshot.outage
    if outage is None or outage.path is None:
        return None
    path, spec, horizon = outage.path, target.spec, 1 + target.lead_steps
    step = spec.step_seconds
    elapsed = max(0, int((math.floor(now / step) * step - path.origin.timestamp()) // step))
    if elapsed + horizon > path.horizon:
        return None
    ahead = Forecast(  # the path as if forecast from the bin that is the newest now
        origin=path.origin + elapsed * path.step,
        step=path.step,
        mean=path.mean[elapsed:],
        quantiles={q: values[elapsed:] for q, values in path.quantiles.items()},
        model=path.model,
    )
    current = snapshot.current_value if snapshot.current_value is not None else math.nan
    planned = plan(ahead, current, outage.quantile, horizon, reactive_floor=False)
    keeper = target.share_keeper  # the controller's level on this target's plans, if any
    level = keeper.controller.level if keeper is not None else 0.0
    planned = replace(planned, value=planned.value * outage_factor(level), floor=math.nan,
                      mode="outage", outage_since=outage.since)
    replicas = scheduled_minimum(spec.scheduled_min_replicas, now, now + horizon * step)
    if replicas is not None:
        minimum = replicas * spec.target_value
        planned = replace(planned, value=max(planned.value, minimum),
                          scheduled_minimum=minimum)
    return planned

def end_outage(target: Target) -> None:
    """The source answers again: no outage plan from here on; under `lock`."""
    outage = target.snapshot.outage
    if outage is not None:
        target.snapshot = replace(target.snapshot, outage=None)
        began = datetime.fromtimestamp(outage.since, UTC).isoformat(timespec="seconds")
        log.info("target %s: its source answers again (the outage began at %s)",
                 target.target_id, began)


def begin_outage(target: Target, now: float, freshness: float) -> None:
    """Once per outage: keep the model's forecast far enough ahead to plan from through
    outageHorizon. The model is copied under the lock and predicts outside it; no fit."""
    horizon = target.spec.outage_horizon_seconds
    if horizon == 0 or target.snapshot.outage is not None:
        return
    with target.lock:
        model = copy.deepcopy(target.model)
    path = None
    if model is not None:
        try:
            path = outage_path(target, model, now, freshness)
        except Exception:  # the last plan still serves while fresh, as without a path
            log.exception("forecast through the outage of %s failed", target.target_id)
    with target.lock:
        target.snapshot = replace(
            target.snapshot, outage=Outage(now, path, outage_quantile(target.spec))
        )
    if path is None:
        log.warning("target %s: Prometheus cannot be reached and there is no model to "
                    "forecast from; its last plan serves while fresh", target.target_id)
    else:
        log.warning("target %s: Prometheus cannot be reached; serving the plan from its "
                    "model's forecast for up to outageHorizon %s", target.target_id,
                    format_duration(horizon))


def serve_through_outage(
    target: Target, snapshot: Snapshot, now: float, age: float, limit: float, retry: float
) -> PlannedLoad:
    """The plan from the outage path while the data are fresh or the outage is within
    outageHorizon; NotReadyError, naming both, after."""
    assert snapshot.outage is not None
    since, horizon = snapshot.outage.since, target.spec.outage_horizon_seconds
    planned = None
    if now - since <= horizon or age <= limit:
        planned = outage_plan(target, snapshot, now)
    if planned is None:
        began = datetime.fromtimestamp(since, UTC).isoformat(timespec="seconds")
        reason = f"; last error: {snapshot.last_error}" if snapshot.last_error else ""
        raise NotReadyError(
            f"target {target.target_id}: its Prometheus outage began at {began} and "
            f"outageHorizon is {format_duration(horizon)}, now past; its data are "
            f"{age:.0f}s old, over the {limit:.0f}s freshness limit{reason}",
            retry_after_seconds=retry,
        )
    return planned
