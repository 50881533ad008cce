"""Conformal calibration of forecast intervals from out-of-sample errors, per horizon.

A model's own error sample (in-sample residuals, a parametric h-step formula) is often too
narrow or too wide. Here every forecast is scored when its target arrives: the score is its
residual (actual - mean) divided by the square root of the forecast level, and the calibrated
interval at horizon h is the mean plus the quantiles of the last window's h-step scores times
the square root of the level now: split-conformal, per horizon.

Why the square root of the level: request counts are Poisson-like, their noise grows like the
square root of their level, so scores measured in it compare between night and day and across
a level shift. The model's own spread is no scale to measure in: it comes from the model's
fit window and moves when that window crosses a change of regime. On a trace whose volatility
fell fiftyfold in a day, scores divided by a spread from before the fall, applied to a spread
from after it, gave an 80% interval that covered 7% of points (81% now). Plain residuals
under-cover a rising level (70% on a week of growing traffic; 79% now), and residuals
divided by the level itself over-cover (88%) at a higher cost.

>>> model = Calibrated(step, HoltWinters(step), horizon=2).fit(history)   # doctest: +SKIP
>>> model.update(new_points).predict(2, quantiles=[0.1, 0.9])              # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections import deque

import numpy as np
import pandas as pd

from forecaster.models.base import ForecastModel

CALIBRATION_WINDOW = pd.Timedelta(days=3)
SEED_WINDOW = pd.Timedelta(days=1)
MIN_SCORES = 72
SPREAD_QUANTILES = (0.1, 0.9)


def level_scale(levels: np.ndarray, floor: float) -> np.ndarray:
    """The unit scores are measured in: the square root of each forecast level, clipped to
    [floor, inf) first (see the module docstring)."""
    return np.sqrt(np.maximum(levels, floor))


def spread_of(errors: np.ndarray, floor: float) -> np.ndarray:
    """Half the 10-90% width of each horizon's error sample (h, n) -> (h,), at least `floor`."""
    if errors.size == 0:
        return np.full(errors.shape[0], floor)
    lo, hi = np.quantile(errors, SPREAD_QUANTILES, axis=1)
    return np.maximum((hi - lo) / 2.0, floor)


def resample(sample: np.ndarray, n: int) -> np.ndarray:
    """n values with (nearly) the same quantiles as `sample`, so samples can share an array."""
    if len(sample) == n:
        return np.sort(sample)
    return np.quantile(sample, np.linspace(0.0, 1.0, n))


def scale_floor(values: np.ndarray) -> float:
    """The smallest spread a forecast may claim: a sliver of the series' typical level."""
    finite = np.abs(values[np.isfinite(values)])
    typical = float(finite.mean()) if finite.size else 0.0
    return 1e-3 * typical + 1e-9


class ScoreWindow:
    """The last `capacity` scores, oldest first, in one array: the service keeps several per
    target between refits, and a deque of Python floats took four times the memory. Scores
    that are always small integers (0 or 1 flags, offsets in seconds) can be kept in an
    integer `dtype`; a value that type cannot hold exactly turns the window into floats."""

    __slots__ = ("_data", "_next", "_size")

    def __init__(self, capacity: int, dtype: type[np.generic] = np.float64) -> None:
        self._data = np.empty(max(1, capacity), dtype=dtype)
        self._size = 0
        self._next = 0  # where the next score goes

    def __len__(self) -> int:
        return self._size

    def append(self, score: float) -> None:
        data = self._data
        if data.dtype.kind in "iu" and not _holds(data.dtype, score):
            data = self._data = data.astype(np.float64)
        data[self._next] = score
        self._next = (self._next + 1) % data.size
        self._size = min(self._size + 1, data.size)

    def extend(self, scores: np.ndarray) -> None:
        for score in scores[-self._data.size :]:
            self.append(float(score))

    def values(self) -> np.ndarray:
        """A copy of the scores, oldest first, as floats."""
        if self._size < self._data.size:
            return self._data[: self._size].astype(np.float64)
        return np.roll(self._data, -self._next).astype(np.float64, copy=False)


def _holds(dtype: np.dtype, value: float) -> bool:
    """Whether an integer `dtype` holds `value` exactly."""
    bounds = np.iinfo(dtype)
    return float(value).is_integer() and bounds.min <= value <= bounds.max


class ScoreTracker:
    """Follows a fitted model through new observations and scores its past forecasts.

    Before each observation is folded in, the forecasts made at the previous `horizon`
    origins are scored against it; then the model is updated and forecasts again. Scores are
    residuals in units of the level's square root, (actual - mean) / level_scale(mean), kept
    per horizon for the last `window` origins. Only values the
    model has been given are ever compared, so the scores are out of sample. A `window` of 0
    keeps none, for a model that serves its own interval (`calibrated` is then not called).
    """

    def __init__(self, model: ForecastModel, horizon: int, window: int, floor: float) -> None:
        self.model = model
        self.horizon = horizon
        self.floor = floor
        self.scores = [ScoreWindow(window) for _ in range(horizon)] if window > 0 else []
        self.pending: deque[np.ndarray] = deque(maxlen=horizon)  # means, newest first
        self._latest: tuple[np.ndarray, np.ndarray] | None = None
        self._forecast()

    def _forecast(self) -> None:
        mean, errors = self.model._predict(self.horizon)
        self._latest = (mean, errors)
        self.pending.appendleft(mean)

    def forecast(self, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """The model's mean and errors for the next `horizon` steps.

        The forecast made with the last observation is handed out once, then let go: the
        service asks once per new point, and keeping its error sample until the next point
        would hold 32 KB per target for nothing. A second call recomputes the same values."""
        latest, self._latest = self._latest, None
        if latest is not None and horizon <= self.horizon:
            mean, errors = latest
            return mean[:horizon], errors[:horizon]
        return self.model._predict(horizon)

    def __getstate__(self) -> dict[str, object]:
        # The forecast waiting to be handed out is recomputed on demand: pickled (a fit's
        # result, a refit request, saved state) it would add its error sample, 32 KB.
        return {**self.__dict__, "_latest": None}

    def observe(self, values: np.ndarray) -> None:
        for y in values:
            if self.scores and np.isfinite(y):
                for h, mean in enumerate(self.pending):
                    level = max(float(mean[h]), 0.0)
                    score = (y - level) / level_scale(np.array(level), self.floor)
                    self.scores[h].append(float(score))
            self.model._update(np.array([y]))
            self._forecast()

    def carry_scores(self, other: ScoreTracker) -> None:
        """Start from another tracker's scores (same horizons), e.g. after a refit."""
        for mine, theirs in zip(self.scores, other.scores, strict=False):
            mine.extend(theirs.values())

    def calibrated(self, horizon: int, min_scores: int) -> tuple[np.ndarray, np.ndarray]:
        """The model's mean and errors, with calibrated errors where enough scores exist."""
        mean, errors = self.forecast(horizon)
        ready = [h for h in range(min(horizon, self.horizon)) if len(self.scores[h]) >= min_scores]
        if not ready:
            return mean, errors
        n = min(len(self.scores[h]) for h in ready)
        rows = []
        for h in range(horizon):
            if h in ready:
                scale = level_scale(np.maximum(mean[h], 0.0), self.floor)
                rows.append(np.sort(self.scores[h].values()[-n:]) * scale)
            else:
                # Beyond the calibrated horizons: the model's own sample, widened as much as
                # the last calibrated horizon's residuals are wider than its own sample there.
                last = ready[-1]
                own = float(spread_of(errors[last : last + 1], self.floor)[0])
                scale = level_scale(np.maximum(mean[last], 0.0), self.floor)
                ratio = _calibrated_width(self.scores[last]) * scale / own
                rows.append(resample(errors[h], n) * ratio)
        return mean, np.vstack(rows)


def calibrated_path(
    means: np.ndarray, held: np.ndarray, quantile: float, window: int, floor: float,
    min_scores: int,
) -> np.ndarray:
    """The band at `quantile` a ScoreTracker would give at each origin of a run through
    `held` (origin k has seen held[:k], means[k] forecasts held[k : k + horizon]): the mean
    plus the quantile of the scores known at k (the last `window` origins' of each horizon)
    times the level's scale; NaN where fewer than `min_scores` are known. The window counts
    origins rather than finite scores, which differs from the tracker only across gaps."""
    n, horizon = means.shape
    band = np.full((n, horizon), np.nan)
    origins = np.arange(n)
    for h in range(horizon):
        levels = np.maximum(means[: n - h, h], 0.0)
        scores = (held[h:] - levels) / level_scale(levels, floor)
        rolled = (
            pd.Series(scores).rolling(window, min_periods=min_scores).quantile(quantile)
        ).to_numpy()
        known = origins - 1 - h  # the newest origin whose h-step target origin k has seen
        offset = np.full(n, np.nan)
        offset[known >= 0] = rolled[known[known >= 0]]
        level = np.maximum(means[:, h], 0.0)
        band[:, h] = np.maximum(level + offset * level_scale(level, floor), 0.0)
    return band


def _calibrated_width(scores: ScoreWindow) -> float:
    lo, hi = np.quantile(scores.values(), SPREAD_QUANTILES)
    return float(hi - lo) / 2.0


class Calibrated(ForecastModel):
    """Any model with conformal per-horizon intervals (see the module docstring).

    `fit` first fits a copy on all but the last `validation` of history and runs it through
    that stretch to collect out-of-sample scores, then fits the model on everything. Between
    refits, `update` keeps scoring; `warm_start(previous)` carries the scores over a refit.
    """

    def __init__(
        self,
        step: pd.Timedelta,
        model: ForecastModel,
        *,
        horizon: int = 2,
        window: pd.Timedelta = CALIBRATION_WINDOW,
        validation: pd.Timedelta = SEED_WINDOW,
        min_scores: int = MIN_SCORES,
    ) -> None:
        super().__init__(step)
        self.model = model
        self.horizon = horizon
        self.window = pd.Timedelta(window)
        self.validation = pd.Timedelta(validation)
        self.min_scores = min_scores
        self.name = model.name

    def min_history(self) -> int:
        return self.model.min_history()

    def warm_start(self, previous: ForecastModel) -> None:
        if isinstance(previous, Calibrated) and hasattr(previous, "tracker_"):
            self.previous_tracker_: ScoreTracker | None = previous.tracker_

    def _fit(self, values: np.ndarray) -> None:
        window = max(1, int(self.window / self.step))
        floor = scale_floor(values)
        previous = getattr(self, "previous_tracker_", None)
        if previous is None:
            held = int(self.validation / self.step)
            if np.isfinite(values[:-held]).sum() >= self.model.min_history() and held > 0:
                seed = _clone(self.model)
                seed.fit_start_ = self.fit_start_
                seed._fit(values[:-held])
                previous = ScoreTracker(seed, self.horizon, window, floor)
                previous.observe(values[-held:])
        self.model.fit_start_ = self.fit_start_
        self.model._fit(values)
        self.tracker_ = ScoreTracker(self.model, self.horizon, window, floor)
        if previous is not None:
            self.tracker_.carry_scores(previous)
        self.previous_tracker_ = None

    def _update(self, values: np.ndarray) -> None:
        self.tracker_.observe(values)

    def _predict(self, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        return self.tracker_.calibrated(horizon, self.min_scores)


def _clone(model: ForecastModel) -> ForecastModel:
    """An independent copy to fit on a shorter history; its fit overwrites any learned state."""
    return copy.deepcopy(model)
