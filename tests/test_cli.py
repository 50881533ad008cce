"""`forecaster backtest` as a user runs it: a subprocess, its exit code, stdout and stderr.

Every run starts a Python process that imports the models (seconds), so the runs are started
together (two at a time, one per core) in one module fixture and the tests read their
results. A few more bad inputs are checked in-process, through the same `main`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from forecaster.cli import main

DATA = Path(__file__).parent.parent / "data"
AWS = DATA / "aws_elb_request_count_8c0756.csv"
GOOD = ["--target", "16.7", "--eval-days", "0.5", "--model", "naive", "--refit", "6h"]


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str
    out: Path


def _bad_csvs(folder: Path) -> dict[str, Path]:
    """CSV files that break a value rule: a negative value, a value that overflows a float,
    and thousands of values that are finite but whose squares are not."""
    times = pd.date_range("2024-01-01", periods=2_000, freq="5min", tz="UTC")
    rows = {
        "negative": ["5", "-3"],
        "overflowing": ["5", "5", "1e400"],
        "huge": ["1e308"] * len(times),
    }
    paths = {}
    for name, values in rows.items():
        paths[name] = folder / f"{name}.csv"
        lines = [f"{t:%Y-%m-%dT%H:%M:%SZ},{v}" for t, v in zip(times, values, strict=False)]
        paths[name].write_text("timestamp,value\n" + "\n".join(lines) + "\n")
    return paths


# case -> (arguments after "backtest", words the one-line error must contain)
BAD_INPUTS: dict[str, tuple[list[str], list[str]]] = {
    "step-5x": ([str(AWS), *GOOD, "--step", "5x"], ["--step", "'5x'"]),
    "quantile-1.5": ([str(AWS), *GOOD, "--quantile", "1.5"], ["--quantile", "1.5"]),
    "target-zero": ([str(AWS), *GOOD, "--target", "0"], ["--target", "'0'"]),
    "target-abc": ([str(AWS), *GOOD, "--target", "abc"], ["--target", "'abc'"]),
    "eval-start-garbage": (
        [str(AWS), "--target", "16.7", "--eval-start", "garbage"], ["--eval-start", "'garbage'"]
    ),
    "eval-start-after-end": (
        [str(AWS), "--target", "16.7", "--eval-start", "2014-05-01T00:00Z"],
        ["--eval-start", "2014-05-01T00:00:00+00:00", "last interval"],
    ),
    "missing-file": ([str(DATA / "no_such_trace.csv"), *GOOD], ["input", "no_such_trace.csv"]),
    "negative-value": (["{negative}", "--target", "1"],
                       ["line 3", "value", "'-3'", "negative", "negative.csv"]),
    "overflowing-value": (["{overflowing}", "--target", "1"],
                          ["line 4", "value", "'1e400'", "not a finite number", "overflowing.csv"]),
    "huge-values": (["{huge}", "--target", "1"],
                    ["line 2", "value", "'1e308'", "above 1e+15", "huge.csv"]),
    "refit-7m": ([str(AWS), *GOOD, "--refit", "7m"], ["refit", "whole number of steps"]),
    "quantile-and-share": (
        [str(AWS), *GOOD, "--quantile", "0.9", "--max-under-provisioned", "0.05"],
        ["--quantile", "--max-under-provisioned"],
    ),
    "share-0.5": (
        [str(AWS), *GOOD, "--max-under-provisioned", "0.5"], ["--max-under-provisioned", "0.5"]
    ),
    "eval-start-and-days": (
        [str(AWS), "--target", "16.7", "--eval-start", "2014-04-23T00:00Z", "--eval-days", "1"],
        ["--eval-start", "--eval-days", "not allowed"],
    ),
}


def _run(arguments: list[str], folder: Path) -> Run:
    out = folder / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "forecaster.cli", "backtest", *arguments, "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=folder, env=env, check=False,
    )
    return Run(completed.returncode, completed.stdout, completed.stderr, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    files = _bad_csvs(tmp_path_factory.mktemp("csv"))
    jobs = {"good": [str(AWS), *GOOD]}
    for case, (arguments, _) in BAD_INPUTS.items():
        jobs[case] = [a.format(**files) if a.startswith("{") else a for a in arguments]
    folders = {case: tmp_path_factory.mktemp(case) for case in jobs}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(_run, args, folders[case]) for case, args in jobs.items()}
        return {case: future.result() for case, future in futures.items()}


def test_a_good_run_prints_the_table_and_writes_the_outputs(runs: dict[str, Run]) -> None:
    run = runs["good"]
    assert run.code == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split()[:5] == ["trace", "policy", "asked%", "under%", "unserved%"]
    for policy in ("predictive", "reactive", "oracle"):
        assert any(line.split()[:2] == ["aws_elb_request_count_8c0756", policy] for line in lines)
    assert "wrote" in lines[-1]
    assert "Traceback" not in run.stderr
    for name in ("decisions.csv", "forecasts.csv", "summary.json", "report.png"):
        assert (run.out / name).stat().st_size > 0, name
    decisions = pd.read_csv(run.out / "decisions.csv")
    assert len(decisions) == 144  # half a day of 5-minute steps


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_naming_the_field(
    runs: dict[str, Run], case: str
) -> None:
    run = runs[case]
    assert run.code == 2, (run.code, run.stderr)
    assert run.stdout == ""
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip("\n").split("\n")
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("forecaster")
    assert "error:" in lines[0]
    for word in BAD_INPUTS[case][1]:
        assert word in lines[0], (word, lines[0])
    assert not run.out.exists()  # nothing half-written


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        (["--step", "0"], ["--step", "'10s'", "'1h'", "'0'"]),
        (["--eval-start="], ["--eval-start", "''"]),
        (["--eval-start", "NaT"], ["--eval-start", "'NaT'"]),
        (["--eval-days", "14.02"], ["--eval-days", "14.02", "3 steps of history"]),
        (["--min-replicas", "3", "--max-replicas", "2"],
         ["--max-replicas", "--min-replicas (3)", "got 2"]),
        (["--time-zone", "Mars/Base"], ["--time-zone", "IANA time zone", "'Mars/Base'"]),
    ],
    ids=["step-zero", "eval-start-empty", "eval-start-nat", "eval-days-too-many", "max-below-min",
         "time-zone-unknown"],
)
def test_more_bad_inputs_in_process(
    arguments: list[str], words: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["backtest", str(AWS), "--target", "16.7", "--model", "naive", *arguments,
            "--out", str(tmp_path / "out")]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors leave through SystemExit
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip("\n").split("\n")
    assert len(lines) == 1, captured.err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "out").exists()


# --- every flag of every subcommand, through the installed `forecaster` command -------------

FORECASTER = Path(sys.executable).with_name("forecaster")
NOWHERE = "http://127.0.0.1:1"  # every case below must fail before any query
EXPORT = ["export", "--server", NOWHERE, "--query", "up"]
BACKTEST = ["backtest", str(AWS), "--target", "16.7", "--model", "naive"]


def _files(folder: Path) -> dict[str, str]:
    """Bad files for the cases below, by the placeholder that names them."""
    not_utf8 = folder / "latin1.csv"
    not_utf8.write_bytes(b"timestamp,value\n2024-01-01T00:00:00Z,5\n2024-01-01T00:05:00Z,\xe9\n")
    far = folder / "year2300.csv"
    far.write_text("timestamp,value\n2024-01-01T00:00:00Z,5\n2300-01-01T00:00:00Z,5\n")
    early = folder / "year1500.csv"
    early.write_text("timestamp,value\n1500-01-01T00:00:00Z,5\n2024-01-01T00:00:00Z,5\n")
    binary = folder / "binary.dat"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    traces = folder / "traces"
    traces.mkdir()
    (traces / "latin1.csv").write_bytes(not_utf8.read_bytes())
    no_traces = folder / "no-traces"
    no_traces.mkdir()
    return {"{latin1}": str(not_utf8), "{year2300}": str(far), "{year1500}": str(early),
            "{binary}": str(binary), "{traces}": str(traces), "{folder}": str(folder),
            "{no-traces}": str(no_traces)}


# case -> (the whole command line after `forecaster`, words the one line must contain)
EVERY_FLAG: dict[str, tuple[list[str], list[str]]] = {
    # the input file
    "input-not-utf8": (["backtest", "{latin1}", "--target", "1"],
                       ["input", "latin1.csv", "line 3", "UTF-8"]),
    "input-year-2300": (["backtest", "{year2300}", "--target", "1"],
                        ["timestamp", "year2300.csv", "line 3", "2300-01-01", "2262-04-11"]),
    "input-year-1500": (["backtest", "{year1500}", "--target", "1"],
                        ["timestamp", "year1500.csv", "line 2", "1677-09-21"]),
    "input-folder": (["backtest", "{folder}", "--target", "1"], ["input", "Is a directory"]),
    "input-empty": (["backtest", "", "--target", "1"], ["input", "empty"]),
    # backtest's numbers and durations
    "target-denormal": ([*BACKTEST, "--target", "1e-320"], ["--target", "'1e-320'", "0.001"]),
    "target-huge": ([*BACKTEST, "--target", "1e300"], ["--target", "'1e300'", "1e+15"]),
    "target-nan": ([*BACKTEST, "--target", "nan"], ["--target", "'nan'"]),
    "target-empty": ([*BACKTEST, "--target", ""], ["--target", "''"]),
    "startup-huge": ([*BACKTEST, "--startup", "999999999999w"],
                     ["--startup", "'999999999999w'", "'1d'"]),
    "stabilization-huge": ([*BACKTEST, "--stabilization", "2h"],
                           ["--stabilization", "'2h'", "'1h'"]),
    "step-huge": ([*BACKTEST, "--step", "999999999999w"], ["--step", "'999999999999w'", "'1h'"]),
    "step-below-10s": ([*BACKTEST, "--step", "5s"], ["--step", "'5s'", "'10s'"]),
    "refit-huge": ([*BACKTEST, "--refit", "999999999999w"], ["--refit", "'999999999999w'"]),
    "plan-half-life-huge": ([*BACKTEST, "--plan-half-life", "999999999999w"],
                            ["--plan-half-life", "'999999999999w'"]),
    "eval-days-huge": ([*BACKTEST, "--eval-days", "1e9"], ["--eval-days", "1e+09", "14.02 days"]),
    "eval-days-tiny": ([*BACKTEST, "--eval-days", "1e-300"], ["--eval-days", "1e-300"]),
    "eval-start-9999": ([*BACKTEST, "--eval-start", "9999-01-01"],
                        ["--eval-start", "'9999-01-01'", "2262-04-11"]),
    "min-replicas-huge": ([*BACKTEST, "--min-replicas", "1" + "0" * 30],
                          ["--min-replicas", "2,147,483,647"]),
    "min-replicas-negative": ([*BACKTEST, "--min-replicas", "-1"], ["--min-replicas", "'-1'"]),
    "max-replicas-zero": ([*BACKTEST, "--max-replicas", "0"], ["--max-replicas", "'0'"]),
    "max-replicas-below-min": ([*BACKTEST, "--min-replicas", "5", "--max-replicas", "3"],
                               ["--max-replicas", "--min-replicas (5)", "got 3"]),
    "min-replicas-underscore": ([*BACKTEST, "--min-replicas", "1_0"],
                                ["--min-replicas", "whole number", "'1_0'"]),
    "max-replicas-other-digits": ([*BACKTEST, "--max-replicas", "١٠"],
                                  ["--max-replicas", "whole number", "'١٠'"]),
    # before the trace's first step plus the history the first decision needs (--startup 12m
    # is a lead of 3 steps of 5m: 2 + 3 steps)
    "eval-start-before-history": ([*BACKTEST, "--eval-start", "1990-01-01"],
                                  ["--eval-start", "1990-01-01T00:00:00+00:00",
                                   "earliest allowed is {earliest[5m]}"]),
    "eval-start-before-history-long-startup": (
        [*BACKTEST, "--startup", "12m", "--eval-start", "{first}"],
        ["--eval-start", "--startup 12m", "earliest allowed is {earliest[12m]}"],
    ),
    # backtest's output folder
    "out-unwritable": ([*BACKTEST, "--eval-days", "0.5", "--out", "/proc/forbidden"],
                       ["--out", "'/proc'"]),
    "out-is-a-file": ([*BACKTEST, "--eval-days", "0.5", "--out", str(AWS)],
                      ["--out", AWS.name, "not a folder"]),
    "out-under-a-file": ([*BACKTEST, "--eval-days", "0.5", "--out", "/dev/null/x"],
                         ["--out", "'/dev/null'", "not a folder"]),
    "out-empty": ([*BACKTEST, "--out", ""], ["--out", "empty"]),
    # export
    "export-days-huge": ([*EXPORT, "--days", "1e9"], ["--days", "1e+09", "2,000,000"]),
    "export-days-tiny": ([*EXPORT, "--days", "1e-300"], ["--days", "1e-300"]),
    "export-step-huge": ([*EXPORT, "--step", "999999999999w"], ["--step", "'1h'"]),
    "export-timeout-huge": ([*EXPORT, "--timeout", "999999999999w"], ["--timeout", "'1d'"]),
    "export-start-2300": ([*EXPORT, "--start", "2300-01-01"], ["--start", "'2300-01-01'"]),
    "export-out-unwritable": ([*EXPORT, "--out", "/proc/forbidden"],
                              ["--out", "'/proc/forbidden'"]),
    "export-out-empty": ([*EXPORT, "--out", ""], ["--out", "empty"]),
    "export-token-not-utf8": ([*EXPORT, "--bearer-token-file", "{binary}"],
                              ["--bearer-token-file", "binary.dat", "UTF-8"]),
    "export-token-folder": ([*EXPORT, "--bearer-token-file", "{folder}"],
                            ["--bearer-token-file", "not a readable file"]),
    "export-ca-not-pem": ([*EXPORT, "--ca-file", "{binary}"], ["--ca-file", "binary.dat", "PEM"]),
    "export-header-newline": ([*EXPORT, "--header", "X-Scope-OrgID=a\nb"],
                              ["--header", "X-Scope-OrgID", "line break"]),
    "export-header-name": ([*EXPORT, "--header", "X Org=a"], ["--header", "'X Org=a'"]),
    # serve
    "serve-config-not-utf8": (["serve", "--config", "{binary}"],
                              ["--config", "binary.dat", "UTF-8"]),
    "serve-config-folder": (["serve", "--config", "{folder}"], ["--config", "Is a directory"]),
    "serve-config-empty": (["serve", "--config", ""], ["--config", "empty"]),
    "serve-port-huge": (["serve", "--grpc-port", "99999999"], ["--grpc-port", "'99999999'"]),
    "serve-port-negative": (["serve", "--http-port", "-1"], ["--http-port", "'-1'"]),
    "serve-port-underscore": (["serve", "--grpc-port", "5_0051"],
                              ["--grpc-port", "whole number", "'5_0051'"]),
    "serve-demo-data-without-demo": (["serve", "--demo-data", "{traces}"],
                                     ["--demo-data", "add --demo"]),
    "serve-host-empty": (["serve", "--host", ""], ["--host", "empty"]),
    "serve-host-unresolvable": (["serve", "--host", "no such host", "--grpc-port", "0",
                                 "--http-port", "0"], ["--host", "'no such host'"]),
    "serve-demo-data-empty": (["serve", "--demo", "--demo-data", "{no-traces}", "--grpc-port",
                               "0", "--http-port", "0"],
                              ["--demo-data", "no-traces", "holds none"]),
    "serve-demo-not-utf8": (["serve", "--demo", "--demo-data", "{traces}", "--grpc-port", "0",
                             "--http-port", "0"], ["latin1.csv", "line 3", "UTF-8"]),
    # serve's settings from FORECASTER_* variables (ENVIRONMENT below)
    "serve-env-port": (["serve"], ["FORECASTER_HTTP_PORT (httpPort)", "'abc'"]),
    "serve-env-port-underscore": (["serve"], ["FORECASTER_GRPC_PORT (grpcPort)", "'1_0'"]),
    "serve-env-state-dir": (["serve", "--grpc-port", "0", "--http-port", "0"],
                            ["FORECASTER_STATE_DIR (stateDir)", "latin1.csv"]),
    "serve-env-config": (["serve"], ["FORECASTER_CONFIG", "binary.dat", "UTF-8"]),
    # argparse's own errors
    "no-command": ([], ["command", "forecaster --help"]),
    "unknown-flag": ([*BACKTEST, "--bogus"], ["--bogus", "forecaster --help"]),
}


# case -> the variables its run sets (placeholders as in EVERY_FLAG)
ENVIRONMENT: dict[str, dict[str, str]] = {
    "serve-env-port": {"FORECASTER_HTTP_PORT": "abc"},
    "serve-env-port-underscore": {"FORECASTER_GRPC_PORT": "1_0"},
    "serve-env-state-dir": {"FORECASTER_STATE_DIR": "{latin1}/state"},  # under a file
    "serve-env-config": {"FORECASTER_CONFIG": "{binary}"},
}


def _earliest_starts() -> dict[str, str]:
    """The earliest --eval-start on AWS's grid, worked out here from its first timestamp: the
    first interval is the step that holds it, and the first decision, made 1 + lead steps
    before the evaluation start, reads the step before its own."""
    first = pd.Timestamp(pd.read_csv(AWS, nrows=1)["timestamp"].iloc[0]).floor("5min")
    return {"{first}": first.isoformat(),
            **{f"{{earliest[{startup}]}}": (first + (2 + lead) * pd.Timedelta("5min")).isoformat()
               for startup, lead in (("5m", 1), ("12m", 3))}}


def _fill(text: str, values: dict[str, str]) -> str:
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


def _run_forecaster(arguments: list[str], folder: Path, variables: dict[str, str]) -> Run:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FORECASTER_")},
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           **variables}
    completed = subprocess.run(
        [str(FORECASTER), *arguments], capture_output=True, text=True, timeout=120, cwd=folder,
        env=env, check=False,
    )
    return Run(completed.returncode, completed.stdout, completed.stderr, folder / "out")


@pytest.fixture(scope="module")
def flag_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    files = {**_files(tmp_path_factory.mktemp("files")), **_earliest_starts()}
    jobs = {case: [_fill(argument, files) for argument in arguments]
            for case, (arguments, _) in EVERY_FLAG.items()}
    variables = {case: {name: _fill(value, files)
                        for name, value in ENVIRONMENT.get(case, {}).items()}
                 for case in jobs}
    folders = {case: tmp_path_factory.mktemp(case) for case in jobs}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(_run_forecaster, args, folders[case], variables[case])
                   for case, args in jobs.items()}
        return {case: future.result() for case, future in futures.items()}


@pytest.mark.parametrize("case", sorted(EVERY_FLAG))
def test_every_flag_mistake_exits_2_with_one_line_naming_it(
    flag_runs: dict[str, Run], case: str
) -> None:
    run = flag_runs[case]
    assert run.code == 2, (run.code, run.stderr[-2000:])
    assert run.stdout == ""
    lines = run.stderr.strip("\n").split("\n")
    assert len(lines) == 1, run.stderr[-2000:]
    assert lines[0].startswith("forecaster") and "error:" in lines[0]
    for word in EVERY_FLAG[case][1]:
        word = _fill(word, _earliest_starts())
        assert word in lines[0], (word, lines[0])
    assert list(run.out.parent.iterdir()) == [], "nothing written where the command ran"


def test_help_still_prints_usage_and_exits_0() -> None:
    completed = subprocess.run([str(FORECASTER), "backtest", "--help"], capture_output=True,
                               text=True, timeout=60, check=False)
    assert completed.returncode == 0
    assert completed.stdout.startswith("usage: forecaster backtest")
    assert "--eval-days" in completed.stdout and completed.stderr == ""


def _help(command: str) -> str:
    completed = subprocess.run([str(FORECASTER), command, "--help"], capture_output=True,
                               text=True, timeout=60, check=True, env={**os.environ,
                                                                       "COLUMNS": "100"})
    return completed.stdout


@pytest.mark.parametrize("command", ["backtest", "serve", "export"])
def test_every_flag_has_help_text(command: str) -> None:
    """In --help, each option's line carries text or is followed by an indented one."""
    lines = _help(command).split("options:\n", 1)[1].splitlines()
    bare = []
    for i, line in enumerate(lines):
        if not line.startswith("  -"):
            continue
        words = line.split()
        # "-h, --help  show ..." or "--flag METAVAR  text": text after a run of two spaces
        described = "  " in line.strip()
        continued = i + 1 < len(lines) and lines[i + 1].startswith(" " * 10)
        if not described and not continued:
            bare.append(words[0])
    assert bare == []


@pytest.mark.parametrize(("command", "flag", "words"), [
    ("backtest", "--min-replicas", "default 1"),
    ("backtest", "--max-replicas", "no maximum"),
    ("serve", "--log-level", "default INFO"),
])
def test_a_flag_s_help_states_its_default(command: str, flag: str, words: str) -> None:
    text = " ".join(_help(command).split())
    described = text[text.index(f" {flag} ", text.index("options:")):]
    assert words in described.split(" --")[1], described[:200]
