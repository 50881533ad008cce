"""MSTL: daily and weekly seasonal profiles by statsmodels' MSTL, a level on what is left.

The seasonal components are estimated on a copy of the history whose one-off spikes and
outages are clipped to a robust band around a rolling median (see `clip_outliers`): one bad
hour then does not repeat every day in the profile. The clipped copy only trains the
profiles; the level follows the observed demand. The forecast is the last cycle of each
seasonal component repeated, plus the level of the deseasonalised series, smoothed
exponentially with innovations limited to a few robust standard deviations (a lone spike
moves it little, a lasting shift is followed within a few steps). `update` folds in new
observations in O(1); the profiles stay as fitted until the next refit.

>>> MSTLModel(pd.Timedelta("5min")).fit(history).predict(2, [0.9])  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from statsmodels.tsa.seasonal import MSTL

from forecaster.models.base import (
    DAY,
    WEEK,
    ForecastModel,
    error_sample,
    seasonal_period,
    trailing_segment,
)
from forecaster.models.robust import CLIP_WINDOW, clip_outliers

FIT_WINDOW = pd.Timedelta(days=21)
RESIDUAL_WINDOW = pd.Timedelta(days=7)
HUBER_MADS = 3.0
ALPHAS = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0)
# Cheap loess settings: local constants, one inner pass, trend and low-pass smoothers
# evaluated every JUMP_SHARE of the shortest period and interpolated. MSTL with the defaults
# takes ~40 s on three weeks of 5-minute steps (daily and weekly), this ~0.2 s, for seasonal
# components that differ by well under 1%.
STL_KWARGS: dict[str, int | bool | None] = {
    "seasonal_deg": 0, "trend_deg": 0, "low_pass_deg": 0, "inner_iter": 1, "outer_iter": 0,
}
JUMP_SHARE = 0.1
# An autocorrelation peak this high at a lag other than a day or a week is a season too.
ACF_THRESHOLD = 0.3
ACF_PROMINENCE = 0.1
# A weekly profile has two or three cycles behind each of its steps: smoothed over this share
# of its period (an hour for a week) so that it keeps the week's shape, not its noise.
SMOOTH_SHARE = 1 / 168


def detect_period(values: np.ndarray, longest: int, shortest: int = 6) -> int | None:
    """The lag in [shortest, longest] of the autocorrelation's highest local peak, when that
    peak is clearly significant (above ACF_THRESHOLD, and ACF_PROMINENCE above the trough
    before it); None otherwise."""
    x = values[np.isfinite(values)]
    if longest <= shortest or x.size < 3 * longest:
        return None
    x = x - x.mean()
    size = 1 << int(np.ceil(np.log2(2 * x.size)))
    spectrum = np.fft.rfft(x, size)
    acf = np.fft.irfft(spectrum * np.conj(spectrum), size)[: longest + 2]
    if acf[0] <= 0:
        return None
    acf = acf / acf[0]
    lags = np.arange(shortest, longest + 1)
    peaks = lags[(acf[lags] > acf[lags - 1]) & (acf[lags] >= acf[lags + 1])]
    if peaks.size == 0:
        return None
    best = int(peaks[np.argmax(acf[peaks])])
    # a bump on a slowly decaying autocorrelation is no season: it must rise above the trough
    prominence = acf[best] - acf[shortest:best].min(initial=acf[best])
    return best if acf[best] > ACF_THRESHOLD and prominence > ACF_PROMINENCE else None


def _near_multiple(period: int, candidate: int) -> bool:
    """Whether `period` is a whole multiple of `candidate` (give or take 5% of `candidate`):
    then its seasonal profile already holds that cycle."""
    return abs(period - round(period / candidate) * candidate) <= 0.05 * candidate


class MSTLModel(ForecastModel):
    """Seasonal profiles for each period in `periods` by MSTL, and a robust exponentially
    smoothed level. By default the periods are a day and a week, each once the history
    holds more than two of them, and any shorter cycle the autocorrelation shows clearly
    (see `detect_period`) that does not divide the day."""

    name = "mstl"

    def __init__(
        self,
        step: pd.Timedelta,
        *,
        periods: Sequence[int] | None = None,
        fit_window: pd.Timedelta = FIT_WINDOW,
        clip: bool = True,
    ) -> None:
        super().__init__(step)
        self.periods = tuple(periods) if periods is not None else None
        self.fit_window = pd.Timedelta(fit_window)
        self.clip = clip
        self.daily = seasonal_period(self.step, DAY)
        self.weekly = seasonal_period(self.step, WEEK)

    def min_history(self) -> int:
        shortest = min(self.periods) if self.periods else (self.daily or self.weekly or 5)
        return 2 * shortest + 10

    def periods_for(self, values: np.ndarray) -> list[int]:
        """The seasonal periods (in steps) that a fit on `values` models, shortest first;
        MSTL needs more than two cycles of each."""
        n = len(values)
        candidates = self.periods if self.periods is not None else (self.daily, self.weekly)
        periods = sorted({p for p in candidates if p is not None and p > 1 and 2 * p < n})
        if self.periods is None:
            found = detect_period(values, longest=min([n // 3, *periods]) - 1)
            if found is not None and not any(_near_multiple(p, found) for p in periods):
                periods = sorted([*periods, found])
        return periods

    def _fit(self, values: np.ndarray) -> None:
        segment = trailing_segment(self, values, int(self.fit_window / self.step))
        train = segment
        if self.clip:
            train = clip_outliers(segment, max(3, int(CLIP_WINDOW / self.step)))
        periods = self.periods_for(train)
        if periods:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                jump = max(1, int(JUMP_SHARE * periods[0]))
                kwargs = {**STL_KWARGS, "trend_jump": jump, "low_pass_jump": jump}
                result = MSTL(train, periods=periods, stl_kwargs=kwargs).fit()
            seasonal = np.asarray(result.seasonal, dtype=float).reshape(len(train), -1)
        else:
            seasonal = np.zeros((len(train), 0))
        # The last cycle of each component, to repeat; position 0 is the next step's.
        self.profiles_ = [
            _circular_mean(seasonal[-p:, k], 1 if k == 0 else int(SMOOTH_SHARE * p))
            for k, p in enumerate(periods)
        ]
        self.position_ = 0
        deseasonalised = segment - seasonal.sum(axis=1)
        self._fit_level(deseasonalised)

    def _fit_level(self, d: np.ndarray) -> None:
        first_diff = np.diff(d)
        scale = 1.4826 * float(np.median(np.abs(first_diff - np.median(first_diff))))
        self.limit_ = HUBER_MADS * max(scale, 1e-9)
        burn_in = min(len(d) // 4, 288)
        best: tuple[float, float] | None = None
        for alpha in ALPHAS:
            errors, _ = self._smooth(d, alpha, float(d[0]))
            loss = float(np.mean(np.abs(errors[burn_in:])))
            if best is None or loss < best[0]:
                best = (loss, alpha)
        assert best is not None
        self.alpha_ = best[1]
        errors, self.level_ = self._smooth(d, self.alpha_, float(d[0]))
        keep = int(RESIDUAL_WINDOW / self.step)
        errors = errors[burn_in:][-keep:]
        self.errors_ = error_sample(errors)

    def _smooth(self, d: np.ndarray, alpha: float, level: float) -> tuple[np.ndarray, float]:
        """One-step errors and the final level of the innovation-limited smoother."""
        limit = self.limit_
        errors = np.full(len(d), np.nan)
        for i, y in enumerate(d):
            if not np.isfinite(y):
                continue
            error = y - level
            errors[i] = error
            level += alpha * min(max(error, -limit), limit)
        return errors, level

    def _seasonal(self, offsets: np.ndarray) -> np.ndarray:
        total = np.zeros(len(offsets))
        for profile in self.profiles_:
            total += profile[(self.position_ + offsets) % len(profile)]
        return total

    def _update(self, values: np.ndarray) -> None:
        deseasonalised = values - self._seasonal(np.arange(len(values)))
        _, self.level_ = self._smooth(deseasonalised, self.alpha_, self.level_)
        self.position_ += len(values)

    def _predict(self, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        mean = self.level_ + self._seasonal(np.arange(horizon))
        # a local level's h-step error: sigma^2 * (1 + (h - 1) * alpha^2)
        factor = np.sqrt(1.0 + np.arange(horizon) * self.alpha_**2)
        return mean, factor[:, None] * self.errors_[None, :]


def _circular_mean(profile: np.ndarray, width: int) -> np.ndarray:
    """A centred moving average of a cyclic profile (wrapping around its ends)."""
    if width <= 1:
        return profile.copy()
    padded = np.concatenate([profile[-width:], profile, profile[:width]])
    smoothed = np.convolve(padded, np.ones(width) / width, mode="same")
    return smoothed[width:-width]


