"""The CSV reader's errors (by field and line), and the grid: bins, gaps, causality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forecaster.errors import InsufficientHistoryError, InvalidInputError
from forecaster.models.naive import Naive
from forecaster.series import known_at_end, parse_csv_text, read_csv, to_grid

STEP = pd.Timedelta("5min")
HEADER = "timestamp,value"


def csv(*rows: str, header: str = HEADER) -> str:
    return "\n".join([header, *rows]) + "\n"


def error_for(text: str) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as caught:
        parse_csv_text(text)
    return caught.value


def utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text).tz_convert("UTC") if "Z" in text else pd.Timestamp(text, tz="UTC")


def raw_series(times: list[str], values: list[float]) -> pd.Series:
    index = pd.DatetimeIndex([pd.Timestamp(t) for t in times]).as_unit("ns")
    return pd.Series(values, index=index, dtype=float)


# --- bad input: each case names its field and line ----------------------------------------


def test_empty_text_is_a_header_error() -> None:
    error = error_for("")
    assert error.field == "header"
    assert "empty" in error.reason


def test_blank_first_line_is_a_header_error() -> None:
    assert error_for("\n2024-01-01T00:00Z,1\n").field == "header"


def test_header_only_has_no_data_rows() -> None:
    error = error_for("timestamp,value\n\n")
    assert error.field == "input"
    assert "no data rows" in error.reason


@pytest.mark.parametrize(
    ("header", "missing"),
    [
        ("time,value", ["timestamp"]),
        ("timestamp,count", ["value"]),
        ("a,b", ["timestamp", "value"]),
    ],
)
def test_missing_columns_are_named_on_line_1(header: str, missing: list[str]) -> None:
    error = error_for(csv("2024-01-01T00:00Z,1", header=header))
    assert (error.field, error.line) == ("header", 1)
    for name in missing:
        assert name in error.reason
    assert header in error.reason  # shows what it got


@pytest.mark.parametrize(
    ("bad_time", "line"),
    [("yesterday", 3), ("2024-13-01T00:00Z", 3), ("", 3), ("2024-01-01X00:00", 3)],
)
def test_unparsable_time_names_its_line(bad_time: str, line: int) -> None:
    error = error_for(csv("2024-01-01T00:00Z,1", f"{bad_time},2", "2024-01-01T00:10Z,3"))
    assert (error.field, error.line) == ("timestamp", line)
    assert "ISO-8601" in error.reason


def test_line_numbers_count_blank_lines_in_the_file() -> None:
    text = csv("2024-01-01T00:00Z,1", "", "", "2024-01-01T00:05Z,oops")
    assert error_for(text).line == 5


@pytest.mark.parametrize("bad_value", ["abc", "1;5", "0x10", "1e", "--1"])
def test_unparsable_value_names_its_line(bad_value: str) -> None:
    rows = ("2024-01-01T00:00Z,1", "2024-01-01T00:05Z,2", f"2024-01-01T00:10Z,{bad_value}")
    error = error_for(csv(*rows))
    assert (error.field, error.line) == ("value", 4)
    assert "not a finite number" in error.reason


@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_value_names_its_line(empty: str) -> None:
    error = error_for(csv(f"2024-01-01T00:00Z,{empty}"))
    assert (error.field, error.line) == ("value", 2)


@pytest.mark.parametrize("not_finite", ["inf", "-inf", "Infinity", "nan", "NaN", "1e400"])
def test_non_finite_value_names_its_line(not_finite: str) -> None:
    error = error_for(csv("2024-01-01T00:00Z,1", f"2024-01-01T00:05Z,{not_finite}"))
    assert (error.field, error.line) == ("value", 3)
    assert "not a finite number" in error.reason


@pytest.mark.parametrize("negative", ["-1", "-0.001", "-1e-9"])
def test_negative_value_names_its_line(negative: str) -> None:
    error = error_for(csv("2024-01-01T00:00Z,1", f"2024-01-01T00:05Z,{negative}"))
    assert (error.field, error.line) == ("value", 3)
    assert "negative" in error.reason


def test_duplicate_timestamp_names_the_second_line() -> None:
    error = error_for(csv("2024-01-01T00:00Z,1", "2024-01-01T00:05Z,2", "2024-01-01T00:05Z,3"))
    assert (error.field, error.line) == ("timestamp", 4)
    assert "duplicates" in error.reason


def test_the_same_instant_in_another_zone_is_a_duplicate() -> None:
    error = error_for(csv("2024-01-01T00:00:00Z,1", "2024-01-01T01:00:00+01:00,2"))
    assert (error.field, error.line) == ("timestamp", 3)
    assert "duplicates" in error.reason


def test_unsorted_timestamp_names_its_line() -> None:
    error = error_for(csv("2024-01-01T00:00Z,1", "2024-01-01T00:10Z,2", "2024-01-01T00:05Z,3"))
    assert (error.field, error.line) == ("timestamp", 4)
    assert "earlier than" in error.reason
    assert "sort" in error.reason


@pytest.mark.parametrize(
    "row", ["2024-01-01T00:05Z,2,3", "2024-01-01T00:05Z", "2024-01-01T00:05Z,2,"]
)
def test_wrong_number_of_fields_names_its_line(row: str) -> None:
    error = error_for(csv("2024-01-01T00:00Z,1", row))
    assert (error.field, error.line) == ("row", 3)
    assert "expected 2 fields" in error.reason


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError) as caught:
        read_csv(tmp_path / "absent.csv")
    assert caught.value.field == "input"
    assert "absent.csv" in caught.value.reason


def test_empty_file_is_a_header_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(InvalidInputError) as caught:
        read_csv(path)
    assert caught.value.field == "header"


def test_a_byte_order_mark_does_not_hide_the_header(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbftimestamp,value\r\n2024-01-01T00:00:00Z,5\r\n")
    assert read_csv(path).tolist() == [5.0]


# --- good input -------------------------------------------------------------------------


def test_extra_columns_any_order_and_header_case_are_accepted() -> None:
    series = parse_csv_text(csv("web-1,3.5,2024-01-01T00:00Z", header="host,Value,TIMESTAMP"))
    assert series.tolist() == [3.5]
    assert series.index[0] == utc("2024-01-01T00:00Z")


def test_naive_timestamps_are_utc_and_zoned_ones_are_converted() -> None:
    series = parse_csv_text(
        csv("2024-01-01T00:00:00,1", "2024-01-01T02:05:00+02:00,2", "2024-01-01T00:10:00Z,3")
    )
    assert str(series.index.tz) == "UTC"
    assert list(series.index) == [
        utc("2024-01-01T00:00Z"), utc("2024-01-01T00:05Z"), utc("2024-01-01T00:10Z")
    ]
    assert series.tolist() == [1.0, 2.0, 3.0]


# --- the grid ---------------------------------------------------------------------------


def test_bins_are_epoch_aligned_labelled_by_start_and_hold_the_mean() -> None:
    raw = raw_series(
        ["2024-01-01T00:01Z", "2024-01-01T00:04:59Z", "2024-01-01T00:05Z", "2024-01-01T00:09Z"],
        [1.0, 3.0, 10.0, 20.0],
    )
    grid = to_grid(raw, STEP)
    assert list(grid.demand.index) == [utc("2024-01-01T00:00Z"), utc("2024-01-01T00:05Z")]
    assert grid.demand.tolist() == [2.0, 15.0]


@pytest.mark.parametrize("step", ["7min", "13s", "1h"])
def test_bins_of_any_step_are_aligned_to_the_epoch(step: str) -> None:
    rule = pd.Timedelta(step)
    raw = raw_series(["2024-03-05T10:11:12Z", "2024-03-05T12:13:14Z"], [1.0, 2.0])
    grid = to_grid(raw, rule)
    labels = grid.demand.index.asi8
    assert (labels % rule.value == 0).all()
    assert grid.demand.index[0] <= raw.index[0] < grid.demand.index[0] + rule
    assert grid.demand.index[-1] <= raw.index[-1] < grid.demand.index[-1] + rule


@st.composite
def raw_points(draw: st.DrawFn, max_points: int = 40) -> pd.Series:
    """Irregular observations over a few hours: sparse enough to leave gaps of every length."""
    offsets = draw(
        st.lists(st.integers(0, 4 * 3600), min_size=1, max_size=max_points, unique=True)
    )
    offsets.sort()
    values = draw(
        st.lists(
            st.floats(0, 1000, allow_nan=False, allow_infinity=False),
            min_size=len(offsets), max_size=len(offsets),
        )
    )
    start = pd.Timestamp("2024-01-01T00:02:30Z")
    index = pd.DatetimeIndex([start + pd.Timedelta(seconds=s) for s in offsets]).as_unit("ns")
    return pd.Series(values, index=index, dtype=float)


@given(raw_points())
@settings(max_examples=60, deadline=None)
def test_each_bin_is_the_mean_of_the_raw_points_in_it(raw: pd.Series) -> None:
    grid = to_grid(raw, STEP)
    for label, value in grid.demand.items():
        inside = raw[(raw.index >= label) & (raw.index < label + STEP)]
        if inside.empty:
            assert np.isnan(value)
        else:
            assert value == pytest.approx(inside.mean(), rel=1e-12, abs=1e-12)
    assert len(grid.demand) == (raw.index[-1].floor(STEP) - raw.index[0].floor(STEP)) // STEP + 1


def test_short_gaps_hold_the_previous_value_and_long_gaps_stay_nan() -> None:
    # Bins: 0 observed, 1-3 empty (3 steps: held), 4 observed, 5-8 empty (4 steps: a gap), 9.
    times = ["2024-01-01T00:00Z", "2024-01-01T00:20Z", "2024-01-01T00:45Z"]
    grid = to_grid(raw_series(times, [7.0, 9.0, 4.0]), STEP)
    filled = grid.filled.tolist()
    assert filled[:5] == [7.0, 7.0, 7.0, 7.0, 9.0]
    assert np.isnan(filled[5:9]).all()
    assert filled[9] == 4.0
    assert np.isnan(grid.demand.iloc[1:4]).all()  # demand itself stays missing
    assert grid.held_steps == 3
    assert len(grid.gaps) == 1
    gap = grid.gaps[0]
    assert (gap.start, gap.end, gap.steps) == (
        utc("2024-01-01T00:25Z"), utc("2024-01-01T00:40Z"), 4
    )


def test_a_short_gap_is_never_filled_from_a_later_point() -> None:
    grid = to_grid(raw_series(["2024-01-01T00:00Z", "2024-01-01T00:10Z"], [1.0, 100.0]), STEP)
    assert grid.filled.tolist() == [1.0, 1.0, 100.0]


def test_the_fill_limit_is_a_parameter() -> None:
    raw = raw_series(["2024-01-01T00:00Z", "2024-01-01T00:15Z"], [1.0, 2.0])
    assert to_grid(raw, STEP, max_fill_steps=2).filled.tolist() == [1.0, 1.0, 1.0, 2.0]
    held_none = to_grid(raw, STEP, max_fill_steps=1)
    assert np.isnan(held_none.filled.iloc[1:3]).all()
    assert held_none.gaps[0].steps == 2


def test_end_extends_the_grid_and_a_trailing_gap_follows_the_same_rules() -> None:
    raw = raw_series(["2024-01-01T00:00Z", "2024-01-01T00:05Z"], [1.0, 2.0])
    short = to_grid(raw, STEP, end=pd.Timestamp("2024-01-01T00:24Z"))  # bins up to 00:20
    assert short.filled.tolist() == [1.0, 2.0, 2.0, 2.0, 2.0]
    long = to_grid(raw, STEP, end=pd.Timestamp("2024-01-01T00:25Z"))
    assert np.isnan(long.filled.iloc[2:]).all()
    assert long.gaps[-1].steps == 4


def test_bad_step_and_empty_input_are_rejected() -> None:
    raw = raw_series(["2024-01-01T00:00Z"], [1.0])
    with pytest.raises(InvalidInputError) as caught:
        to_grid(raw, pd.Timedelta(0))
    assert caught.value.field == "step"
    with pytest.raises(InsufficientHistoryError):
        to_grid(raw.iloc[:0], STEP)


def test_a_grid_from_microsecond_timestamps_feeds_a_model() -> None:
    # pandas 3 makes microseconds the default resolution; the models check the step in ns.
    index = pd.date_range("2024-01-01", periods=10, freq="5min", tz="UTC", unit="us")
    grid = to_grid(pd.Series(np.arange(10.0), index=index), STEP)
    forecast = Naive(STEP).fit(grid.filled).predict(1)
    assert forecast.mean.tolist() == [9.0]


# --- causality: a cut trace gives the same grid -------------------------------------------


@given(raw_points(), st.data())
@settings(max_examples=100, deadline=None)
def test_a_cut_trace_fills_every_earlier_bin_as_the_full_trace_does(
    raw: pd.Series, data: st.DataObject
) -> None:
    cut = data.draw(st.integers(1, len(raw)), label="cut")
    full = to_grid(raw, STEP)
    part = to_grid(raw.iloc[:cut], STEP)
    # The cut's last bin may hold only some of its raw points: compare the bins before it.
    last_bin = raw.index[cut - 1].floor(STEP)
    assert part.demand.index[-1] == last_bin
    before = part.demand.index[part.demand.index < last_bin]
    np.testing.assert_array_equal(part.filled[before].to_numpy(), full.filled[before].to_numpy())
    np.testing.assert_array_equal(part.demand[before].to_numpy(), full.demand[before].to_numpy())
    assert [g for g in full.gaps if g.end < last_bin] == list(part.gaps)


@given(raw_points(max_points=15), st.data())
@settings(max_examples=60, deadline=None)
def test_known_at_end_is_what_a_grid_ending_there_holds(
    raw: pd.Series, data: st.DataObject
) -> None:
    full = to_grid(raw, STEP)
    live = known_at_end(full)
    position = data.draw(st.integers(0, len(full.demand) - 1), label="position")
    label = full.demand.index[position]
    seen = raw[raw.index < label + STEP]
    as_of = to_grid(seen, STEP, end=label)
    assert as_of.filled.index[-1] == label
    np.testing.assert_array_equal(live.iloc[position], as_of.filled.iloc[-1])
    # Away from a running gap it agrees with the full grid.
    if not np.isnan(full.demand.iloc[position]):
        assert live.iloc[position] == full.filled.iloc[position]


def test_a_file_that_is_not_utf8_is_refused_naming_it_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"timestamp,value\n2024-01-01T00:00:00Z,5\n2024-01-01T00:05:00Z,\xe9\n")
    with pytest.raises(InvalidInputError) as caught:
        read_csv(path)
    assert caught.value.line == 3
    assert "latin1.csv" in str(caught.value) and "UTF-8" in str(caught.value)


@pytest.mark.parametrize(("stamp", "line"), [("2300-01-01T00:00:00Z", 3),
                                             ("1500-01-01T00:00:00Z", 2)])
def test_a_time_beyond_nanoseconds_is_refused_naming_the_file_and_line(
    tmp_path: Path, stamp: str, line: int
) -> None:
    rows = ["2024-01-01T00:00:00Z,5", f"{stamp},5"]
    if line == 2:
        rows.reverse()
    path = tmp_path / "far.csv"
    path.write_text("timestamp,value\n" + "\n".join(rows) + "\n")
    with pytest.raises(InvalidInputError) as caught:
        read_csv(path)
    assert (caught.value.field, caught.value.line) == ("timestamp", line)
    assert stamp in str(caught.value) and "far.csv" in str(caught.value)
