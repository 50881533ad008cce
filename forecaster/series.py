"""Raw observations in, a regular UTC time grid out: parsing, validation, resampling, gaps.

Every value on the grid is known at the end of its interval: short gaps are filled by holding
the last observation (never from later points), so a grid cut at time t equals the full grid up
to t. That property is what keeps forecasts and backtests free of look-ahead.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from forecaster.errors import InsufficientHistoryError, InvalidInputError

REQUIRED_COLUMNS = ("timestamp", "value")
DEFAULT_MAX_FILL_STEPS = 3


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

    @property
    def steps_per_day(self) -> int:
        return int(pd.Timedelta(days=1) / self.step)


def read_csv(path: str | Path) -> pd.Series:
    """Read a `timestamp,value` CSV of raw observations; raise naming the line on bad input."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError("input", f"cannot read {str(path)!r}: {exc.strerror}") from exc
    return parse_csv_text(text)


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
    demand.index.name = "timestamp"
    demand = demand.rename("demand")
    missing = demand.isna().to_numpy()
    run_ids = np.cumsum(~missing)
    filled = demand.copy()
    gaps: list[Gap] = []
    held = 0
    if missing.any():
        starts = np.flatnonzero(missing & ~np.r_[False, missing[:-1]])
        ends = np.flatnonzero(missing & ~np.r_[missing[1:], False])
        holdable = np.zeros_like(missing)
        for first, last_i in zip(starts, ends, strict=True):
            length = int(last_i - first + 1)
            if length <= max_fill_steps and first > 0:
                holdable[first : last_i + 1] = True
                held += length
            else:
                gaps.append(Gap(demand.index[int(first)], demand.index[int(last_i)], length))
        held_values = demand.groupby(run_ids).transform("first").to_numpy()
        values = filled.to_numpy(copy=True)
        values[holdable] = held_values[holdable]
        filled = pd.Series(values, index=demand.index, name="filled")
    else:
        filled = filled.rename("filled")
    return RegularSeries(
        demand=demand, filled=filled, step=rule, gaps=tuple(gaps), held_steps=held
    )
