"""The one contract every model keeps, and the one shape of forecast they all return."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Self

import numpy as np
import pandas as pd

from forecaster.errors import InsufficientHistoryError, InvalidInputError, NotFittedError

DAY = pd.Timedelta(days=1)
WEEK = pd.Timedelta(days=7)


@dataclass(frozen=True)
class Forecast:
    """Per-step mean and quantiles for the `horizon` intervals after `origin`.

    `origin` is the start of the last observed interval; step k (1-based) forecasts the
    interval starting at origin + k * step. Values are demand, so never negative.
    """

    origin: pd.Timestamp
    step: pd.Timedelta
    mean: np.ndarray
    quantiles: dict[float, np.ndarray]
    model: str
    notes: tuple[str, ...] = field(default=())

    @property
    def horizon(self) -> int:
        return int(self.mean.shape[0])

    @property
    def timestamps(self) -> pd.DatetimeIndex:
        return pd.date_range(self.origin + self.step, periods=self.horizon, freq=self.step)

    def quantile(self, q: float) -> np.ndarray:
        """The forecast at quantile q; q must have been asked for in predict()."""
        try:
            return self.quantiles[q]
        except KeyError:
            asked = sorted(self.quantiles)
            raise InvalidInputError(
                "quantile", f"{q} was not computed; this forecast has {asked}"
            ) from None


def validate_quantiles(quantiles: Sequence[float]) -> tuple[float, ...]:
    for q in quantiles:
        if not 0.0 < q < 1.0:
            raise InvalidInputError("quantiles", f"each must be in (0, 1), got {q!r}")
    return tuple(sorted(set(float(q) for q in quantiles)))


class ForecastModel(ABC):
    """Parameters in __init__, learned state in fit (trailing underscore), cheap update.

    >>> model = SeasonalNaive(step=pd.Timedelta("5min")).fit(history)   # doctest: +SKIP
    >>> model.update(new_points).predict(2, quantiles=[0.9]).quantile(0.9)  # doctest: +SKIP

    `history` is a regular grid (see forecaster.series) that may contain NaN for long gaps.
    `update` folds in observations that follow the fitted history without refitting, so
    every decision between refits still sees every new observation.
    """

    name: str = "model"

    def __init__(self, step: pd.Timedelta) -> None:
        self.step = pd.Timedelta(step)

    @property
    def chosen_name(self) -> str:
        """The model whose forecasts these are: this one, or the one a selecting model chose,
        so that an operator sees what serves a target that asked for `auto`."""
        return self.name

    @abstractmethod
    def min_history(self) -> int:
        """Observed steps of history the model needs to fit."""

    @abstractmethod
    def _fit(self, values: np.ndarray) -> None: ...

    @abstractmethod
    def _update(self, values: np.ndarray) -> None: ...

    @abstractmethod
    def _predict(self, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean (h,) and the sorted out-of-sample errors per horizon (h, n) to take quantiles of."""

    def fit(self, history: pd.Series) -> Self:
        values = _grid_values(history, self.step, "history")
        observed = int(np.isfinite(values).sum())
        needed = self.min_history()
        if observed < needed:
            raise InsufficientHistoryError(f"model {self.name!r}", needed, observed)
        # Where values[0] sits in time, for models with calendar features (hour, weekday).
        self.fit_start_: pd.Timestamp = pd.Timestamp(history.index[0])
        self._fit(values)
        self.last_timestamp_: pd.Timestamp = pd.Timestamp(history.index[-1])
        return self

    def update(self, observations: pd.Series) -> Self:
        self._check_fitted()
        if observations.empty:
            return self
        self._update(self._continuation(observations))
        self.last_timestamp_ = pd.Timestamp(observations.index[-1])
        return self

    def _continuation(self, observations: pd.Series) -> np.ndarray:
        """The values of `observations`, checked to be a regular grid that starts one step
        after the fitted history."""
        first = pd.Timestamp(observations.index[0])
        expected = self.last_timestamp_ + self.step
        if first != expected:
            raise InvalidInputError(
                "observations",
                f"must continue the series at {expected.isoformat()}, start at {first.isoformat()}",
            )
        return _grid_values(observations, self.step, "observations")

    def predict(self, horizon: int, quantiles: Sequence[float] = ()) -> Forecast:
        self._check_fitted()
        if horizon < 1:
            raise InvalidInputError("horizon", f"must be at least 1 step, got {horizon}")
        qs = validate_quantiles(quantiles)
        mean, errors = self._predict(horizon)
        mean = np.maximum(mean, 0.0)
        if not errors.size or not qs:
            bands = {q: mean for q in qs}
        else:  # one call for every level: each np.quantile call sorts the errors again
            levels = np.quantile(errors, list(qs), axis=1)
            bands = {q: np.maximum(mean + levels[i], 0.0) for i, q in enumerate(qs)}
        return Forecast(self.last_timestamp_, self.step, mean, bands, self.name)

    def warm_start(self, previous: ForecastModel) -> None:
        """Before a refit: take over whatever `previous` (the model this one replaces) learned
        that is costly to relearn, e.g. a model selection. The default takes over nothing."""
        return None

    def _check_fitted(self) -> None:
        if not hasattr(self, "last_timestamp_"):
            raise NotFittedError(self.name)


def _grid_values(series: pd.Series, step: pd.Timedelta, field_name: str) -> np.ndarray:
    index = series.index
    if not isinstance(index, pd.DatetimeIndex):
        raise InvalidInputError(field_name, "must be indexed by timestamps")
    if len(index) > 1 and not (np.diff(index.as_unit("ns").asi8) == step.value).all():
        raise InvalidInputError(field_name, f"must be a regular grid of {step}; resample first")
    return series.to_numpy(dtype=float)


def error_sample(errors: np.ndarray) -> np.ndarray:
    """The finite errors of a fit, kept in float32 (a single 0.0 when there are none).

    A model keeps its error sample between refits, one per target in the service: float32
    halves that (2,016 residuals: 16 KB to 8 KB) and its 7 significant digits are far finer
    than any quantile of the sample can resolve. Arithmetic on it still runs in float64."""
    finite = errors[np.isfinite(errors)]
    return finite.astype(np.float32) if finite.size else np.zeros(1, dtype=np.float32)


def trailing_segment(model: ForecastModel, values: np.ndarray, window: int) -> np.ndarray:
    """The last `window` values after the last NaN (the recent stretch with no long gap);
    InsufficientHistoryError when it is shorter than the model's min_history."""
    recent = values[-max(model.min_history(), window):]
    missing = np.flatnonzero(~np.isfinite(recent))
    segment = recent[missing[-1] + 1 :] if missing.size else recent
    if segment.size < model.min_history():
        raise InsufficientHistoryError(
            f"model {model.name!r} (trailing history without a long gap)",
            model.min_history(),
            int(segment.size),
        )
    return segment


def seasonal_period(step: pd.Timedelta, season: pd.Timedelta = DAY) -> int | None:
    """Steps per season, or None when the step does not divide the season into >1 steps."""
    ratio = season / step
    if ratio < 2 or ratio != int(ratio):
        return None
    return int(ratio)
