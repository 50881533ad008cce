"""Run any model on the target's wall clock, so that local-time traffic keeps its shape across
daylight-saving changes.

Prometheus and the engine's grid are in UTC. Traffic that follows people follows their local
clock: after a change to summer time, the 09:00 rise comes an hour earlier in UTC, and a model
with a 24-hour season would expect it an hour late for days. Here the inner model sees the
series re-labelled by local wall-clock time (naive times carried as UTC, so calendar features
read local hours). The hour skipped in spring never happens on the wall clock: it is bridged by
a straight line between its neighbours, so that models needing an unbroken run keep one (no
observed interval is changed or hidden). The hour lived twice in autumn is averaged into one
when fitting; arriving live, its second pass is not shown to the model, whose clock already
went past it. Forecasts are mapped back to the UTC intervals asked for.

>>> LocalTime(step, HoltWinters(step), "Europe/Paris").fit(history)   # doctest: +SKIP
"""

from __future__ import annotations

import zoneinfo
from typing import Self

import numpy as np
import pandas as pd

from forecaster.errors import InsufficientHistoryError, InvalidInputError
from forecaster.models.base import ForecastModel, _grid_values

UTC_ZONES = frozenset({"UTC", "Etc/UTC", "Etc/GMT", "GMT", "Etc/Universal", "Universal", "Zulu"})


def wall_clock(index: pd.DatetimeIndex, time_zone: str) -> pd.DatetimeIndex:
    """UTC instants as local wall-clock times, labelled UTC (what the inner model sees)."""
    return index.tz_convert(zoneinfo.ZoneInfo(time_zone)).tz_localize(None).tz_localize("UTC")


class LocalTime(ForecastModel):
    """`model` fitted and updated on the local wall clock of `time_zone`; see the module."""

    last_wall_: pd.Timestamp  # the newest wall-clock slot the inner model has seen
    last_wall_value_: float  # its newest finite value, the start of a bridge

    def __init__(self, step: pd.Timedelta, model: ForecastModel, time_zone: str) -> None:
        super().__init__(step)
        self.model = model
        self.time_zone = time_zone
        self.name = model.name  # the zone is a setting of the target, not another model

    def min_history(self) -> int:
        return self.model.min_history()

    def warm_start(self, previous: ForecastModel) -> None:
        inner = previous.model if isinstance(previous, LocalTime) else previous
        self.model.warm_start(inner)

    @property
    def selection_(self) -> object:
        """The inner model's selection, when it is `auto` (reported by the backtest)."""
        return getattr(self.model, "selection_", None)

    def fit(self, history: pd.Series) -> Self:
        index = _utc_index(history, "history")
        values = _grid_values(history, self.step, "history")  # a regular UTC grid
        if not np.isfinite(values).any():
            raise InsufficientHistoryError(f"model {self.name!r}", self.min_history(), 0)
        local = self._regular(wall_clock(index, self.time_zone), values)
        self.model.fit(local)
        self.fit_start_ = pd.Timestamp(index[0])
        self.last_timestamp_ = pd.Timestamp(index[-1])
        self.last_wall_ = pd.Timestamp(local.index[-1])
        return self

    def update(self, observations: pd.Series) -> Self:
        self._check_fitted()
        if observations.empty:
            return self
        index = _utc_index(observations, "observations")
        observed = self._continuation(observations)
        wall = wall_clock(index, self.time_zone)
        # The hour lived twice in autumn: its second pass is already on the wall clock.
        newer = wall > self.last_wall_
        if newer.any():
            grid = self._regular(wall[newer], observed[newer], start=self.last_wall_ + self.step)
            self.model.update(grid)
            self.last_wall_ = pd.Timestamp(grid.index[-1])
        self.last_timestamp_ = pd.Timestamp(index[-1])
        return self

    def _regular(
        self, wall: pd.DatetimeIndex, values: np.ndarray, start: pd.Timestamp | None = None
    ) -> pd.Series:
        """Values on a regular wall-clock grid from `start` (or the first time): gaps where the
        clock jumped forward, the mean where it went back over the same bins."""
        first = wall[0] if start is None else start
        slots = np.floor((wall - first) / self.step).astype(np.int64)
        grid = pd.date_range(first, periods=int(slots.max()) + 1, freq=self.step)
        frame = pd.Series(values).groupby(slots).mean()
        out = np.full(len(grid), np.nan)
        out[frame.index.to_numpy()] = frame.to_numpy()
        skipped = self._skipped(grid)
        if skipped.any():
            before = self.last_wall_value_ if start is not None else np.nan
            out = _bridge(out, skipped, before)
        finite = out[np.isfinite(out)]
        self.last_wall_value_ = float(finite[-1]) if finite.size else np.nan
        return pd.Series(out, index=grid)

    def _skipped(self, grid: pd.DatetimeIndex) -> np.ndarray:
        """Wall-clock slots that do not exist in the zone (the spring-forward hour)."""
        local = grid.tz_localize(None).tz_localize(
            zoneinfo.ZoneInfo(self.time_zone), nonexistent="NaT",
            ambiguous=np.ones(len(grid), dtype=bool),
        )
        return np.asarray(local.isna())

    def _predict(self, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        targets = self.last_timestamp_ + self.step * np.arange(1, horizon + 1)
        wall = wall_clock(pd.DatetimeIndex(targets), self.time_zone)
        # Steps ahead on the wall clock; within the repeated autumn hour a time can lie before
        # the wall-clock origin, and the next wall-clock step stands in for it.
        ahead = np.maximum(np.floor((wall - self.last_wall_) / self.step).astype(np.int64), 1)
        mean, errors = self.model._predict(int(ahead.max()))
        return mean[ahead - 1], errors[ahead - 1]

    def _fit(self, values: np.ndarray) -> None:  # fit() is overridden: the grid changes
        raise NotImplementedError

    def _update(self, values: np.ndarray) -> None:  # update() is overridden likewise
        raise NotImplementedError


def _bridge(values: np.ndarray, skipped: np.ndarray, before: float) -> np.ndarray:
    """Fill each run of skipped slots on the line from the value before it to the one after
    it; a run without both neighbours stays missing."""
    out = values.copy()
    index = np.arange(len(values))
    runs = np.split(index[skipped], np.flatnonzero(np.diff(index[skipped]) > 1) + 1)
    for run in runs:
        left = out[run[0] - 1] if run[0] > 0 else before
        right = out[run[-1] + 1] if run[-1] + 1 < len(out) else np.nan
        if np.isfinite(left) and np.isfinite(right):
            share = np.arange(1, len(run) + 1) / (len(run) + 1)
            out[run] = left + (right - left) * share
    return out


def _utc_index(series: pd.Series, field_name: str) -> pd.DatetimeIndex:
    index = series.index
    if not isinstance(index, pd.DatetimeIndex) or index.tz is None:
        raise InvalidInputError(field_name, "must be indexed by time-zone-aware timestamps")
    return index.tz_convert("UTC")


def in_time_zone(model: ForecastModel, time_zone: str) -> ForecastModel:
    """`model` on the wall clock of `time_zone`; itself when the zone is UTC."""
    if time_zone in UTC_ZONES:
        return model
    return LocalTime(model.step, model, time_zone)
