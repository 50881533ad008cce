"""Baselines: repeat the last value, or the value one season ago. Always available as fallbacks."""

from __future__ import annotations

import numpy as np
import pandas as pd

from forecaster.models.base import DAY, WEEK, ForecastModel, error_sample, seasonal_period

RESIDUAL_WINDOW = pd.Timedelta(days=7)


def _last_finite(values: np.ndarray) -> float:
    finite = np.flatnonzero(np.isfinite(values))
    return float(values[finite[-1]]) if finite.size else float("nan")


def _last_finite_before(values: np.ndarray, ends: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """_last_finite of values[start:end] for each (start, end) pair, NaN where none is."""
    where = np.maximum.accumulate(np.where(np.isfinite(values), np.arange(len(values)), -1))
    last = where[ends - 1]
    return np.where(last >= starts, values[np.maximum(last, 0)], np.nan)


class Naive(ForecastModel):
    """Repeat the last observation; the fallback of last resort (needs 2 observed steps)."""

    name = "naive"

    def min_history(self) -> int:
        return 2

    def _fit(self, values: np.ndarray) -> None:
        window = max(2, int(RESIDUAL_WINDOW / self.step))
        tail = values[-window:]
        self.history_ = values.copy()
        diffs = tail[1:] - tail[:-1]
        self.errors_ = error_sample(diffs)

    def _update(self, values: np.ndarray) -> None:
        self.history_ = np.concatenate([self.history_, values])

    def _forecast_path(self, values: np.ndarray, horizon: int) -> np.ndarray:
        """The means (len(values), horizon) that predict/update one value at a time would give
        (before each value arrives), computed in one batch; then folds the values in."""
        seen = np.concatenate([self.history_, values])
        ends = len(self.history_) + np.arange(len(values))  # origin k has seen seen[:end]
        levels = _last_finite_before(seen, ends, np.zeros(len(values), dtype=int))
        self._update(values)
        return np.repeat(levels[:, None], horizon, axis=1)

    def _predict(self, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        level = _last_finite(self.history_)
        # A random walk's h-step error grows like sqrt(h): scale the one-step errors.
        scale = np.sqrt(np.arange(1, horizon + 1))[:, None]
        return np.full(horizon, level), scale * self.errors_[None, :]


class SeasonalNaive(ForecastModel):
    """Repeat the value one week ago when two weeks of history exist, else one day ago.

    Where the lagged value is missing (a long gap), the daily lag stands in, then the last
    observation; the forecast's `notes` do not change, the errors come from the same lags.
    """

    name = "seasonal_naive"

    def __init__(self, step: pd.Timedelta) -> None:
        super().__init__(step)
        self.daily = seasonal_period(self.step, DAY)
        self.weekly = seasonal_period(self.step, WEEK)

    def min_history(self) -> int:
        return (self.daily or self.weekly or 1) + 1

    def _fit(self, values: np.ndarray) -> None:
        observed = int(np.isfinite(values).sum())
        use_weekly = self.weekly is not None and observed >= 2 * self.weekly
        lag = self.weekly if use_weekly else (self.daily or self.weekly)
        self.lag_: int = lag or 1
        self.history_ = values.copy()
        window = max(self.lag_ + 2, int(RESIDUAL_WINDOW / self.step) + self.lag_)
        tail = values[-window:]
        diffs = tail[self.lag_ :] - tail[: -self.lag_]
        self.errors_ = error_sample(diffs)

    def _update(self, values: np.ndarray) -> None:
        keep = 2 * (self.weekly or self.daily or 1) + len(values)
        self.history_ = np.concatenate([self.history_[-keep:], values])

    def _forecast_path(self, values: np.ndarray, horizon: int) -> np.ndarray:
        """The means (len(values), horizon) that predict/update one value at a time would give
        (before each value arrives), computed in one batch; then folds the values in as those
        updates would (keeping the same tail of the history)."""
        n0, keep = len(self.history_), 2 * (self.weekly or self.daily or 1) + 1
        seen = np.concatenate([self.history_, values])
        origins = np.arange(len(values))
        ends = n0 + origins  # origin k has seen seen[:end], of which it kept `sizes`
        sizes = np.where(origins == 0, n0, np.minimum(ends, keep + 1))
        starts = ends - sizes
        last = _last_finite_before(seen, ends, starts)
        means = np.empty((len(values), horizon))
        for k in range(1, horizon + 1):
            mean, found = last.copy(), np.zeros(len(values), dtype=bool)
            for lag in (self.lag_, self.daily):
                if lag is None:
                    continue
                index = sizes - 1 + k - lag * int(np.ceil(k / lag))  # into what was kept
                lagged = seen[np.clip(starts + index, 0, len(seen) - 1)]
                use = ~found & (index >= 0) & (index < sizes) & np.isfinite(lagged)
                mean[use], found = lagged[use], found | use
            means[:, k - 1] = mean
        if len(values):
            self.history_ = seen[-min(n0 + len(values), keep + 1) :]
        return means

    def _predict(self, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.history_)
        mean = np.empty(horizon)
        last = _last_finite(self.history_)
        for k in range(1, horizon + 1):
            mean[k - 1] = self._lagged(n, k, last)
        # Within one season every step ahead is a one-season-ahead forecast: same errors.
        seasons = np.ceil(np.arange(1, horizon + 1) / self.lag_)
        return mean, np.sqrt(seasons)[:, None] * self.errors_[None, :]

    def _lagged(self, n: int, k: int, fallback: float) -> float:
        for lag in (self.lag_, self.daily):
            if lag is None:
                continue
            back = lag * int(np.ceil(k / lag))
            index = n - 1 + k - back
            if 0 <= index < n and np.isfinite(self.history_[index]):
                return float(self.history_[index])
        return fallback
