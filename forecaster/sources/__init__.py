"""Where history comes from: Prometheus, or a bundled trace replayed as if live."""

from __future__ import annotations

import reprlib
from datetime import datetime
from typing import Protocol

import pandas as pd

_QUERY_REPR = reprlib.Repr()
_QUERY_REPR.maxstring = 200


def quoted_query(query: str) -> str:
    """A query as errors and logs show it: whole up to 200 characters, else its two ends
    (a query may be 8 KiB, too long for a gRPC status or a log line)."""
    return _QUERY_REPR.repr(query)


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
