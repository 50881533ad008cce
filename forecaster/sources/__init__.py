"""Where history comes from: Prometheus, or a bundled trace replayed as if live."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

import pandas as pd


class HistorySource(Protocol):
    """What the engine needs of a metrics backend: one series per query."""

    def query_range(
        self, query: str, start: datetime, end: datetime, step_seconds: int
    ) -> pd.Series:
        """Values of `query` at start, start + step, ... <= end (UTC index)."""
        ...

    def query_instant(self, query: str, at: datetime | None = None) -> tuple[datetime, float]:
        """The current value of `query` and its timestamp."""
        ...
