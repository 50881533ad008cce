"""Fit any model on a variance-stabilised scale (square root or log) and forecast back.

Request counts are noisier when they are high: on the square-root scale a Poisson count has
the same spread at every level. A model fitted there gives intervals that widen with the
level once transformed back, which is what a scaler planning at a quantile needs.
Quantiles map exactly through a monotone transform, so the interval is exact; the mean
returned is the back-transformed centre (a median-like value, the better point for MAE).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from forecaster.models.base import ForecastModel

Kind = Literal["sqrt", "log"]


class Transformed(ForecastModel):
    """`model` fitted on sqrt(y) or log(y + c), c a small share of the median level.

    >>> Transformed(step, HoltWinters(step), "sqrt").fit(history)   # doctest: +SKIP
    """

    def __init__(self, step: pd.Timedelta, model: ForecastModel, kind: Kind = "sqrt") -> None:
        super().__init__(step)
        self.model = model
        self.kind = kind
        self.name = f"{model.name}_{kind}"

    def min_history(self) -> int:
        return self.model.min_history()

    def _forward(self, y: np.ndarray) -> np.ndarray:
        y = np.maximum(y, 0.0)
        return np.sqrt(y) if self.kind == "sqrt" else np.log(y + self.offset_)

    def _inverse(self, z: np.ndarray) -> np.ndarray:
        if self.kind == "sqrt":
            return np.maximum(z, 0.0) ** 2
        return np.maximum(np.exp(z) - self.offset_, 0.0)

    def _fit(self, values: np.ndarray) -> None:
        finite = values[np.isfinite(values)]
        median = float(np.median(finite)) if finite.size else 0.0
        self.offset_ = max(1.0, 0.05 * median)
        self.model.fit_start_ = self.fit_start_
        self.model._fit(self._forward(values))

    def _update(self, values: np.ndarray) -> None:
        self.model._update(self._forward(values))

    def _predict(self, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        mean, errors = self.model._predict(horizon)
        centre = self._inverse(mean)
        return centre, self._inverse(mean[:, None] + errors) - centre[:, None]
