"""The demo's replayed traces: where now lands, how time wraps, what a query returns."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from forecaster.errors import SourceError
from forecaster.sources.replay import ReplaySource

DATA = Path(__file__).parent.parent / "data"
AWS = "aws_elb_request_count_8c0756"


def _raw() -> pd.Series:
    from forecaster.series import read_csv

    return read_csv(DATA / f"{AWS}.csv")


class FixedClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_now_sits_two_days_before_the_trace_end() -> None:
    raw = _raw()
    clock = FixedClock(datetime(2030, 1, 1, tzinfo=UTC).timestamp())
    source = ReplaySource({AWS: raw}, clock=clock)
    _, value = source.query_instant(AWS)
    trace_now = raw.index[-1] - pd.Timedelta(days=2)
    window = raw[(raw.index > trace_now - pd.Timedelta(minutes=5)) & (raw.index <= trace_now)]
    assert value == pytest.approx(window.mean())


def test_range_values_are_window_means_of_the_trace() -> None:
    raw = _raw()
    started = datetime(2030, 1, 1, tzinfo=UTC)
    source = ReplaySource({AWS: raw}, clock=FixedClock(started.timestamp()))
    end = started
    series = source.query_range(AWS, end - timedelta(hours=6), end, 300)
    offset = pd.Timestamp(started) - (raw.index[-1] - pd.Timedelta(days=2))
    for stamp, value in series.iloc[::7].items():
        t = stamp - offset
        window = raw[(raw.index > t - pd.Timedelta(minutes=5)) & (raw.index <= t)]
        assert value == pytest.approx(window.mean())


def test_time_past_the_end_wraps_by_whole_weeks() -> None:
    raw = _raw()
    started = datetime(2030, 1, 1, tzinfo=UTC)
    clock = FixedClock(started.timestamp())
    source = ReplaySource({AWS: raw}, clock=clock)
    later = started + timedelta(days=3)  # one day past the trace's end
    period = (raw.index[-1] - raw.index[0]) // pd.Timedelta(weeks=1) * pd.Timedelta(weeks=1)
    _, wrapped = source.query_instant(AWS, later)
    offset = pd.Timestamp(started) - (raw.index[-1] - pd.Timedelta(days=2))
    t = pd.Timestamp(later) - offset - period
    window = raw[(raw.index > t - pd.Timedelta(minutes=5)) & (raw.index <= t)]
    assert wrapped == pytest.approx(window.mean())
    assert period % pd.Timedelta(weeks=1) == pd.Timedelta(0)


def test_a_long_history_window_is_served_by_wrapping() -> None:
    source = ReplaySource({AWS: _raw()}, clock=FixedClock(1.9e9))
    now = datetime.fromtimestamp(1.9e9, UTC)
    series = source.query_range(AWS, now - timedelta(days=28), now, 300)
    assert len(series) > 0.95 * 28 * 288
    assert np.isfinite(series.to_numpy()).all()
    assert series.index[-1] <= pd.Timestamp(now)


def test_unknown_query_names_the_bundled_traces() -> None:
    source = ReplaySource({AWS: _raw()})
    with pytest.raises(SourceError, match=AWS):
        source.query_instant("sum(rate(http_requests_total[5m]))")


def test_an_unknown_long_query_is_quoted_by_its_ends() -> None:
    source = ReplaySource({AWS: _raw()})
    query = "sum(rate(http_requests_total[5m]))" + " or vector(0)" * 600  # 7.8 KiB
    with pytest.raises(SourceError) as raised:
        source.query_instant(query)
    message = str(raised.value)
    assert len(message) < 400, message
    assert query[:50] in message and query[-50:] in message and AWS in message


def test_from_folder_skips_daily_traces() -> None:
    source = ReplaySource.from_folder(DATA)
    assert AWS in source.queries
    assert "wikipedia_peyton_manning_daily_pageviews" not in source.queries
