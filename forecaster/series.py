"""Raw observations in, a regular UTC time grid out: parsing, validation, resampling, gaps.

Every value on the grid is known at the end of its interval: short gaps are filled by holding
the last observation (never from later points), so a grid cut after an observation at time t
equals the full grid up to t. That property is what keeps forecasts and backtests free of
look-ahead. (Inside a gap, whether the gap is long is only known later: see `known_at_end`.)
"""

from __future__ import annotations

import reprlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from forecaster.errors import InsufficientHistoryError, InvalidInputError
from forecaster.windows import Window

REQUIRED_COLUMNS = ("timestamp", "value")
DEFAULT_MAX_FILL_STEPS = 3
# The largest value a series may hold: far above any rate, and it keeps the models' sums of
# squares finite (1e308 passes as finite, and its square is not).
MAX_VALUE = 1e15


@dataclass(frozen=True)
class Gap:
    """A run of grid intervals with no observation, longer than the fill limit."""

    start: pd.Timestamp
    end: pd.Timestamp  # start of the last missing interval
    steps: int


@dataclass(frozen=True)
class RegularSeries:
    """Values on a regular grid of `step`, labelled by interval start (UTC).

    `demand` is the mean of the raw values in each interval (NaN where there were none);
    `filled` holds short gaps with the last observation and leaves long gaps NaN.
    """

    demand: pd.Series
    filled: pd.Series
    step: pd.Timedelta
    gaps: tuple[Gap, ...]
    held_steps: int
    max_fill_steps: int = DEFAULT_MAX_FILL_STEPS

    @property
    def steps_per_day(self) -> int:
        return int(pd.Timedelta(days=1) / self.step)


def read_csv(path: str | Path) -> pd.Series:
    """Read a `timestamp,value` CSV of raw observations; raise naming the line on bad input."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInputError("input", f"cannot read {str(path)!r}: {exc.strerror}") from exc
    try:
        # utf-8-sig: spreadsheet exports start with a byte-order mark that would hide 'timestamp'.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidInputError(
            "input",
            f"{str(path)!r} is not UTF-8 text (byte {data[exc.start]:#04x}); "
            "save it as UTF-8",
            line=line,
        ) from exc
    try:
        return parse_csv_text(text)
    except InvalidInputError as exc:  # say which file: the demo reads a folder of them
        raise InvalidInputError(
            exc.field, f"{exc.reason} (in {str(path)!r})", line=exc.line
        ) from exc


def parse_csv_text(text: str) -> pd.Series:
    """Parse CSV text with columns `timestamp,value` into a UTC-indexed float series.

    Timestamps are ISO-8601; one without a zone is taken as UTC. Values are finite,
    non-negative numbers. Timestamps must be strictly increasing: a duplicate or an
    out-of-order row is rejected (not sorted), since either means the export is broken.
    """
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise InvalidInputError("header", "the file is empty; expected a 'timestamp,value' header")
    header = [name.strip().lower() for name in lines[0].split(",")]
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise InvalidInputError(
            "header",
            f"missing column(s) {', '.join(missing)}; expected 'timestamp,value', "
            f"got {reprlib.repr(lines[0])}",
            line=1,
        )
    time_col, value_col = header.index("timestamp"), header.index("value")
    rows = [(number, line) for number, line in enumerate(lines[1:], start=2) if line.strip()]
    if not rows:
        raise InvalidInputError("input", "no data rows after the header")
    raw_times: list[str] = []
    raw_values: list[str] = []
    for number, line in rows:
        cells = line.split(",")
        if len(cells) != len(header):
            raise InvalidInputError(
                "row", f"expected {len(header)} fields, got {len(cells)}", line=number
            )
        raw_times.append(cells[time_col].strip())
        raw_values.append(cells[value_col].strip())
    line_numbers = np.array([number for number, _ in rows])
    times = _parse_times(raw_times, line_numbers)
    values = _parse_values(raw_values, line_numbers)
    _check_increasing(times, line_numbers)
    return pd.Series(values, index=times, name="value")


def _parse_times(raw: list[str], line_numbers: np.ndarray) -> pd.DatetimeIndex:
    parsed = pd.to_datetime(pd.Series(raw), errors="coerce", utc=True, format="ISO8601")
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if bad.size:
        i = int(bad[0])
        raise InvalidInputError(
            "timestamp",
            f"cannot parse {reprlib.repr(raw[i])} as an ISO-8601 time "
            "(e.g. 2024-05-01T12:00:00Z)",
            line=int(line_numbers[i]),
        )
    # Parsing keeps a coarser unit where nanoseconds overflow; the grid is in nanoseconds.
    first, last = pd.Timestamp.min.tz_localize("UTC"), pd.Timestamp.max.tz_localize("UTC")
    outside = np.flatnonzero(((parsed < first) | (parsed > last)).to_numpy())
    if outside.size:
        i = int(outside[0])
        raise InvalidInputError(
            "timestamp",
            f"{reprlib.repr(raw[i])} is outside the supported range "
            f"{first.date()} .. {last.date()}",
            line=int(line_numbers[i]),
        )
    return pd.DatetimeIndex(parsed).as_unit("ns")


def _parse_values(raw: list[str], line_numbers: np.ndarray) -> np.ndarray:
    values = pd.to_numeric(pd.Series(raw), errors="coerce").to_numpy(dtype=float)
    not_finite = np.flatnonzero(~np.isfinite(values))
    if not_finite.size:
        i = int(not_finite[0])
        raise InvalidInputError(
            "value", f"{reprlib.repr(raw[i])} is not a finite number", line=int(line_numbers[i])
        )
    negative = np.flatnonzero(values < 0)
    if negative.size:
        i = int(negative[0])
        raise InvalidInputError(
            "value",
            f"{raw[i]!r} is negative; a request rate is a non-negative number",
            line=int(line_numbers[i]),
        )
    huge = np.flatnonzero(values > MAX_VALUE)
    if huge.size:
        i = int(huge[0])
        raise InvalidInputError(
            "value",
            f"{reprlib.repr(raw[i])} is above {MAX_VALUE:g}, the largest value accepted (the "
            f"models' sums of squares must stay finite); scale the series down",
            line=int(line_numbers[i]),
        )
    return values


def _check_increasing(times: pd.DatetimeIndex, line_numbers: np.ndarray) -> None:
    deltas = np.diff(times.asi8)
    bad = np.flatnonzero(deltas <= 0)
    if bad.size:
        i = int(bad[0]) + 1
        kind = "duplicates" if deltas[i - 1] == 0 else "is earlier than"
        raise InvalidInputError(
            "timestamp",
            f"{times[i].isoformat()} {kind} the previous row's {times[i - 1].isoformat()}; "
            "rows must be sorted by strictly increasing time (sort and de-duplicate the export)",
            line=int(line_numbers[i]),
        )


def validate_observations(raw: pd.Series) -> pd.Series:
    """Check an in-memory series (e.g. from Prometheus or a JSON body) like a CSV file."""
    if not isinstance(raw.index, pd.DatetimeIndex):
        raise InvalidInputError("timestamp", "the index must be timestamps")
    index = raw.index.tz_localize("UTC") if raw.index.tz is None else raw.index.tz_convert("UTC")
    values = raw.to_numpy(dtype=float)
    lines = np.arange(1, len(values) + 1)
    _check_increasing(pd.DatetimeIndex(index), lines)
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
    if bad.size:
        i = int(bad[0])
        raise InvalidInputError(
            "value", f"point {i + 1} ({index[i].isoformat()}) is {values[i]!r}; "
            "values must be finite and non-negative"
        )
    return pd.Series(values, index=index.as_unit("ns"), name=raw.name)


def to_grid(
    raw: pd.Series,
    step: pd.Timedelta,
    *,
    max_fill_steps: int = DEFAULT_MAX_FILL_STEPS,
    end: pd.Timestamp | None = None,
) -> RegularSeries:
    """Resample raw observations onto epoch-aligned UTC bins of `step`, labelled by start.

    Runs of at most `max_fill_steps` empty bins hold the last observation; longer runs stay
    NaN and are listed in `gaps`. `end`, if given, extends the grid to the bin holding it.
    """
    if step <= pd.Timedelta(0):
        raise InvalidInputError("step", f"must be positive, got {step}")
    if raw.empty:
        raise InsufficientHistoryError("resampling", needed=1, available=0)
    rule = pd.Timedelta(step)
    demand = raw.resample(rule, origin="epoch", label="left", closed="left").mean()
    if end is not None:
        last = pd.Timestamp(end)
        last = last.tz_localize("UTC") if last.tzinfo is None else last.tz_convert("UTC")
        full = pd.date_range(demand.index[0], last.floor(rule), freq=rule)
        demand = demand.reindex(full)
    # pandas 3 defaults to microseconds; the grid (and the models' step check) is in ns.
    demand.index = pd.DatetimeIndex(demand.index).as_unit("ns")
    demand.index.name = "timestamp"
    demand = demand.rename("demand")
    values = demand.to_numpy(dtype=float)
    held_values = hold_short_gaps(values, max_fill_steps)
    filled = pd.Series(held_values, index=demand.index, name="filled")
    held = int(np.isnan(values).sum() - np.isnan(held_values).sum())
    still_missing = np.isnan(held_values)
    starts = np.flatnonzero(still_missing & ~np.r_[False, still_missing[:-1]])
    ends = np.flatnonzero(still_missing & ~np.r_[still_missing[1:], False])
    gaps = [
        Gap(demand.index[int(a)], demand.index[int(b)], int(b - a + 1))
        for a, b in zip(starts, ends, strict=True)
    ]
    return RegularSeries(
        demand=demand,
        filled=filled,
        step=rule,
        gaps=tuple(gaps),
        held_steps=held,
        max_fill_steps=max_fill_steps,
    )


def known_at_end(grid: RegularSeries) -> pd.Series:
    """The value each interval has when it ends, before later points are seen.

    Equal to `grid.filled` except inside a long gap, whose first `max_fill_steps` intervals
    are held: at their end nobody knows yet that the gap will turn out long.
    """
    return grid.demand.ffill(limit=grid.max_fill_steps).rename("filled")


class GridBuffer:
    """A trailing window of a regular grid, kept as a bare float array with an implicit index.

    The engine keeps one per target: a pandas Series per target would cost several times the
    memory for 1,000 targets. Appends follow the same rules as `to_grid`: points land in the
    epoch-aligned bin that holds them, short gaps hold the last value, long gaps stay NaN.
    """

    def __init__(
        self, step: pd.Timedelta, window: pd.Timedelta, max_fill_steps: int = DEFAULT_MAX_FILL_STEPS
    ) -> None:
        self.step = pd.Timedelta(step)
        self.capacity = max(1, int(window / self.step))
        self.max_fill_steps = max_fill_steps
        self.start: pd.Timestamp | None = None
        self.values = np.empty(0)

    def __len__(self) -> int:
        return int(self.values.size)

    @property
    def last(self) -> pd.Timestamp | None:
        """Start of the newest bin held, or None when empty."""
        if self.start is None or not self.values.size:
            return None
        return self.start + (self.values.size - 1) * self.step

    def observed(self) -> int:
        return int(np.isfinite(self.values).sum())

    def extend(self, points: pd.Series) -> pd.Series:
        """Add raw points newer than the last bin; return the bins added, as a grid series."""
        if points.empty:
            return pd.Series(dtype=float)
        bins = pd.DatetimeIndex(points.index).floor(self.step)
        means = points.groupby(bins).mean()
        last = self.last
        if last is not None:
            means = means[means.index > last]
            if means.empty:
                return pd.Series(dtype=float)
        first = means.index[0] if last is None else last + self.step
        count = int((means.index[-1] - first) / self.step) + 1
        added = np.full(count, np.nan)
        positions = ((pd.DatetimeIndex(means.index) - first) / self.step).astype(int)
        added[np.asarray(positions)] = means.to_numpy(dtype=float)
        previous = self.values[-self.max_fill_steps - 1 :] if self.values.size else np.empty(0)
        joined = hold_short_gaps(np.concatenate([previous, added]), self.max_fill_steps)
        added = joined[previous.size :]
        if self.start is None:
            self.start = first
        self.values = np.concatenate([self.values, added])
        overflow = self.values.size - self.capacity
        if overflow > 0:
            self.values = self.values[overflow:]
            self.start = self.start + overflow * self.step
        index = pd.date_range(first, periods=count, freq=self.step)
        return pd.Series(added, index=index)

    def series(self) -> pd.Series:
        """The whole window as a grid series (a copy)."""
        if self.start is None:
            return pd.Series(dtype=float)
        index = pd.date_range(self.start, periods=self.values.size, freq=self.step)
        return pd.Series(self.values.copy(), index=index)


def hold_short_gaps(values: np.ndarray, max_fill_steps: int) -> np.ndarray:
    """Fill runs of at most `max_fill_steps` NaN with the value before them (a copy).

    Runs at the start (nothing before them) or longer than the limit stay NaN. Only earlier
    values are used, so filling a prefix of a series gives a prefix of the filled series.
    """
    out = values.copy()
    missing = ~np.isfinite(out)
    if not missing.any():
        return out
    starts = np.flatnonzero(missing & ~np.r_[False, missing[:-1]])
    ends = np.flatnonzero(missing & ~np.r_[missing[1:], False])
    for first, last in zip(starts, ends, strict=True):
        if first > 0 and last - first + 1 <= max_fill_steps:
            out[first : last + 1] = out[first - 1]
    return out


def mask_windows(series: pd.Series, step_seconds: int, windows: Sequence[Window]) -> pd.Series:
    """The series with every bin that overlaps a window set to NaN (missing, as for a gap)."""
    if not windows or series.empty:
        return series
    starts = np.asarray(pd.DatetimeIndex(series.index).as_unit("ns").asi8) / 1e9
    hit = np.zeros(len(series), dtype=bool)
    for window in windows:
        hit |= (starts < window.end) & (starts + step_seconds > window.start)
    if not hit.any():
        return series
    values = series.to_numpy(dtype=float, copy=True)
    values[hit] = np.nan
    return pd.Series(values, index=series.index, name=series.name)
