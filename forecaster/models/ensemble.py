"""The average of a few models: means averaged, error quantiles averaged (Vincentization).

Averaging the forecasts of models that err differently usually beats each of them; averaging
their error samples quantile by quantile gives an interval between theirs (calibrate it with
forecasts.models.calibration). A member that cannot fit is left out; at least one must fit.
`weights` (by member name, default equal) weigh both averages; `auto` sets them from each
member's validation error (see forecaster.models.selection).

>>> Ensemble(step, [HoltWinters(step), GradientBoosting(step)]).fit(history)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from numpy.linalg import LinAlgError

from forecaster.errors import ForecasterError, InsufficientHistoryError
from forecaster.models.base import ForecastModel
from forecaster.models.calibration import resample

MEMBER_ERRORS = (ForecasterError, ValueError, ArithmeticError, LinAlgError)


class Ensemble(ForecastModel):
    """Weighted average of `members` (unfitted models); equal weights unless given."""

    name = "ensemble"

    def __init__(
        self,
        step: pd.Timedelta,
        members: Sequence[ForecastModel],
        weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(step)
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)
        self.weights = dict(weights or {})

    def weight_of(self, member: ForecastModel) -> float:
        return self.weights.get(member.name, 1.0)

    def min_history(self) -> int:
        return min(member.min_history() for member in self.members)

    def _fit(self, values: np.ndarray) -> None:
        observed = int(np.isfinite(values).sum())
        fitted, failures = [], []
        for member in self.members:
            if observed < member.min_history():
                failures.append(member.name)
                continue
            try:
                member.fit_start_ = self.fit_start_
                member._fit(values)
            except MEMBER_ERRORS:
                failures.append(member.name)
                continue
            fitted.append(member)
        if not fitted:
            raise InsufficientHistoryError(
                f"model {self.name!r} (no member could be fitted: {', '.join(failures)})",
                self.min_history(),
                observed,
            )
        self.fitted_ = fitted

    def _update(self, values: np.ndarray) -> None:
        for member in self.fitted_:
            member._update(values)

    def _predict(self, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        outputs = [member._predict(horizon) for member in self.fitted_]
        weights = np.array([self.weight_of(member) for member in self.fitted_])
        mean = np.average([np.maximum(m, 0.0) for m, _ in outputs], axis=0, weights=weights)
        n = min(e.shape[1] for _, e in outputs if e.size) if any(e.size for _, e in outputs) else 0
        if n == 0:
            return mean, np.zeros((horizon, 1))
        errors = np.zeros((horizon, n))
        sized = [(m, e, w) for (m, e), w in zip(outputs, weights, strict=True) if e.size]
        for m, e, w in sized:
            # each member's predictive quantiles, on a common grid, averaged
            offset = (np.maximum(m, 0.0) - mean)[:, None]
            errors += w * (np.vstack([resample(row, n) for row in e]) + offset)
        return mean, errors / sum(w for _, _, w in sized)
