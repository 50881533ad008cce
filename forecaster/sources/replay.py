"""A bundled trace replayed as if live: the embedded default behind `forecaster serve --demo`.

Wall-clock time maps onto the trace so that at start-up "now" sits two days before the
trace's end: there is history behind and future ahead. Time then advances with the clock,
and any time outside the trace wraps around by whole weeks, which keeps times of day and days
of week where they were. A query names a bundled trace by its file stem; a value at time T is
the mean of the trace's samples in (T - window, T], as `rate(x[window])` would give.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from forecaster.errors import SourceError
from forecaster.series import read_csv
from forecaster.sources import quoted_query

WEEK_SECONDS = 7 * 86_400
LEAD_BEFORE_END = pd.Timedelta(days=2)
INSTANT_WINDOW_SECONDS = 300


class _Trace:
    """One trace as seconds and running sums, for O(log n) window means."""

    def __init__(self, raw: pd.Series) -> None:
        self.seconds = (pd.DatetimeIndex(raw.index).asi8 // 1_000_000_000).astype(np.int64)
        self.sums = np.concatenate([[0.0], np.cumsum(raw.to_numpy(dtype=float))])
        self.start = int(self.seconds[0])
        self.end = int(self.seconds[-1])
        weeks = (self.end - self.start) // WEEK_SECONDS
        if weeks < 1:
            raise SourceError("a replayed trace must span at least one week")
        self.period = int(weeks * WEEK_SECONDS)

    def wrap(self, t: np.ndarray) -> np.ndarray:
        """Trace times for trace-relative times, folded into the trace by whole weeks."""
        last_start = self.end - self.period
        return np.where(
            (t > self.end) | (t <= self.start),
            last_start + np.mod(t - last_start, self.period),
            t,
        )

    def window_means(self, t: np.ndarray, window: int) -> np.ndarray:
        hi = np.searchsorted(self.seconds, t, side="right")
        lo = np.searchsorted(self.seconds, t - window, side="right")
        count = hi - lo
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, (self.sums[hi] - self.sums[lo]) / count, np.nan)


class ReplaySource:
    """A HistorySource over bundled traces, played against the clock.

    >>> source = ReplaySource.from_folder(Path("data"))                # doctest: +SKIP
    >>> source.query_instant("nasa_http_1995_requests_per_minute")     # doctest: +SKIP
    """

    def __init__(
        self,
        traces: Mapping[str, pd.Series],
        *,
        clock: Callable[[], float] = time.time,
        started_at: float | None = None,
    ) -> None:
        if not traces:
            raise SourceError("no traces to replay")
        self._traces = {name: _Trace(raw) for name, raw in traces.items()}
        self.clock = clock
        now = clock() if started_at is None else started_at
        # Each trace gets its own offset: wall time minus offset = trace time.
        self._offsets = {
            name: int(now) - (trace.end - int(LEAD_BEFORE_END.total_seconds()))
            for name, trace in self._traces.items()
        }

    @classmethod
    def from_folder(
        cls, folder: Path, *, clock: Callable[[], float] = time.time, max_step: str = "1h"
    ) -> ReplaySource:
        """Every sub-daily `*.csv` trace in `folder` (daily ones are no use to a scaler)."""
        traces = {}
        for path in sorted(folder.glob("*.csv")):
            raw = read_csv(path)
            steps = np.diff(pd.DatetimeIndex(raw.index).asi8)
            median_step = pd.Timedelta(float(np.median(steps)), unit="ns")
            if median_step <= pd.Timedelta(max_step):
                traces[path.stem] = raw
        return cls(traces, clock=clock)

    @property
    def queries(self) -> list[str]:
        return sorted(self._traces)

    def _trace(self, query: str) -> tuple[_Trace, int]:
        name = query.strip()
        if name not in self._traces:
            raise SourceError(
                f"the demo replays bundled traces only; query {quoted_query(query)} names none of "
                f"{', '.join(self.queries)}",
                query=query,
            )
        return self._traces[name], self._offsets[name]

    def window(self, query: str, *, days: float) -> tuple[datetime, datetime]:
        """The last `days` of history up to now, as query_range bounds."""
        self._trace(query)
        now = self.clock()
        return (
            datetime.fromtimestamp(now - days * 86_400, UTC),
            datetime.fromtimestamp(now, UTC),
        )

    def query_range(
        self, query: str, start: datetime, end: datetime, step_seconds: int
    ) -> pd.Series:
        trace, offset = self._trace(query)
        first = math.ceil(start.timestamp())
        # Whole seconds, as Prometheus's grid: at epoch magnitudes a float `end + 1e-9` is
        # `end` itself, and arange would leave out the point at `end`.
        last = math.floor(end.timestamp())
        times = np.arange(first, last + 1, step_seconds, dtype=np.int64)
        values = trace.window_means(trace.wrap(times - offset), step_seconds)
        keep = np.isfinite(values)
        index = pd.DatetimeIndex(pd.to_datetime(times[keep], unit="s", utc=True), name="timestamp")
        return pd.Series(values[keep], index=index.as_unit("ns"), name=query)

    def query_instant(self, query: str, at: datetime | None = None) -> tuple[datetime, float]:
        trace, offset = self._trace(query)
        now = int(at.timestamp() if at is not None else self.clock())
        value = trace.window_means(
            trace.wrap(np.array([now - offset])), INSTANT_WINDOW_SECONDS
        )[0]
        if not np.isfinite(value):
            raise SourceError(
                f"the replayed trace {quoted_query(query)} has no sample near now", query=query
            )
        return datetime.fromtimestamp(now, UTC), float(value)
