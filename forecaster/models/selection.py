"""`auto`: choose among candidate models by rolling-origin validation on recent history.

Each candidate is fitted on the history before the validation window, then run through the
window one observation at a time (update, then forecast), exactly as it would run between
refits in service. With a `scorer` (a PlanScorer: the service and the backtest pass
forecaster.slo.ShareScorer when a share of intervals short is asked), each candidate's run
is handed to it as the plan takes it (a ValidationRun: the forecast path at every origin, its
band at the planning quantile as the model would serve it), and it is ranked by what the
scorer says holding the share with that plan costs: the one plan (forecaster.policy.plan),
served through the HPA's arithmetic at the lowest level that holds the share, in
replica-hours over the oracle's. Without one (a fixed quantile, or a model used on its
own), it is ranked by `plan_cost`: the forecast at the planning quantile and horizon,
floored by the demand at the origin, times the headroom factor that keeps 95% of the demand
under it, relative to the demand's total. Pinball loss, MAE and 80% coverage are kept as
diagnostics. Switching models between selections is costly in itself, so the `default`
candidate (the ensemble) is kept unless another beats it by `margin`. The winner is then
fitted on all the history.

Intervals: a model's own interval is served when its validated 80% coverage lies within
`coverage_tolerance` of 80%; otherwise it is calibrated conformally from its own errors
(see forecaster.models.calibration) and keeps calibrating itself as observations arrive.
Recalibrating an interval that is already right only adds noise to the plan's shape. With a
scorer each candidate is priced with the band its coverage calls for; the default and the
cheapest are priced with the other band too, and serve it when it is cheaper by `margin`:
a controller's level found for one band does not fit the other.

Only the history given to `fit` is ever used, so nothing after the fit time can influence
the choice. Selection is slow next to a refit, so it runs on its own schedule: a refit
whose `warm_start(previous)` got an `Auto` with a selection younger than `reselect` (and
the same scorer) refits the chosen model and keeps its calibration scores.

>>> model = Auto(pd.Timedelta("5min"), quantile=0.9, horizon=2).fit(history)  # doctest: +SKIP
>>> model.selection_.chosen, model.predict(2, [0.9]).quantile(0.9)           # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Protocol, Self

import numpy as np
import pandas as pd
from numpy.linalg import LinAlgError

from forecaster.errors import ForecasterError, InsufficientHistoryError, InvalidInputError
from forecaster.models.base import Forecast, ForecastModel
from forecaster.models.calibration import (
    CALIBRATION_WINDOW,
    MIN_SCORES,
    ScoreTracker,
    calibrated_path,
    level_scale,
    scale_floor,
)
from forecaster.models.ets import HoltWinters
from forecaster.models.naive import Naive, SeasonalNaive
from forecaster.models.transform import Transformed

DEFAULT_CANDIDATES = (
    "naive", "seasonal_naive", "holt_winters", "holt_winters_sqrt", "gbm", "ensemble",
)
DEFAULT_CHOICE = "ensemble"
MARGIN = 0.1
COVERAGE_TOLERANCE = 0.05
SLO_SHARE = 0.05
# When no candidate can be validated (too little history), the first of these that fits.
PREFERENCE = ("holt_winters", "seasonal_naive", "naive")
VALIDATION = pd.Timedelta(days=4)
RESELECT = pd.Timedelta(days=1)
MIN_VALIDATION_STEPS = 24
PATH_BLOCK_BYTES = 2**20  # the error samples of the origins mapped back at once, at most
FIT_ERRORS = (ForecasterError, ValueError, ArithmeticError, LinAlgError)


@dataclass(frozen=True)
class CandidateScore:
    """How one candidate did in validation; `plan_cost` is None when it could not be scored.

    `pinball` is the loss of the floored plan at the planning quantile, `coverage_80` that of
    the candidate's own (uncalibrated) 80% interval. With a scorer, `cost` is what it said
    the candidate's plan costs as it would be served (with its own band or the calibrated
    one, as `calibrated` says), and `share` the share of intervals that plan left short; the
    others are then diagnostics."""

    name: str
    plan_cost: float | None
    pinball: float | None
    mae: float | None
    coverage_80: float | None
    fit_seconds: float
    error: str | None = None
    cost: float | None = None
    share: float | None = None
    calibrated: bool | None = None


@dataclass(frozen=True)
class Selection:
    """The chosen model, when (end of the history used) and on what scores."""

    chosen: str
    selected_at: pd.Timestamp
    quantile: float
    horizon: int
    validation_steps: int
    scores: tuple[CandidateScore, ...]
    calibrated: bool = True
    # Member weights of each ensemble candidate composed from its members' validation runs.
    ensemble_weights: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()
    # What chose: "scorer" (the cost of the plan as served) or "plan_cost" (no scorer given).
    scored_by: str = "plan_cost"

    def weights_for(self, name: str) -> dict[str, float]:
        return dict(dict(self.ensemble_weights).get(name, ()))

    def as_dict(self) -> dict[str, object]:
        return {
            "chosen": self.chosen,
            "selected_at": self.selected_at.isoformat(),
            "quantile": self.quantile,
            "horizon": self.horizon,
            "validation_steps": self.validation_steps,
            "calibrated": self.calibrated,
            "scored_by": self.scored_by,
            "ensemble_weights": {
                name: dict(weights) for name, weights in self.ensemble_weights
            },
            "scores": {
                s.name: {
                    "plan_cost": s.plan_cost,
                    "pinball": s.pinball,
                    "mae": s.mae,
                    "coverage_80": s.coverage_80,
                    **(
                        {"cost": s.cost, "share": s.share, "calibrated": s.calibrated}
                        if self.scored_by == "scorer" else {}
                    ),
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


def plan_cost(actual: np.ndarray, plan: np.ndarray, slo_share: float = SLO_SHARE) -> float:
    """Capacity needed to keep all but `slo_share` of the intervals' demand under a multiple of
    `plan`, relative to the total demand: the headroom multiple times sum(plan) / sum(actual).
    1.0 is a perfect plan, and so is any plan for no demand at all; lower is better; inf when
    nothing can be scored. `plan` must be positive where there is demand (floor it)."""
    use = np.isfinite(actual) & np.isfinite(plan)
    if not use.any():
        return float("inf")
    total = float(actual[use].sum())
    if total <= 0:
        return 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(actual[use] > 0, actual[use] / plan[use], 0.0)
    headroom = float(np.quantile(ratio, 1.0 - slo_share))
    return headroom * float(plan[use].sum()) / total


@dataclass(frozen=True)
class ValidationRun:
    """A candidate's run through the held window as a plan takes it: at origin k (every value
    before `actual[k]` seen) the forecast of actual[k : k + horizon], its mean and its band at
    the planning quantile as the model would serve it (`calibrated` or its own).

    >>> run.forecast(k), run.current(k), run.last_point(k)  # doctest: +SKIP
    """

    start: pd.Timestamp  # origin 0: the time of the last value before the window
    step: pd.Timedelta
    quantile: float
    actual: np.ndarray  # (n,) the held values, NaN where missing
    before: np.ndarray  # (2,) the two values before them
    mean: np.ndarray  # (n, horizon)
    band: np.ndarray  # (n, horizon), at `quantile`
    calibrated: bool
    model: str

    @property
    def horizon(self) -> int:
        return int(self.mean.shape[1])

    def __len__(self) -> int:
        return len(self.actual)

    @cached_property
    def origins(self) -> list[pd.Timestamp]:
        return list(pd.date_range(self.start, periods=len(self.actual), freq=self.step))

    def forecast(self, k: int) -> Forecast:
        """The forecast made at origin k, as the model's predict() would have returned it."""
        return Forecast(
            self.origins[k], self.step, self.mean[k], {self.quantile: self.band[k]}, self.model
        )

    def current(self, k: int) -> float:
        """The demand known at origin k: the value just before actual[k]."""
        return float(self.actual[k - 1] if k >= 1 else self.before[-1])

    def last_point(self, k: int) -> float:
        """The value before that one."""
        return float(self.actual[k - 2] if k >= 2 else self.before[k - 2])


@dataclass(frozen=True)
class RunCost:
    """What holding a share with a run's plan costs (lower is better; inf when it cannot be
    scored), the share of its intervals the scored plan left short, and the level (log of
    the factor on the plan) it was priced at, NaN when none applies."""

    cost: float
    share: float
    level: float = math.nan


class PlanScorer(Protocol):
    """Turns a candidate's validation run into the cost of its plan as served; built above
    the models (forecaster.slo.ShareScorer) from the one plan and the HPA's arithmetic."""

    def __call__(self, run: ValidationRun) -> RunCost: ...


@dataclass
class _Validation:
    tracker: ScoreTracker
    mean: np.ndarray  # (origins, H)
    raw: np.ndarray  # the model's own quantiles (0.1, 0.9, q), as offsets: (3, origins, H)


class Auto(ForecastModel):
    """The candidate whose plan is cheapest in validation; see the module doc.

    `quantile` and `horizon` (steps) are what the scaler plans for: the plan is scored there,
    by `scorer` when given. `make` builds each candidate from its name in place of the
    registry (`forecaster.models.make_model` at this quantile and horizon).
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
        calibrate: bool | None = None,
        default: str | None = DEFAULT_CHOICE,
        margin: float = MARGIN,
        coverage_tolerance: float = COVERAGE_TOLERANCE,
        make: Callable[[str], ForecastModel] | None = None,
        scorer: PlanScorer | None = None,
    ) -> None:
        super().__init__(step)
        check_auto_arguments(quantile, horizon, candidates)
        self.quantile = quantile
        self.horizon = horizon
        self.candidates = tuple(candidates)
        self.validation = pd.Timedelta(validation)
        self.reselect = pd.Timedelta(reselect)
        self.calibration_window = pd.Timedelta(calibration_window)
        self.min_scores = min_scores
        self.calibrate = calibrate  # None: only when the winner's own interval is off
        self.default = default
        self.margin = margin
        self.coverage_tolerance = coverage_tolerance
        self.make = make
        self.scorer = scorer  # None: rank by plan_cost (see the module docstring)

    def min_history(self) -> int:
        return 2

    def warm_start(self, previous: ForecastModel) -> None:
        if isinstance(previous, Auto) and hasattr(previous, "selection_"):
            self.previous_: Auto | None = previous

    def fit(self, history: pd.Series) -> Self:
        end = pd.Timestamp(history.index[-1]) if len(history) else None
        self.fit_end_: pd.Timestamp | None = end
        return super().fit(history)

    @property
    def chosen_name(self) -> str:
        chosen = getattr(self, "model_", None)
        return self.name if chosen is None else chosen.chosen_name

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
        validations: dict[str, _Validation] = {}
        if previous is not None and self._can_reuse(previous, fit_end):
            selection = previous.selection_
        else:
            previous = None
            selection, validations = self._select(values, fit_end)
        model = self._fit_first([selection.chosen, *_ranked(selection)], values, selection)
        if previous is None and model.name != selection.chosen:
            selection = _with_chosen(selection, model.name, self._needs_calibration(selection))
        # The scores calibrate the interval; a model serving its own keeps none (_predict).
        window = window if selection.calibrated else 0
        self.tracker_ = ScoreTracker(model, self.horizon, window, self.floor_)
        if previous is not None and model.name == previous.model_.name:
            self.tracker_.carry_scores(previous.tracker_)
        elif model.name in validations:
            self.tracker_.carry_scores(validations[model.name].tracker)
        self.selection_ = selection
        self.model_ = model

    def _can_reuse(self, previous: Auto, fit_end: pd.Timestamp) -> bool:
        s = previous.selection_
        return (
            s.quantile == self.quantile
            and s.horizon == self.horizon
            and getattr(previous, "scorer", None) == self.scorer
            and s.chosen in self.candidates
            and pd.Timedelta(0) <= fit_end - s.selected_at < self.reselect
        )

    def _make(self, name: str) -> ForecastModel:
        if self.make is not None:
            return self.make(name)
        from forecaster.models import make_model  # the registry imports this module

        return make_model(name, self.step, quantile=self.quantile, horizon=self.horizon)

    def _fit_first(
        self, order: Sequence[str], values: np.ndarray, selection: Selection
    ) -> ForecastModel:
        assert self.fit_end_ is not None
        names = [*dict.fromkeys([*order, *PREFERENCE])]
        failures: list[str] = []
        model = fit_first(
            names, self._make, values, selection, self.fit_start_, self.fit_end_, failures
        )
        if model is None:
            raise InsufficientHistoryError(
                "auto (no candidate could be fitted: " + "; ".join(failures) + ")",
                needed=min(self._make(n).min_history() for n in self.candidates),
                available=int(np.isfinite(values).sum()),
            )
        return model

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
        weights: dict[str, tuple[tuple[str, float], ...]] = {}
        if steps >= MIN_VALIDATION_STEPS:
            train, held = values[: n - steps], values[n - steps :]
            runs = CandidateRuns(self, train, held)
            # An ensemble whose members are candidates too is composed from their runs
            # rather than fitted and run again: validated last, it costs nothing more.
            ensembles = [n for n in self.candidates if self._members(n)]
            for name in [n for n in self.candidates if n not in ensembles] + ensembles:
                members = self._members(name)
                validation: _Validation | None
                if members and all(m in validations for m in members):
                    maes = {s.name: s.mae for s in scores}
                    score, validation, weights[name] = runs.compose(
                        name, members, [validations[m] for m in members],
                        [maes[m] for m in members],
                    )
                else:
                    score, validation = runs.validate(name)
                scores.append(score)
                if validation is not None:
                    validations[name] = validation
            order = {name: k for k, name in enumerate(self.candidates)}
            scores.sort(key=lambda s: order[s.name])
            if self.scorer is not None and self.calibrate is None:
                scores = Pricing(self, self.scorer).other_bands(scores, validations, train, held)
        chosen = choose(scores, self.candidates, self.default, self.margin)
        selection = Selection(
            chosen, fit_end, self.quantile, self.horizon, max(steps, 0), tuple(scores),
            ensemble_weights=tuple(weights.items()),
            scored_by="plan_cost" if self.scorer is None else "scorer",
        )
        return _with_chosen(selection, chosen, self._needs_calibration(selection)), validations

    def _needs_calibration(self, selection: Selection) -> bool:
        return needs_calibration(selection, self.calibrate, self.coverage_tolerance)

    def _members(self, name: str) -> list[str]:
        return ensemble_members(self._make(name))

    # -- running -----------------------------------------------------------------------

    def _update(self, values: np.ndarray) -> None:
        self.tracker_.observe(values)
        self.model_.last_timestamp_ = self.last_timestamp_ + len(values) * self.step

    def _predict(self, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        if self.selection_.calibrated:
            return self.tracker_.calibrated(horizon, self.min_scores)
        return self.tracker_.forecast(horizon)


class CandidateRuns:
    """Fits an `Auto`'s candidates on `train`, runs them through `held` and scores them."""

    def __init__(self, auto: Auto, train: np.ndarray, held: np.ndarray) -> None:
        self.auto = auto
        self.train = train
        self.held = held

    def validate(self, name: str) -> tuple[CandidateScore, _Validation | None]:
        auto, train = self.auto, self.train
        began = time.perf_counter()
        model = auto._make(name)
        if int(np.isfinite(train).sum()) < model.min_history():
            reason = f"needs {model.min_history()} observed steps before the validation window"
            return CandidateScore(name, None, None, None, None, 0.0, reason), None
        try:
            model.fit_start_ = auto.fit_start_
            model._fit(train)
            fit_seconds = time.perf_counter() - began
            validation = self.roll(model)
        except FIT_ERRORS as exc:
            error = f"{type(exc).__name__}: {exc}"
            return (
                CandidateScore(name, None, None, None, None, time.perf_counter() - began, error),
                None,
            )
        return self.score(name, validation, fit_seconds), validation

    def score(self, name: str, v: _Validation, fit_seconds: float) -> CandidateScore:
        auto = self.auto
        plan, pinball, mae, coverage = score_validation(
            v, self.train, self.held, auto.horizon, auto.quantile, auto.floor_
        )
        score = CandidateScore(name, plan, pinball, mae, coverage, fit_seconds)
        if auto.scorer is None:
            return score
        calibrated = (
            auto.calibrate if auto.calibrate is not None
            else coverage_is_off(score, auto.coverage_tolerance)
        )
        return Pricing(auto, auto.scorer).priced(score, v, self.train, self.held, calibrated)

    def compose(
        self,
        name: str,
        members: list[str],
        parts: list[_Validation],
        maes: list[float | None],
    ) -> tuple[CandidateScore, _Validation, tuple[tuple[str, float], ...]]:
        """An ensemble's validation from its members' (the same average Ensemble makes),
        each member weighted by the inverse of its validation MAE at the decision horizon."""
        from forecaster.models.ensemble import Ensemble

        weights = member_weights(maes)
        mean, raw = _average_paths([(p.mean, p.raw) for p in parts], weights)
        model = self.auto._make(name)
        assert isinstance(model, Ensemble)
        model.weights = dict(zip(members, weights.tolist(), strict=True))
        model.fitted_ = [p.tracker.model for p in parts]  # run through `held` already
        tracker = self.tracker(model, mean)
        validation = _Validation(tracker, mean, raw)
        score = self.score(name, validation, 0.0)
        return score, validation, tuple(model.weights.items())

    def tracker(self, model: ForecastModel, means: np.ndarray) -> ScoreTracker:
        auto = self.auto
        window = max(1, int(auto.calibration_window / auto.step))
        return validation_tracker(model, self.held, means, auto.horizon, window, auto.floor_)

    def roll(self, model: ForecastModel) -> _Validation:
        """The model's validation: its forecasts at every origin of `held`, taking each value."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            means, raws = _forecast_path(
                model, self.held, self.auto.horizon, (0.1, 0.9, self.auto.quantile)
            )
        return _Validation(self.tracker(model, means), means, raws)


class Pricing:
    """Prices an `Auto`'s candidates with its scorer: each validation run as the plan takes
    it, with the band the model would serve."""

    def __init__(self, auto: Auto, scorer: PlanScorer) -> None:
        self.auto = auto
        self.scorer = scorer

    def priced(
        self, score: CandidateScore, v: _Validation, train: np.ndarray, held: np.ndarray,
        calibrated: bool,
    ) -> CandidateScore:
        cost = self.scorer(self.run(score.name, v, train, held, calibrated))
        return replace(
            score, cost=cost.cost if np.isfinite(cost.cost) else None, share=cost.share,
            calibrated=calibrated,
        )

    def other_bands(
        self, scores: list[CandidateScore], validations: dict[str, _Validation],
        train: np.ndarray, held: np.ndarray,
    ) -> list[CandidateScore]:
        """Each candidate was priced with the band its coverage calls for; the ones that can
        be chosen (the default and the cheapest) are priced with the other band too, and
        take it when it is cheaper by `margin`: switching is costly in itself (the
        controller's level was found for the other plan)."""
        costs = {s.name: c for s in scores if (c := ranking_cost(s)) is not None}
        if not costs:
            return scores
        contenders = {min(costs, key=lambda name: costs[name]), self.auto.default}
        priced = []
        for score in scores:
            if score.name in contenders and score.name in costs and score.calibrated is not None:
                other = self.priced(
                    score, validations[score.name], train, held, not score.calibrated
                )
                cheaper = (1.0 - self.auto.margin) * costs[score.name]
                if other.cost is not None and other.cost < cheaper:
                    score = other
            priced.append(score)
        return priced

    def run(
        self, name: str, v: _Validation, train: np.ndarray, held: np.ndarray, calibrated: bool
    ) -> ValidationRun:
        """The validation as the plan takes it, its band as the model would serve it."""
        band = np.maximum(v.mean + v.raw[2], 0.0)
        if calibrated:
            window = max(1, int(self.auto.calibration_window / self.auto.step))
            path = calibrated_path(
                v.mean, held, self.auto.quantile, window, self.auto.floor_, self.auto.min_scores
            )
            band = np.where(np.isfinite(path), path, band)
        start = self.auto.fit_start_ + (len(train) - 1) * self.auto.step
        before = np.r_[np.full(2, np.nan), train][-2:]
        return ValidationRun(
            start, self.auto.step, self.auto.quantile, held, before, v.mean, band, calibrated, name
        )


def check_auto_arguments(quantile: float, horizon: int, candidates: Sequence[str]) -> None:
    """Auto's own arguments, refused with the field and the bound."""
    if not 0.0 < quantile < 1.0:
        raise InvalidInputError("quantile", f"must be in (0, 1), got {quantile!r}")
    if horizon < 1:
        raise InvalidInputError("horizon", f"must be at least 1 step, got {horizon!r}")
    if not candidates or "auto" in candidates:
        raise InvalidInputError(
            "candidates", f"need at least one model other than 'auto', got {candidates!r}"
        )


def ensemble_members(model: ForecastModel) -> list[str]:
    """The registry names of an ensemble's members, [] for other models."""
    from forecaster.models.ensemble import Ensemble

    return [m.name for m in model.members] if isinstance(model, Ensemble) else []


def fit_first(
    names: Sequence[str],
    make: Callable[[str], ForecastModel],
    values: np.ndarray,
    selection: Selection,
    fit_start: pd.Timestamp,
    fit_end: pd.Timestamp,
    failures: list[str],
) -> ForecastModel | None:
    """The first of `names` (in order of preference) that fits `values`, an ensemble with
    the member weights of `selection`; None when none does, with why in `failures`."""
    from forecaster.models.ensemble import Ensemble

    observed = int(np.isfinite(values).sum())
    for name in names:
        model = make(name)
        if isinstance(model, Ensemble):
            model.weights = selection.weights_for(name)
        if observed < model.min_history():
            failures.append(f"{name}: needs {model.min_history()} observed steps")
            continue
        try:
            model.fit_start_ = fit_start
            model._fit(values)
        except FIT_ERRORS as exc:
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        model.last_timestamp_ = fit_end
        return model
    return None


def score_validation(
    v: _Validation, train: np.ndarray, held: np.ndarray, horizon: int, quantile: float,
    floor: float,
) -> tuple[float | None, float | None, float, float]:
    """Plan cost and pinball loss of the floored plan at (quantile, horizon), the plan
    being the model's own quantile; MAE; the model's own 80% coverage."""
    h = horizon
    origins = len(held) - h + 1  # origin k forecasts held[k + h - 1]
    actual = held[h - 1 : h - 1 + origins]
    mean = v.mean[:origins, h - 1]
    lower = np.maximum(mean + v.raw[0, :origins, h - 1], 0.0)
    upper_80 = np.maximum(mean + v.raw[1, :origins, h - 1], 0.0)
    upper = np.maximum(mean + v.raw[2, :origins, h - 1], 0.0)
    # The demand known at origin k: the last value before held[k], held for a gap.
    known = pd.Series(np.r_[train[-1:], held[: origins - 1]]).ffill().to_numpy()
    plan = np.where(np.isfinite(known), np.maximum(upper, known), upper)
    plan = np.maximum(plan, floor)  # a zero plan cannot be scaled up to any demand
    finite = np.isfinite(actual) & np.isfinite(plan)
    if not finite.any():
        return None, None, float("nan"), float("nan")
    cost = plan_cost(actual[finite], plan[finite])
    pinball = pinball_loss(actual[finite], plan[finite], quantile)
    mae = float(np.mean(np.abs(actual[finite] - mean[finite])))
    inside = (actual >= lower) & (actual <= upper_80)
    coverage = float(inside[finite].mean())
    return (cost if np.isfinite(cost) else None), pinball, mae, coverage


def ranking_cost(score: CandidateScore) -> float | None:
    """What candidates are ranked by: the scorer's cost when there was a scorer (a
    candidate it could not score has none), else plan_cost."""
    return score.cost if score.calibrated is not None else score.plan_cost


def choose(
    scores: Sequence[CandidateScore], candidates: Sequence[str], default: str | None,
    margin: float,
) -> str:
    """The cheapest scored candidate (ranking_cost), unless `default` is within `margin` of
    it; with none scored, the first of PREFERENCE among the candidates."""
    costs = {s.name: c for s in scores if (c := ranking_cost(s)) is not None}
    if not costs:
        return next((c for c in PREFERENCE if c in candidates), candidates[0])
    best = min(costs, key=lambda name: (costs[name], list(candidates).index(name)))
    if default in costs and costs[best] > (1.0 - margin) * costs[default]:
        return default
    return best


def needs_calibration(
    selection: Selection, calibrate: bool | None, coverage_tolerance: float
) -> bool:
    """Whether to calibrate the chosen model: as asked, else when its own 80% interval
    missed its coverage in validation (or was not validated)."""
    if calibrate is not None:
        return calibrate
    score = next((s for s in selection.scores if s.name == selection.chosen), None)
    if score is not None and score.calibrated is not None:
        return score.calibrated  # the band it was priced with
    return coverage_is_off(score, coverage_tolerance)


def coverage_is_off(score: CandidateScore | None, coverage_tolerance: float) -> bool:
    """Whether a candidate's own 80% interval missed its coverage in validation by more than
    `coverage_tolerance` (or was not validated)."""
    if score is None or score.coverage_80 is None or not np.isfinite(score.coverage_80):
        return True
    return abs(score.coverage_80 - 0.8) > coverage_tolerance


def validation_tracker(
    model: ForecastModel, held: np.ndarray, means: np.ndarray, horizon: int, window: int,
    floor: float,
) -> ScoreTracker:
    """A ScoreTracker holding a validation run's scaled out-of-sample errors per horizon."""
    tracker = ScoreTracker(model, horizon, window, floor)
    for h in range(horizon):
        targets = held[h:]
        levels = np.maximum(means[: len(targets), h], 0.0)
        scores = (targets - levels) / level_scale(levels, floor)
        tracker.scores[h].extend(scores[np.isfinite(scores)])
    return tracker


def member_weights(maes: Sequence[float | None]) -> np.ndarray:
    """Weights, summing to 1, inversely proportional to each member's validation MAE at the
    decision horizon (CandidateScore.mae); equal when one is unknown or zero.

    Why not equal: a member much worse than the others on this target drags the average
    towards its errors; why not only the best: the average of members that err differently
    still beats each, as long as the worse ones weigh less."""
    known = np.array([np.nan if mae is None else mae for mae in maes], dtype=float)
    with np.errstate(divide="ignore"):
        inverse = 1.0 / known
    if not np.all(np.isfinite(inverse) & (inverse > 0)):
        return np.full(len(maes), 1.0 / len(maes))
    return inverse / inverse.sum()


def _average_paths(
    paths: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The weighted average of members' (means, own-quantile offsets), as Ensemble averages
    its members: means averaged, quantiles (mean + offset) averaged, offsets taken back."""
    mean = np.average([m for m, _ in paths], axis=0, weights=weights)
    raw = np.average([m[None] + r for m, r in paths], axis=0, weights=weights)
    return mean, raw - mean[None]


def _ranked(selection: Selection) -> list[str]:
    scored = [(cost, s.name) for s in selection.scores if (cost := ranking_cost(s)) is not None]
    return [name for _, name in sorted(scored)]


def _with_chosen(selection: Selection, chosen: str, calibrated: bool) -> Selection:
    return replace(selection, chosen=chosen, calibrated=calibrated)


def _forecast_path(
    model: ForecastModel,
    held: np.ndarray,
    horizon: int,
    quantiles: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Means (len(held), horizon) and own-quantile offsets (len(quantiles), len(held),
    horizon) of a fitted model run through `held` (forecast, then take the next
    value), leaving the model after all of it. Models whose error sample does not change
    between refits are run in one batch."""
    from forecaster.models.ensemble import Ensemble
    from forecaster.models.gbm import GradientBoosting

    qs = list(quantiles)
    if isinstance(model, GradientBoosting) and model.quantile is None:
        _, errors = model._predict(horizon)
        raw = np.quantile(errors, qs, axis=1)  # (len(qs), horizon)
        means = model._forecast_path(held, horizon)
        return means, np.repeat(raw[:, None, :], len(held), axis=1)
    if isinstance(model, (HoltWinters, Naive, SeasonalNaive)):
        _, errors = model._predict(horizon)  # the same sample at every origin
        raw = np.quantile(errors, qs, axis=1) if errors.size else np.zeros((len(qs), horizon))
        means = np.maximum(model._forecast_path(held, horizon), 0.0)
        return means, np.repeat(raw[:, None, :], len(held), axis=1)
    if isinstance(model, Transformed) and isinstance(model.model, HoltWinters):
        return _transformed_path(model, model.model, held, horizon, qs)
    if isinstance(model, Ensemble):
        paths = [_forecast_path(m, held, horizon, qs) for m in model.fitted_]
        return _average_paths(paths, [model.weight_of(m) for m in model.fitted_])
    means = np.empty((len(held), horizon))
    raws = np.empty((len(qs), len(held), horizon))
    previous = None
    for k in range(len(held)):
        mean, errors = model._predict(horizon)
        means[k] = np.maximum(mean, 0.0)
        if previous is not None and np.array_equal(errors, previous):
            raws[:, k] = raws[:, k - 1]  # the same sample: sorting it again costs the most
        else:
            raws[:, k] = np.quantile(errors, qs, axis=1) if errors.size else 0.0
        previous = errors
        model._update(held[k : k + 1])
    return means, raws



def _transformed_path(
    model: Transformed, inner: HoltWinters, held: np.ndarray, horizon: int, qs: list[float]
) -> tuple[np.ndarray, np.ndarray]:
    """_forecast_path of a transformed Holt-Winters in one batch: its inner error sample does
    not change between refits, so each origin's sample is that one mapped back around the
    origin's mean; quantiles are taken a block of origins at a time, their samples within
    PATH_BLOCK_BYTES (each of a few temporaries), to bound a fit's memory at any horizon."""
    _, errors = inner._predict(horizon)
    inner_means = inner._forecast_path(model._forward(held), horizon)
    centre = model._inverse(inner_means)
    raws = np.zeros((len(qs), len(held), horizon))
    if errors.size:
        origins = max(1, PATH_BLOCK_BYTES // (8 * errors.size))  # a block's samples in float64
        for start in range(0, len(held), origins):
            block = slice(start, start + origins)
            sample = model._inverse(inner_means[block, :, None] + errors[None])
            raws[:, block] = np.quantile(sample - centre[block, :, None], qs, axis=2)
    return np.maximum(centre, 0.0), raws
