"""One live target: its spec, history, model and published snapshot, and how it is named.

A target's mutable parts change only under its lock, in the engine's threads; readers take
the immutable `Snapshot` without one. Each decision-horizon forecast is kept until its bin
arrives and then scored, so the service reports how its recent forecasts fared.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from forecaster.config import EngineSettings
from forecaster.models import Forecast, ForecastModel
from forecaster.models.calibration import ScoreWindow
from forecaster.policy import ForecastSmoother, PlannedLoad, smoothing_weight
from forecaster.series import GridBuffer
from forecaster.sources import HistorySource
from forecaster.spec import TriggerSpec

ACCURACY_WINDOW = 288  # decision-horizon forecasts scored against what then happened


def target_id(namespace: str, name: str, metric_name: str) -> str:
    """`namespace/name/metricName`, the id a ScaledObject's trigger maps to."""
    return f"{namespace}/{name}/{metric_name}"


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


@dataclass
class Target:
    """One forecast target; mutable parts change only under `lock`, in the engine's threads."""

    target_id: str
    spec: TriggerSpec
    source: HistorySource
    configured: bool = False
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
    pending: dict[pd.Timestamp, tuple[float, float, float]] = field(default_factory=dict)
    # decision-horizon forecasts scored as their bins arrive: absolute error, and 1.0 when
    # the actual fell inside the 80% interval
    abs_errors: ScoreWindow = field(default_factory=lambda: ScoreWindow(ACCURACY_WINDOW))
    inside_80: ScoreWindow = field(default_factory=lambda: ScoreWindow(ACCURACY_WINDOW))
    first_value: threading.Event = field(default_factory=threading.Event)  # first refresh done
    first_value_callbacks: list[Callable[[], None]] = field(default_factory=list)
    first_value_lock: threading.Lock = field(default_factory=threading.Lock)  # for those two
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        step = pd.Timedelta(seconds=self.spec.step_seconds)
        self.buffer = GridBuffer(step, pd.Timedelta(seconds=self.spec.history_window_seconds))
        self.smoother = ForecastSmoother(
            smoothing_weight(self.spec.step_seconds, self.spec.plan_half_life_seconds),
            self.spec.step_seconds,
        )
        self.model: ForecastModel | None = None
        # The model and origin the published forecast came from: a refresh that adds no new
        # point (most of them, with a 30 s refresh and a 5 m step) reuses that forecast.
        self.forecast_made_by: tuple[ForecastModel, pd.Timestamp] | None = None

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


def freshness_limit(settings: EngineSettings, spec: TriggerSpec) -> float:
    """Seconds a forecast stays usable after its newest data: max(2 x refresh, 2 x step)."""
    return max(2 * settings.refresh_seconds, 2 * spec.step_seconds)
