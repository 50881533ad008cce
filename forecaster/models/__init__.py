"""Models behind one contract, a registry by name, and fitting with a named fallback."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
from numpy.linalg import LinAlgError

from forecaster.errors import ForecasterError, InvalidInputError
from forecaster.models.base import Forecast, ForecastModel
from forecaster.models.ets import HoltWinters
from forecaster.models.naive import Naive, SeasonalNaive

__all__ = [
    "MODEL_FACTORIES",
    "FallbackFit",
    "Forecast",
    "ForecastModel",
    "fit_with_fallback",
    "make_model",
]

MODEL_FACTORIES: dict[str, Callable[[pd.Timedelta], ForecastModel]] = {
    "naive": Naive,
    "seasonal_naive": SeasonalNaive,
    "holt_winters": HoltWinters,
    "holt_winters_damped": lambda step: HoltWinters(step, trend=True, damped=True),
}

FALLBACK_CHAIN = ("seasonal_naive", "naive")


def make_model(name: str, step: pd.Timedelta) -> ForecastModel:
    """A fresh, unfitted model by its registry name."""
    try:
        factory = MODEL_FACTORIES[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_FACTORIES))
        raise InvalidInputError("model", f"unknown model {name!r}; choose one of {known}") from None
    return factory(step)


@dataclass(frozen=True)
class FallbackFit:
    """A fitted model and, when it is not the one asked for, why each better one failed."""

    model: ForecastModel
    requested: str
    failures: tuple[tuple[str, str], ...]

    @property
    def fell_back(self) -> bool:
        return self.model.name != self.requested


def fit_with_fallback(name: str, history: pd.Series, step: pd.Timedelta) -> FallbackFit:
    """Fit `name`; if it cannot fit (too little history, a library error), the next simpler
    model in (seasonal_naive, naive) is fitted instead and the failure recorded."""
    chain = [name, *[fallback for fallback in FALLBACK_CHAIN if fallback != name]]
    if name in FALLBACK_CHAIN:
        chain = list(FALLBACK_CHAIN[FALLBACK_CHAIN.index(name) :])
    failures: list[tuple[str, str]] = []
    for candidate in chain:
        model = make_model(candidate, step)
        try:
            return FallbackFit(model.fit(history), name, tuple(failures))
        except ForecasterError as exc:
            failures.append((candidate, str(exc)))
        except (ValueError, ArithmeticError, LinAlgError) as exc:
            failures.append((candidate, f"{type(exc).__name__}: {exc}"))
    raise ForecasterError(
        "no model could be fitted: " + "; ".join(f"{m}: {why}" for m, why in failures)
    )

