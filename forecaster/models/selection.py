"""`auto`: choose among candidate models by rolling-origin validation on recent history.

Each candidate is fitted on the history before the validation window, then run through the
window one observation at a time (update, then forecast), exactly as it would run between
refits in service. Its forecasts are scored by the pinball loss at the planning quantile
and lead-time horizon, on intervals calibrated conformally from the candidate's own earlier
errors in the window (see forecaster.models.calibration). The lowest loss wins; the winner is
then fitted on all the history and keeps calibrating itself as new observations arrive.

Only the history given to `fit` is ever used, so nothing after the fit time can influence
the choice. Selection is slow next to a refit, so it runs on its own schedule: a refit
whose `warm_start(previous)` got an `Auto` with a selection younger than `reselect` refits
the chosen model and keeps its calibration scores.

>>> model = Auto(pd.Timedelta("5min"), quantile=0.9, horizon=2).fit(history)  # doctest: +SKIP
>>> model.selection_.chosen, model.predict(2, [0.9]).quantile(0.9)           # doctest: +SKIP
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

import numpy as np
import pandas as pd
from numpy.linalg import LinAlgError

from forecaster.errors import ForecasterError, InsufficientHistoryError, InvalidInputError
from forecaster.models.base import Forecast, ForecastModel
from forecaster.models.calibration import (
    CALIBRATION_WINDOW,
    MIN_SCORES,
    ScoreTracker,
    scale_floor,
    spread_of,
)

DEFAULT_CANDIDATES = (
    "naive", "seasonal_naive", "holt_winters", "holt_winters_sqrt", "gbm", "ensemble",
)
# When no candidate can be validated (too little history), the first of these that fits.
PREFERENCE = ("holt_winters", "seasonal_naive", "naive")
VALIDATION = pd.Timedelta(days=2)
RESELECT = pd.Timedelta(days=1)
MIN_VALIDATION_STEPS = 24
FIT_ERRORS = (ForecasterError, ValueError, ArithmeticError, LinAlgError)


@dataclass(frozen=True)
class CandidateScore:
    """How one candidate did in validation; `pinball` is None when it could not be scored."""

    name: str
    pinball: float | None
    mae: float | None
    coverage_80: float | None
    fit_seconds: float
    error: str | None = None


@dataclass(frozen=True)
class Selection:
    """The chosen model, when (end of the history used) and on what scores."""

    chosen: str
    selected_at: pd.Timestamp
    quantile: float
    horizon: int
    validation_steps: int
    scores: tuple[CandidateScore, ...]

    def as_dict(self) -> dict[str, object]:
        return {
            "chosen": self.chosen,
            "selected_at": self.selected_at.isoformat(),
            "quantile": self.quantile,
            "horizon": self.horizon,
            "validation_steps": self.validation_steps,
            "scores": {
                s.name: {
                    "pinball": s.pinball,
                    "mae": s.mae,
                    "coverage_80": s.coverage_80,
                    "fit_seconds": round(s.fit_seconds, 4),
                    **({"error": s.error} if s.error else {}),
                }
                for s in self.scores
            },
        }


def pinball_loss(actual: np.ndarray, predicted: np.ndarray, quantile: float) -> float:
    """Mean pinball (quantile) loss; lower is better."""
    diff = actual - predicted
    return float(np.mean(np.maximum(quantile * diff, (quantile - 1.0) * diff)))


@dataclass
class _Validation:
    tracker: ScoreTracker
    mean: np.ndarray  # (origins, H)
    spread: np.ndarray
    raw: np.ndarray  # the model's own quantile at q, as an offset from the mean


class Auto(ForecastModel):
    """The candidate with the lowest validated pinball loss, calibrated; see the module doc.

    `quantile` and `horizon` (steps) are what the scaler plans for: the loss is scored there.
    """

    name = "auto"
    # learned in fit (declared for type checkers only)
    selection_: Selection
    model_: ForecastModel
    tracker_: ScoreTracker

    def __init__(
        self,
        step: pd.Timedelta,
        *,
        quantile: float = 0.9,
        horizon: int = 2,
        candidates: Sequence[str] = DEFAULT_CANDIDATES,
        validation: pd.Timedelta = VALIDATION,
        reselect: pd.Timedelta = RESELECT,
        calibration_window: pd.Timedelta = CALIBRATION_WINDOW,
        min_scores: int = MIN_SCORES,
        calibrate: bool = True,
    ) -> None:
        super().__init__(step)
        if not 0.0 < quantile < 1.0:
            raise InvalidInputError("quantile", f"must be in (0, 1), got {quantile!r}")
        if horizon < 1:
            raise InvalidInputError("horizon", f"must be at least 1 step, got {horizon!r}")
        if not candidates or "auto" in candidates:
            raise InvalidInputError(
                "candidates", f"need at least one model other than 'auto', got {candidates!r}"
            )
        self.quantile = quantile
        self.horizon = horizon
        self.candidates = tuple(candidates)
        self.validation = pd.Timedelta(validation)
        self.reselect = pd.Timedelta(reselect)
        self.calibration_window = pd.Timedelta(calibration_window)
        self.min_scores = min_scores
        self.calibrate = calibrate

    def min_history(self) -> int:
        return 2

    def warm_start(self, previous: ForecastModel) -> None:
        if isinstance(previous, Auto) and hasattr(previous, "selection_"):
            self.previous_: Auto | None = previous

    def fit(self, history: pd.Series) -> Self:
        end = pd.Timestamp(history.index[-1]) if len(history) else None
        self.fit_end_: pd.Timestamp | None = end
        return super().fit(history)

    def predict(self, horizon: int, quantiles: Sequence[float] = ()) -> Forecast:
        forecast = super().predict(horizon, quantiles)
        notes = (
            f"chosen={self.model_.name}",
            f"selected_at={self.selection_.selected_at.isoformat()}",
        )
        return Forecast(
            forecast.origin, forecast.step, forecast.mean, forecast.quantiles, self.name, notes
        )

    # -- fitting -----------------------------------------------------------------------

    def _fit(self, values: np.ndarray) -> None:
        fit_end = self.fit_end_
        assert fit_end is not None
        self.floor_ = scale_floor(values)
        previous: Auto | None = getattr(self, "previous_", None)
        self.previous_ = None
        window = max(1, int(self.calibration_window / self.step))
        if previous is not None and self._can_reuse(previous, fit_end):
            selection = previous.selection_
            order = [selection.chosen, *_ranked(selection)]
            model = self._fit_first(order, values)
            self.tracker_ = ScoreTracker(model, self.horizon, window, self.floor_)
            if model.name == previous.model_.name:
                self.tracker_.carry_scores(previous.tracker_)
            self.selection_ = selection
            self.model_ = model
            return
        selection, validations = self._select(values, fit_end)
        order = [selection.chosen, *_ranked(selection)]
        model = self._fit_first(order, values)
        self.tracker_ = ScoreTracker(model, self.horizon, window, self.floor_)
        if model.name in validations:
            self.tracker_.carry_scores(validations[model.name].tracker)
        if model.name != selection.chosen:
            selection = _with_chosen(selection, model.name)
        self.selection_ = selection
        self.model_ = model

    def _can_reuse(self, previous: Auto, fit_end: pd.Timestamp) -> bool:
        s = previous.selection_
        return (
            s.quantile == self.quantile
            and s.horizon == self.horizon
            and s.chosen in self.candidates
            and pd.Timedelta(0) <= fit_end - s.selected_at < self.reselect
        )

    def _make(self, name: str) -> ForecastModel:
        from forecaster.models import make_model  # the registry imports this module

        return make_model(name, self.step, quantile=self.quantile, horizon=self.horizon)

    def _fit_first(self, order: Sequence[str], values: np.ndarray) -> ForecastModel:
        failures = []
        observed = int(np.isfinite(values).sum())
        for name in dict.fromkeys([*order, *PREFERENCE]):
            model = self._make(name)
            if observed < model.min_history():
                failures.append(f"{name}: needs {model.min_history()} observed steps")
                continue
            try:
                model.fit_start_ = self.fit_start_
                model._fit(values)
            except FIT_ERRORS as exc:
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            assert self.fit_end_ is not None
            model.last_timestamp_ = self.fit_end_
            return model
        raise InsufficientHistoryError(
            "auto (no candidate could be fitted: " + "; ".join(failures) + ")",
            needed=min(self._make(n).min_history() for n in self.candidates),
            available=observed,
        )

    def _select(
        self, values: np.ndarray, fit_end: pd.Timestamp
    ) -> tuple[Selection, dict[str, _Validation]]:
        n = len(values)
        steps = int(self.validation / self.step)
        needed = min(self._make(name).min_history() for name in self.candidates)
        # Shrink the window when history is short, keeping enough before it to fit on.
        steps = min(steps, n - needed - 1, n // 2)
        scores: list[CandidateScore] = []
        validations: dict[str, _Validation] = {}
        if steps >= MIN_VALIDATION_STEPS:
            train, held = values[: n - steps], values[n - steps :]
            for name in self.candidates:
                score, validation = self._validate(name, train, held)
                scores.append(score)
                if validation is not None:
                    validations[name] = validation
        scored = [s for s in scores if s.pinball is not None]
        if scored:
            chosen = min(scored, key=lambda s: (s.pinball, self.candidates.index(s.name))).name
        else:
            chosen = next((c for c in PREFERENCE if c in self.candidates), self.candidates[0])
        selection = Selection(
            chosen, fit_end, self.quantile, self.horizon, max(steps, 0), tuple(scores)
        )
        return selection, validations

    def _validate(
        self, name: str, train: np.ndarray, held: np.ndarray
    ) -> tuple[CandidateScore, _Validation | None]:
        began = time.perf_counter()
        model = self._make(name)
        if int(np.isfinite(train).sum()) < model.min_history():
            reason = f"needs {model.min_history()} observed steps before the validation window"
            return CandidateScore(name, None, None, None, 0.0, reason), None
        try:
            model.fit_start_ = self.fit_start_
            model._fit(train)
            fit_seconds = time.perf_counter() - began
            validation = self._roll(model, held)
        except FIT_ERRORS as exc:
            error = f"{type(exc).__name__}: {exc}"
            return CandidateScore(name, None, None, None, time.perf_counter() - began, error), None
        pinball, mae, coverage = self._score(validation, held)
        return CandidateScore(name, pinball, mae, coverage, fit_seconds), validation

    def _roll(self, model: ForecastModel, held: np.ndarray) -> _Validation:
        H = self.horizon
        window = max(1, int(self.calibration_window / self.step))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            means, spreads, raws = _forecast_path(model, held, H, self.quantile, self.floor_)
        tracker = ScoreTracker(model, H, window, self.floor_)
        for h in range(H):
            targets = held[h:]
            z = (targets - means[: len(targets), h]) / spreads[: len(targets), h]
            tracker.scores[h].extend(z[np.isfinite(z)].tolist())
        return _Validation(tracker, means, spreads, raws)

    def _score(self, v: _Validation, held: np.ndarray) -> tuple[float | None, float, float]:
        """Pinball loss at (quantile, horizon) of calibrated forecasts; MAE; 80% coverage."""
        h = self.horizon
        origins = len(held) - h + 1  # origin k forecasts held[k + h - 1]
        actual = held[h - 1 : h - 1 + origins]
        mean = v.mean[:origins, h - 1]
        spread = v.spread[:origins, h - 1]
        z = pd.Series((actual - mean) / spread)
        # A score for origin j is known once held[j + h - 1] is, i.e. from origin j + h on.
        window = max(1, int(self.calibration_window / self.step))
        known = z.shift(h).rolling(window, min_periods=self.min_scores)
        q_hat = known.quantile(self.quantile).to_numpy()
        lo = known.quantile(0.1).to_numpy()
        hi = known.quantile(0.9).to_numpy()
        calibrated = np.isfinite(q_hat)
        if not self.calibrate or not calibrated.any():
            upper = mean + v.raw[:origins, h - 1]
            use = np.isfinite(actual)
            band = np.ones(origins, dtype=bool)
            lower_b, upper_b = np.full(origins, -np.inf), np.full(origins, np.inf)
        else:
            upper = mean + spread * q_hat
            use = np.isfinite(actual) & calibrated
            band = use
            lower_b, upper_b = mean + spread * lo, mean + spread * hi
        if not use.any():
            return None, float("nan"), float("nan")
        upper = np.maximum(upper, 0.0)
        pinball = pinball_loss(actual[use], upper[use], self.quantile)
        finite = np.isfinite(actual)
        mae = float(np.mean(np.abs(actual[finite] - mean[finite])))
        inside = (actual >= lower_b) & (actual <= upper_b)
        coverage = float(inside[band & finite].mean()) if (band & finite).any() else float("nan")
        return pinball, mae, coverage

    # -- running -----------------------------------------------------------------------

    def _update(self, values: np.ndarray) -> None:
        self.tracker_.observe(values)
        self.model_.last_timestamp_ = self.last_timestamp_ + len(values) * self.step

    def _predict(self, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        if self.calibrate:
            return self.tracker_.calibrated(horizon, self.min_scores)
        return self.model_._predict(horizon)


def _ranked(selection: Selection) -> list[str]:
    scored = [s for s in selection.scores if s.pinball is not None]
    return [s.name for s in sorted(scored, key=lambda s: s.pinball or 0.0)]


def _with_chosen(selection: Selection, chosen: str) -> Selection:
    return Selection(
        chosen, selection.selected_at, selection.quantile, selection.horizon,
        selection.validation_steps, selection.scores,
    )


def _forecast_path(
    model: ForecastModel, held: np.ndarray, horizon: int, quantile: float, floor: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means, spreads and own-quantile offsets (len(held), horizon) of a fitted model run
    through `held` (forecast, then take the next value), leaving the model after all of it.
    Models whose error sample does not change between refits are run in one batch."""
    from forecaster.models.ensemble import Ensemble
    from forecaster.models.gbm import GradientBoosting

    if isinstance(model, GradientBoosting) and model.quantile is None:
        _, errors = model._predict(horizon)
        spread = spread_of(errors, floor)
        raw = np.quantile(errors, quantile, axis=1)
        means = model._forecast_path(held, horizon)
        return means, np.tile(spread, (len(held), 1)), np.tile(raw, (len(held), 1))
    if isinstance(model, Ensemble):
        paths = [_forecast_path(m, held, horizon, quantile, floor) for m in model.fitted_]
        mean = np.mean([p[0] for p in paths], axis=0)
        spread = np.mean([p[1] for p in paths], axis=0)
        raw = np.mean([p[0] + p[2] for p in paths], axis=0) - mean
        return mean, spread, raw
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for k in range(len(held)):
        mean, errors = model._predict(horizon)
        raw = np.quantile(errors, quantile, axis=1) if errors.size else 0.0 * mean
        rows.append((np.maximum(mean, 0.0), spread_of(errors, floor), raw))
        model._update(held[k : k + 1])
    return tuple(np.array([row[i] for row in rows]) for i in range(3))  # type: ignore[return-value]
