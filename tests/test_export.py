"""`forecaster export` against a real Prometheus holding the bundled trace (see
tests/conftest.py), run as a user runs it: a subprocess, its CSV, its exit code.

The CSV it writes is then fed to `forecaster backtest`, the command it exists for. Bad flags
are checked in-process through the same `main` (each subprocess costs seconds of imports), and
once as a subprocess.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from forecaster.cli import main
from forecaster.errors import InvalidInputError
from forecaster.export import (
    check_output_path,
    export_window,
    format_value,
    parse_header,
    write_csv,
)
from tests.support.prometheus import PrometheusServer, write_openmetrics

QUERY = 'demo_requests{instance="a"}'  # the trace itself; instance "b" holds half of it
DAYS_TO_EXPORT = 9


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str


def _forecaster(*arguments: str, cwd: Path) -> Run:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "forecaster.cli", *arguments],
        capture_output=True, text=True, timeout=300, cwd=cwd, env=env, check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def _iso(stamp: pd.Timestamp) -> str:
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture(scope="module")
def window(demo_trace: pd.Series) -> tuple[pd.Timestamp, pd.Timestamp]:
    end = demo_trace.index[-1]
    start = demo_trace.index[demo_trace.index >= end - pd.Timedelta(days=DAYS_TO_EXPORT)][0]
    return start, end


@pytest.fixture(scope="module")
def exported(
    prometheus: PrometheusServer,
    window: tuple[pd.Timestamp, pd.Timestamp],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Run, Path]:
    folder = tmp_path_factory.mktemp("export")
    out = folder / "web.csv"
    start, end = window
    run = _forecaster(
        "export", "--server", prometheus.url, "--query", QUERY, "--start", _iso(start),
        "--end", _iso(end), "--step", "5m", "--out", str(out), cwd=folder,
    )
    return run, out


def test_export_writes_the_trace_as_timestamp_value_csv(
    exported: tuple[Run, Path], demo_trace: pd.Series, window: tuple[pd.Timestamp, pd.Timestamp]
) -> None:
    run, out = exported
    assert run.code == 0, run.stderr
    assert run.stdout == ""  # the CSV went to --out
    assert "wrote" in run.stderr and str(out) in run.stderr
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "timestamp,value"
    stamps = [line.split(",")[0] for line in lines[1:]]
    assert all(stamp.endswith("Z") and "+" not in stamp for stamp in stamps)
    frame = pd.read_csv(out)
    index = pd.DatetimeIndex(pd.to_datetime(frame["timestamp"], utc=True, format="ISO8601"))
    assert index.is_monotonic_increasing and index.is_unique
    start, end = window
    expected = demo_trace[start:end]
    # Every point of the trace is there, with its value as given ...
    assert expected.index.isin(index).all()
    # ... and the few 10-minute gaps in the trace are filled the way Prometheus does: with the
    # sample of the step before (its 5-minute lookback), never with anything made up.
    reference = expected.reindex(index, method="ffill", limit=1)
    assert not reference.isna().any()
    np.testing.assert_array_equal(frame["value"].to_numpy(dtype=float), reference.to_numpy())
    assert (index[0], index[-1]) == (start, end)


def test_export_to_stdout_when_no_out_is_given(
    exported: tuple[Run, Path], prometheus: PrometheusServer,
    window: tuple[pd.Timestamp, pd.Timestamp], tmp_path: Path,
) -> None:
    _, out = exported
    end = window[1]
    run = _forecaster(
        "export", "--server", prometheus.url, "--query", QUERY, "--days", "0.5", "--end",
        _iso(end), "--step", "5m", cwd=tmp_path,
    )
    assert run.code == 0, run.stderr
    rows = run.stdout.splitlines()
    assert rows[0] == "timestamp,value"
    assert len(rows) == 1 + 12 * 12 + 1  # half a day of 5-minute points, both ends included
    assert rows[1:] == out.read_text(encoding="utf-8").splitlines()[-len(rows) + 1:]
    assert list(tmp_path.iterdir()) == []  # nothing written beside


def test_exported_csv_round_trips_through_backtest(
    exported: tuple[Run, Path], tmp_path: Path
) -> None:
    _, out = exported
    run = _forecaster(
        "backtest", str(out), "--target", "16.7", "--eval-days", "0.5", "--model",
        "seasonal_naive", "--refit", "6h", "--out", str(tmp_path / "backtest"), cwd=tmp_path,
    )
    assert run.code == 0, run.stderr
    assert any(line.split()[:2] == ["web", "predictive"] for line in run.stdout.splitlines())
    decisions = pd.read_csv(tmp_path / "backtest" / "decisions.csv")
    assert len(decisions) == 144  # half a day of 5-minute decisions


def test_a_bad_flag_exits_2_naming_it_from_the_command_line(tmp_path: Path) -> None:
    run = _forecaster(
        "export", "--server", "http://127.0.0.1:9", "--query", "up", "--step", "5x", cwd=tmp_path
    )
    assert run.code == 2
    assert run.stdout == ""
    assert "--step" in run.stderr and "'5x'" in run.stderr
    assert "Traceback" not in run.stderr


# case -> (arguments after "export", words the one-line error must contain)
BAD_FLAGS: dict[str, tuple[list[str], list[str]]] = {
    "no-query": (["--server", "{url}"], ["--query", "required"]),
    "empty-query": (["--server", "{url}", "--query", " "], ["--query", "non-empty"]),
    "server-scheme": (["--server", "ftp://prometheus:9090", "--query", "up"], ["--server"]),
    "server-credentials": (
        ["--server", "http://user:pw@prometheus:9090", "--query", "up"],
        ["--server", "user:password@"],
    ),
    "server-broken": (["--server", "http://[::1", "--query", "up"], ["--server", "IPv6"]),
    "step-zero": (["--server", "{url}", "--query", "up", "--step", "0"], ["--step"]),
    "days-negative": (["--server", "{url}", "--query", "up", "--days", "-1"], ["--days", "'-1'"]),
    "days-huge": (["--server", "{url}", "--query", "up", "--days", "1e9"],
                  ["--days", "1e+09 days", "give fewer days"]),
    "start-garbage": (["--server", "{url}", "--query", "up", "--start", "soon"], ["--start"]),
    "start-fraction": (
        ["--server", "{url}", "--query", "up", "--start", "2024-05-01T00:00:30.5Z", "--end",
         "2024-05-01T01:00Z"],
        ["--start", "whole second", "00:00:30.5"],
    ),
    "days-under-a-step": (["--server", "{url}", "--query", "up", "--days", "0.0005"],
                          ["--days", "no whole --step '1m'"]),
    "start-and-days": (
        ["--server", "{url}", "--query", "up", "--start", "2024-05-01T00:00Z", "--days", "1"],
        ["--start", "--days", "not allowed"],
    ),
    "start-after-end": (
        ["--server", "{url}", "--query", "up", "--start", "2024-05-02T00:00Z", "--end",
         "2024-05-01T00:00Z"],
        ["--start", "--end", "2024-05-02T00:00:00Z"],
    ),
    "too-many-points": (
        ["--server", "{url}", "--query", "up", "--days", "100", "--step", "1s"],
        ["--step", "raise --step"],
    ),
    "header-no-equals": (
        ["--server", "{url}", "--query", "up", "--header", "X-Scope-OrgID"],
        ["--header", "NAME=VALUE"],
    ),
    "header-twice": (
        ["--server", "{url}", "--query", "up", "--header", "A=1", "--header", "A=2"],
        ["--header", "twice"],
    ),
    "token-file-missing": (
        ["--server", "{url}", "--query", "up", "--bearer-token-file", "{tmp}/no-token"],
        ["--bearer-token-file", "no-token"],
    ),
    "token-file-blank": (
        ["--server", "{url}", "--query", "up", "--bearer-token-file", "{tmp}/blank-token"],
        ["--bearer-token-file", "blank-token", "is empty"],
    ),
    "ca-and-skip-verify": (
        ["--server", "{url}", "--query", "up", "--ca-file", "{tmp}/ca.crt",
         "--insecure-skip-verify"],
        ["--insecure-skip-verify", "--ca-file"],
    ),
    "out-folder-missing": (
        ["--server", "{url}", "--query", "up", "--out", "{tmp}/no/such/folder/x.csv"],
        ["--out", "does not exist"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_exit_2_with_one_line_naming_the_flag(
    case: str, prometheus: PrometheusServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "ca.crt").write_text("not checked before the conflict\n")
    (tmp_path / "blank-token").write_text(" \n")
    arguments, words = BAD_FLAGS[case]
    argv = ["export", *(a.replace("{url}", prometheus.url).replace("{tmp}", str(tmp_path))
                        for a in arguments)]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors leave through SystemExit
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.out == ""
    lines = captured.err.strip("\n").split("\n")
    assert len(lines) == 1, captured.err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "user:pw" not in lines[0]  # credentials never echoed


@pytest.mark.parametrize(
    ("query", "words"),
    [("demo_requests", ["2 series", "sum("]), ('absent_metric{job="none"}', ["no data"])],
    ids=["several-series", "no-series"],
)
def test_a_query_without_exactly_one_series_exits_1_saying_why(
    query: str, words: list[str], prometheus: PrometheusServer,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    out = tmp_path / "x.csv"
    code = main(["export", "--server", prometheus.url, "--query", query, "--days", "1",
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    for word in words:
        assert word in captured.err, (word, captured.err)
    assert not out.exists()  # nothing half-written


def test_values_are_written_as_given() -> None:
    index = pd.DatetimeIndex(
        [datetime(2024, 5, 1, 0, minute, tzinfo=UTC) for minute in (0, 1, 2, 3)]
    )
    series = pd.Series([94.0, 0.1 + 0.2, 1e-7, 123456789.5], index=index)
    out = io.StringIO()
    assert write_csv(series, out) == 4
    assert out.getvalue().splitlines() == [
        "timestamp,value",
        "2024-05-01T00:00:00Z,94",
        "2024-05-01T00:01:00Z,0.30000000000000004",
        "2024-05-01T00:02:00Z,1e-07",
        "2024-05-01T00:03:00Z,123456789.5",
    ]
    for value in series:
        assert float(format_value(float(value))) == value


def test_checking_the_output_path_leaves_nothing_behind(tmp_path: Path) -> None:
    check_output_path(tmp_path / "new.csv")
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "kept.csv"
    kept.write_text("timestamp,value\n")
    check_output_path(kept)
    assert kept.read_text() == "timestamp,value\n"


@pytest.mark.parametrize("text", ["X-A=b\nc", "X-A=b\rc", "X A=b", "=b", "X-A=€"])
def test_a_header_http_cannot_carry_is_refused(text: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_header(text)
    assert caught.value.field == "--header"


def test_missing_and_refused_points_are_counted_not_hidden(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = pd.date_range("2024-05-01", periods=6 * 60, freq="1min", tz="UTC")
    values = np.full(len(index), 10.0)
    values[[100, 200, 300]] = [np.nan, -5.0, np.inf]
    trace = pd.Series(values, index=index).drop(index[150:170])  # 20 min without samples
    write_openmetrics(trace, "gappy", tmp_path / "gappy.om", {"job": "x"})
    out = tmp_path / "gappy.csv"
    with PrometheusServer([tmp_path / "gappy.om"]) as server:
        code = main(["export", "--server", server.url, "--query", "gappy", "--start",
                     _iso(index[0]), "--end", _iso(index[-1]), "--step", "1m", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    written = pd.read_csv(out)
    assert np.isfinite(written["value"]).all() and (written["value"] >= 0).all()
    # 20 minutes unsampled less the 5 the lookback holds, and the 3 refused values.
    missing = len(index) - len(written)
    assert missing == 15 + 3
    last = captured.err.strip("\n").split("\n")[-1]
    assert f"{missing} of {len(index)} points on the grid are missing" in last, last
    assert "15 with no sample" in last and "3 NaN, Inf or negative and refused" in last, last


@pytest.mark.parametrize(("days", "step"), [(0.01, 60), (14, 660), (1.5, 3600), (0.25, 7)])
def test_days_count_whole_steps_back_from_end(days: float, step: int) -> None:
    end = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    start, last = export_window(step_seconds=step, now=end, days=days, end=end)
    assert last == end  # the last row is --end itself
    span = (end - start).total_seconds()
    assert span % step == 0 and 0 <= days * 86_400 - span < step


def test_a_reader_that_leaves_early_gets_one_line_not_a_traceback(
    prometheus: PrometheusServer, window: tuple[pd.Timestamp, pd.Timestamp], tmp_path: Path
) -> None:
    start, end = window
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    with subprocess.Popen(  # `forecaster export ... | head -1`: far more rows than a pipe holds
        [sys.executable, "-m", "forecaster.cli", "export", "--server", prometheus.url,
         "--query", QUERY, "--start", _iso(start), "--end", _iso(end), "--step", "1m"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline() == b"timestamp,value\n"
        process.stdout.close()
        stderr = process.stderr.read().decode()
        code = process.wait(timeout=300)
    assert code == 1, stderr
    assert "Traceback" not in stderr
    [line] = stderr.splitlines()
    assert line.startswith("forecaster: error: stdout was closed before the CSV was all "), line
    assert line.endswith(" rows); give --out to write a file"), line
