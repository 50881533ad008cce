"""Holt-Winters (additive, optionally damped trend) fitted by statsmodels, run by our own filter.

statsmodels estimates the smoothing parameters and initial states; the state recursion is
re-implemented here so that new observations update the state in O(1) between refits, which
statsmodels' results objects cannot do without refitting.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from statsmodels.tsa.holtwinters import ExponentialSmoothing

from forecaster.models.base import (
    DAY,
    WEEK,
    ForecastModel,
    error_sample,
    seasonal_period,
    trailing_segment,
)

FIT_WINDOW = pd.Timedelta(days=14)
RESIDUAL_WINDOW = pd.Timedelta(days=7)


class HoltWinters(ForecastModel):
    """Additive Holt-Winters with a daily season (weekly for daily steps).

    `trend=False` gives level + season; `damped=True` a damped additive trend. Fitted on the
    trailing run of history without long gaps, at most `fit_window` long.
    """

    name = "holt_winters"

    def __init__(
        self,
        step: pd.Timedelta,
        *,
        trend: bool = False,
        damped: bool = True,
        fit_window: pd.Timedelta = FIT_WINDOW,
    ) -> None:
        super().__init__(step)
        self.trend = trend
        self.damped = damped
        self.fit_window = pd.Timedelta(fit_window)
        self.period = seasonal_period(self.step, DAY) or seasonal_period(self.step, WEEK)
        if trend:
            self.name = "holt_winters_damped" if damped else "holt_winters_trend"

    def min_history(self) -> int:
        return 2 * (self.period or 5) + 10

    def _fit(self, values: np.ndarray) -> None:
        segment = trailing_segment(self, values, int(self.fit_window / self.step))
        model = ExponentialSmoothing(
            segment,
            trend="add" if self.trend else None,
            damped_trend=self.trend and self.damped,
            seasonal="add" if self.period else None,
            seasonal_periods=self.period,
            initialization_method="heuristic",
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = model.fit()
        p = result.params
        self.alpha_ = float(p["smoothing_level"])
        self.beta_ = float(p["smoothing_trend"]) if self.trend else 0.0
        self.gamma_ = float(p["smoothing_seasonal"]) if self.period else 0.0
        self.phi_ = float(p["damping_trend"]) if self.trend and self.damped else 1.0
        self.level_ = float(p["initial_level"])
        self.slope_ = float(p["initial_trend"]) if self.trend else 0.0
        self.season_ = (
            np.asarray(p["initial_seasons"], dtype=float).copy() if self.period else np.zeros(1)
        )
        self.position_ = 0  # index into season_ of the next observation's seasonal term
        residuals = self._filter(segment)
        keep = int(RESIDUAL_WINDOW / self.step)
        burn_in = min(len(residuals) // 2, self.period or 0)
        errors = residuals[burn_in:][-keep:]
        self.errors_ = error_sample(errors)

    def _filter(self, values: np.ndarray) -> np.ndarray:
        """Run the state recursion over values; return the one-step-ahead errors."""
        a, b, g, phi = self.alpha_, self.beta_, self.gamma_, self.phi_
        level, slope, season, pos = self.level_, self.slope_, self.season_, self.position_
        m = len(season)
        errors = np.full(len(values), np.nan)
        for i, y in enumerate(values):
            s = season[pos] if self.period else 0.0
            predicted = level + phi * slope + s
            if np.isfinite(y):
                errors[i] = y - predicted
            else:
                y = predicted  # a missing value leaves the state on its own forecast
            new_level = a * (y - s) + (1 - a) * (level + phi * slope)
            if self.period:
                season[pos] = g * (y - level - phi * slope) + (1 - g) * s
            slope = b * (new_level - level) + (1 - b) * phi * slope
            level = new_level
            pos = (pos + 1) % m
        self.level_, self.slope_, self.position_ = level, slope, pos
        return errors

    def _update(self, values: np.ndarray) -> None:
        self._filter(values)

    def _predict(self, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        steps = np.arange(1, horizon + 1)
        damp = np.cumsum(self.phi_ ** steps) if self.trend else np.zeros(horizon)
        m = len(self.season_)
        seasonal = (
            self.season_[(self.position_ + steps - 1) % m] if self.period else np.zeros(horizon)
        )
        mean = self.level_ + damp * self.slope_ + seasonal
        # h-step error variance of the additive model: sigma^2 * (1 + sum_j c_j^2).
        c = self.alpha_ * (1 + self.beta_ * damp[:-1]) if horizon > 1 else np.zeros(0)
        if self.period and horizon > 1:
            c = c + self.gamma_ * ((steps[:-1] % m) == 0)
        factor = np.sqrt(1 + np.concatenate([[0.0], np.cumsum(c**2)]))
        return mean, factor[:, None] * self.errors_[None, :]

    def _forecast_path(self, values: np.ndarray, horizon: int) -> np.ndarray:
        """The means (len(values), horizon) that predict/update one value at a time would give
        (before each value arrives), from the states of one pass; then folds the values in."""
        steps = np.arange(1, horizon + 1)
        damp = np.cumsum(self.phi_ ** steps) if self.trend else np.zeros(horizon)
        m = len(self.season_)
        levels, slopes = np.empty(len(values)), np.empty(len(values))
        seasonal = np.zeros((len(values), horizon))
        for k in range(len(values)):
            levels[k], slopes[k] = self.level_, self.slope_
            if self.period:
                seasonal[k] = self.season_[(self.position_ + steps - 1) % m]
            self._filter(values[k : k + 1])
        return levels[:, None] + damp[None, :] * slopes[:, None] + seasonal
