"""A cheap `auto` for tests: the selection logic whole, on three fast candidates and a day
of validation (the full candidate set is tested in test_selection and test_backtest)."""

from __future__ import annotations

import pandas as pd

from forecaster.models import Auto
from forecaster.models.selection import PlanScorer

FAST_CANDIDATES = ("naive", "seasonal_naive", "holt_winters")
FAST_VALIDATION = pd.Timedelta(days=1)


def fast_auto(step: pd.Timedelta, *, quantile: float = 0.9, horizon: int = 2,
              scorer: PlanScorer | None = None) -> Auto:
    """An `auto` with three cheap candidates and one day of validation; a ModelFactory, e.g.
    monkeypatch.setitem(MODEL_FACTORIES, "auto", fast_auto)."""
    return Auto(step, quantile=quantile, horizon=horizon, candidates=FAST_CANDIDATES,
                validation=FAST_VALIDATION, scorer=scorer)
