"""Gradient boosting on lags: recent steps, the same time yesterday and last week, rolling
statistics and the calendar, one direct model per horizon step.

Fitted on the square-root scale (request counts are noisier when high; see transform.py) with
scikit-learn's HistGradientBoostingRegressor, which takes missing lags (gaps, a first week
without a weekly lag) as they are. Everything is deterministic (fixed random_state).

>>> model = GradientBoosting(pd.Timedelta("5min"), horizon=2, tz="Europe/Berlin")  # doctest: +SKIP
>>> model.fit(history).predict(2, quantiles=[0.9])                            # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from forecaster.errors import InsufficientHistoryError
from forecaster.models.base import DAY, WEEK, ForecastModel, seasonal_period
from forecaster.models.forest import CompactForest

if TYPE_CHECKING:  # scikit-learn is imported when a model is first fitted, not at import
    from sklearn.ensemble import HistGradientBoostingRegressor

FIT_WINDOW = pd.Timedelta(days=14)
RESIDUALS = 2016


class GradientBoosting(ForecastModel):
    """Direct multi-step boosting on lag features; `horizon` steps get their own model each.

    Beyond `horizon`, the last model is reused with the target's seasonal and calendar
    features and its errors widened like a random walk's (sqrt of the extra steps).
    `tz` is the time zone whose hour of day and weekday drive the workload. With `quantile`,
    a second model per step is fitted with the pinball loss at that quantile, and the error
    sample is stretched so that its `quantile` lands on it: the spread then follows the
    conditions (hour, recent volatility) rather than being the same at every origin.
    """

    name = "gbm"

    def __init__(
        self,
        step: pd.Timedelta,
        *,
        horizon: int = 2,
        tz: str = "UTC",
        fit_window: pd.Timedelta = FIT_WINDOW,
        max_iter: int = 60,
        learning_rate: float = 0.1,
        max_leaf_nodes: int = 15,
        min_samples_leaf: int = 40,
        random_state: int = 0,
        quantile: float | None = None,
    ) -> None:
        super().__init__(step)
        self.horizon = horizon
        self.tz = tz
        self.fit_window = pd.Timedelta(fit_window)
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.max_leaf_nodes = max_leaf_nodes
        self.min_samples_leaf = min_samples_leaf
        self.random_state = random_state
        self.quantile = quantile
        if quantile is not None:
            self.name = "gbm_quantile"
        self.daily = seasonal_period(self.step, DAY)
        self.weekly = seasonal_period(self.step, WEEK)

    def min_history(self) -> int:
        return (self.daily or 12) + 12 * self.horizon + 100

    def _fit(self, values: np.ndarray) -> None:
        window = int(self.fit_window / self.step)
        keep = window + (self.weekly or self.daily or 0) + self.horizon
        start = max(0, len(values) - keep)
        z = np.sqrt(np.maximum(values[start:], 0.0))
        first_time = getattr(self, "fit_start_", None)
        origin0 = (
            pd.Timestamp(first_time) + start * self.step
            if first_time is not None
            else pd.Timestamp("2000-01-03", tz="UTC")
        )
        n = len(z)
        lookback = n - min(window, n)
        # kept as CompactForest: the same predictions in a fifth of the memory (forest.py)
        self.models_: list[CompactForest] = []
        self.upper_models_: list[CompactForest] = []
        residuals = []
        for h in range(1, self.horizon + 1):
            origins = np.arange(max(lookback, 12), n - h)
            target = z[origins + h]
            ok = np.isfinite(target) & np.isfinite(z[origins])
            origins, target = origins[ok], target[ok]
            if len(origins) < 50:
                raise InsufficientHistoryError(
                    f"model {self.name!r} (training rows for step {h})", 50, len(origins)
                )
            X = self.features(z, origins, h, origin0)
            if h == 1:
                # a lag never seen in training (no week of history yet) is left out
                self.columns_ = np.isfinite(X).any(axis=0)
            X = X[:, self.columns_]
            model = self._regressor("squared_error")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.fit(X, target)
            self.models_.append(CompactForest.from_sklearn(model))
            fitted = model.predict(X[-RESIDUALS:])
            residual = target[-RESIDUALS:] - fitted
            if self.quantile is not None:
                upper = self._regressor("quantile")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    upper.fit(X, target)
                self.upper_models_.append(CompactForest.from_sklearn(upper))
                width = np.maximum(upper.predict(X[-RESIDUALS:]) - fitted, 1e-6)
                residual = residual / width  # in units of the predicted width
            residuals.append(residual)
        n_res = min(len(r) for r in residuals)
        # float32, as base.error_sample keeps the other models' samples
        self.errors_ = np.vstack([r[-n_res:] for r in residuals]).astype(np.float32)
        self.buffer_ = z[-self._buffer_size() :].copy()
        self.origin_time_ = origin0 + (n - 1) * self.step  # time of buffer_[-1]

    def _regressor(self, loss: str) -> HistGradientBoostingRegressor:
        from sklearn.ensemble import HistGradientBoostingRegressor

        return HistGradientBoostingRegressor(
            loss=loss,
            quantile=self.quantile if loss == "quantile" else None,
            max_iter=self.max_iter,
            learning_rate=self.learning_rate,
            max_leaf_nodes=self.max_leaf_nodes,
            min_samples_leaf=self.min_samples_leaf,
            early_stopping=False,
            random_state=self.random_state,
        )

    def _buffer_size(self) -> int:
        return (self.weekly or self.daily or 0) + self.horizon + 64

    def features(
        self, z: np.ndarray, origins: np.ndarray, h: int | np.ndarray, time0: pd.Timestamp
    ) -> np.ndarray:
        """The rows the regressors learn from and predict on: features for forecasting
        z[origin + h] from z[: origin + 1] alone (no look-ahead), the calendar last; time0 is
        z[0]'s time, `h` one horizon for all rows or one per row."""

        def lag(back: np.ndarray | int) -> np.ndarray:
            index = origins - back
            out = np.full(len(origins), np.nan)
            valid = (index >= 0) & (index <= origins)  # never past the origin
            out[valid] = z[index[valid]]
            return out

        recent = np.column_stack([lag(k) for k in range(12)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            columns = [
                recent[:, :4],
                np.nanmean(recent[:, :3], axis=1)[:, None],
                np.nanmean(recent, axis=1)[:, None],
                np.nanstd(recent, axis=1)[:, None],
                np.nanmax(recent, axis=1)[:, None],
            ]
            for period in (self.daily, self.weekly):
                if period is None:
                    continue
                # the target's time one period back, with its neighbours, and the origin's
                around = np.column_stack([lag(period - h + d) for d in (-2, -1, 0, 1, 2)])
                columns += [
                    around[:, 2:3], np.nanmean(around, axis=1)[:, None], lag(period)[:, None]
                ]
        columns += list(self.calendar(time0, origins + h))
        return np.hstack(columns).astype(float)

    def calendar(self, time0: pd.Timestamp, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Minute of the day (as a fraction) and weekday (Monday 0) of time0 + steps * step,
        as columns. In UTC straight from the epoch nanoseconds: pandas' time-zone path cost
        1.5 of the 3 ms a target's refresh took when a new point arrived."""
        if self.tz == "UTC":
            ns = time0.value + steps.astype(np.int64) * self.step.value
            minutes = (ns // 60_000_000_000) % 1440
            weekday = (ns // 86_400_000_000_000 + 3) % 7  # 1970-01-01 was a Thursday
            return (minutes / 1440.0)[:, None], weekday[:, None]
        offsets = pd.to_timedelta(steps * self.step.value, unit="ns")
        times = (time0 + offsets).tz_convert(self.tz)
        day_fraction = (times.hour * 60 + times.minute).to_numpy() / 1440.0
        return day_fraction[:, None], times.day_of_week.to_numpy()[:, None]

    def _update(self, values: np.ndarray) -> None:
        z = np.sqrt(np.maximum(values, 0.0))
        self.buffer_ = np.concatenate([self.buffer_, z])[-self._buffer_size() :]
        self.origin_time_ = self.origin_time_ + len(values) * self.step

    def _predict(self, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        z = self.buffer_
        time0 = self.origin_time_ - (len(z) - 1) * self.step
        steps = np.arange(1, horizon + 1)
        X = self.features(z, np.full(horizon, len(z) - 1), steps, time0)[:, self.columns_]
        model_of = np.minimum(steps, self.horizon) - 1
        mean_z = np.empty(horizon)
        width = np.ones(horizon)
        for k in np.unique(model_of):
            rows = model_of == k
            mean_z[rows] = self.models_[k].predict(X[rows])
            if self.upper_models_:
                upper = self.upper_models_[k].predict(X[rows])
                width[rows] = np.maximum(upper - mean_z[rows], 1e-6)
        scale = np.sqrt(np.maximum(1.0, steps / self.horizon)) * width
        errors_z = self.errors_[model_of] * scale[:, None]
        mean_z = np.maximum(mean_z, 0.0)
        mean = mean_z**2
        errors = np.maximum(mean_z[:, None] + errors_z, 0.0) ** 2 - mean[:, None]
        return mean, errors

    def _forecast_path(self, values: np.ndarray, horizon: int) -> np.ndarray:
        """The means (len(values), horizon) that predict/update one value at a time would give
        (before each value arrives), computed in one batch; then folds the values in."""
        z_all = np.concatenate([self.buffer_, np.sqrt(np.maximum(values, 0.0))])
        time0 = self.origin_time_ - (len(self.buffer_) - 1) * self.step
        origins = np.arange(len(values)) + len(self.buffer_) - 1
        means = np.empty((len(values), horizon))
        for h in range(1, horizon + 1):
            X = self.features(z_all, origins, h, time0)[:, self.columns_]
            means[:, h - 1] = self.models_[min(h, self.horizon) - 1].predict(X)
        self._update(values)
        return np.maximum(means, 0.0) ** 2
