"""Models behind one contract, a registry by name, and fitting with a named fallback."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import pandas as pd
from numpy.linalg import LinAlgError

from forecaster.errors import ForecasterError, InvalidInputError
from forecaster.models.base import Forecast, ForecastModel
from forecaster.models.ensemble import Ensemble
from forecaster.models.ets import HoltWinters
from forecaster.models.gbm import GradientBoosting
from forecaster.models.local_time import in_time_zone
from forecaster.models.mstl import MSTLModel
from forecaster.models.naive import Naive, SeasonalNaive
from forecaster.models.selection import Auto, PlanScorer, RunCost, ValidationRun
from forecaster.models.transform import Transformed

__all__ = [
    "MODEL_FACTORIES",
    "FallbackFit",
    "Forecast",
    "ForecastModel",
    "PlanScorer",
    "RunCost",
    "ValidationRun",
    "fit_with_fallback",
    "make_model",
]


class ModelFactory(Protocol):
    """Builds an unfitted model; `quantile` and `horizon` (steps) are what the scaler plans
    for, and `scorer` what its plan costs, used by models that tune themselves to them
    (`auto`) and ignored by the others."""

    def __call__(
        self, step: pd.Timedelta, *, quantile: float, horizon: int,
        scorer: PlanScorer | None = None,
    ) -> ForecastModel: ...


def _simple(build: Callable[[pd.Timedelta], ForecastModel]) -> ModelFactory:
    def factory(
        step: pd.Timedelta, *, quantile: float, horizon: int, scorer: PlanScorer | None = None
    ) -> ForecastModel:
        return build(step)

    return factory


def _gbm(
    step: pd.Timedelta, *, quantile: float, horizon: int, scorer: PlanScorer | None = None
) -> ForecastModel:
    return GradientBoosting(step, horizon=horizon)


def _gbm_quantile(
    step: pd.Timedelta, *, quantile: float, horizon: int, scorer: PlanScorer | None = None
) -> ForecastModel:
    return GradientBoosting(step, horizon=horizon, quantile=quantile)


def _ensemble(
    step: pd.Timedelta, *, quantile: float, horizon: int, scorer: PlanScorer | None = None
) -> ForecastModel:
    return Ensemble(
        step,
        [
            HoltWinters(step),
            Transformed(step, HoltWinters(step), "sqrt"),
            GradientBoosting(step, horizon=horizon),
        ],
    )


def _auto(
    step: pd.Timedelta, *, quantile: float, horizon: int, scorer: PlanScorer | None = None
) -> ForecastModel:
    return Auto(step, quantile=quantile, horizon=horizon, scorer=scorer)


MODEL_FACTORIES: dict[str, ModelFactory] = {
    "naive": _simple(Naive),
    "seasonal_naive": _simple(SeasonalNaive),
    "holt_winters": _simple(HoltWinters),
    "holt_winters_damped": _simple(lambda step: HoltWinters(step, trend=True, damped=True)),
    "holt_winters_sqrt": _simple(lambda step: Transformed(step, HoltWinters(step), "sqrt")),
    "mstl": _simple(MSTLModel),
    "mstl_sqrt": _simple(lambda step: Transformed(step, MSTLModel(step), "sqrt")),
    "gbm": _gbm,
    "gbm_quantile": _gbm_quantile,
    "ensemble": _ensemble,
    "auto": _auto,
}

FALLBACK_CHAIN = ("seasonal_naive", "naive")
DEFAULT_QUANTILE = 0.9
DEFAULT_HORIZON = 2
DEFAULT_TIME_ZONE = "UTC"


def make_model(
    name: str,
    step: pd.Timedelta,
    *,
    quantile: float = DEFAULT_QUANTILE,
    horizon: int = DEFAULT_HORIZON,
    time_zone: str = DEFAULT_TIME_ZONE,
    scorer: PlanScorer | None = None,
) -> ForecastModel:
    """A fresh, unfitted model by its registry name; see ModelFactory for quantile, horizon
    and scorer. Outside UTC it runs on the wall clock of `time_zone` (see
    forecaster.models.local_time)."""
    try:
        factory = MODEL_FACTORIES[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_FACTORIES))
        raise InvalidInputError("model", f"unknown model {name!r}; choose one of {known}") from None
    return in_time_zone(
        factory(step, quantile=quantile, horizon=horizon, scorer=scorer), time_zone
    )


@dataclass(frozen=True)
class FallbackFit:
    """A fitted model and, when it is not the one asked for, why each better one failed."""

    model: ForecastModel
    requested: str
    failures: tuple[tuple[str, str], ...]

    @property
    def fell_back(self) -> bool:
        return self.model.name != self.requested


def fit_with_fallback(
    name: str,
    history: pd.Series,
    step: pd.Timedelta,
    *,
    quantile: float = DEFAULT_QUANTILE,
    horizon: int = DEFAULT_HORIZON,
    time_zone: str = DEFAULT_TIME_ZONE,
    previous: ForecastModel | None = None,
    scorer: PlanScorer | None = None,
) -> FallbackFit:
    """Fit `name`; if it cannot fit (too little history, a library error), the next simpler
    model in (seasonal_naive, naive) is fitted instead and the failure recorded.

    `previous` is the model this fit replaces: what it learned that is costly to relearn (the
    choice `auto` made, its calibration) is carried over; see ForecastModel.warm_start.
    `scorer` is what `auto` ranks its candidates by (see forecaster.models.selection)."""
    chain = [name, *[fallback for fallback in FALLBACK_CHAIN if fallback != name]]
    if name in FALLBACK_CHAIN:
        chain = list(FALLBACK_CHAIN[FALLBACK_CHAIN.index(name) :])
    failures: list[tuple[str, str]] = []
    for candidate in chain:
        model = make_model(
            candidate, step, quantile=quantile, horizon=horizon, time_zone=time_zone,
            scorer=scorer,
        )
        if previous is not None:
            model.warm_start(previous)
        try:
            return FallbackFit(model.fit(history), name, tuple(failures))
        except ForecasterError as exc:
            failures.append((candidate, str(exc)))
        except (ValueError, ArithmeticError, LinAlgError) as exc:
            failures.append((candidate, f"{type(exc).__name__}: {exc}"))
    raise ForecasterError(
        "no model could be fitted: " + "; ".join(f"{m}: {why}" for m, why in failures)
    )

