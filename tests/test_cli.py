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


def _bad_csv(folder: Path) -> Path:
    path = folder / "negative.csv"
    path.write_text("timestamp,value\n2024-01-01T00:00:00Z,5\n2024-01-01T00:05:00Z,-3\n")
    return path


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
        ["eval-start", "2014-05-01T00:00:00+00:00", "last interval"],
    ),
    "missing-file": ([str(DATA / "no_such_trace.csv"), *GOOD], ["input", "no_such_trace.csv"]),
    "negative-value": (["{negative}", "--target", "1"], ["line 3", "value", "'-3'", "negative"]),
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
    negative = _bad_csv(tmp_path_factory.mktemp("csv"))
    jobs = {"good": [str(AWS), *GOOD]}
    for case, (arguments, _) in BAD_INPUTS.items():
        jobs[case] = [a.replace("{negative}", str(negative)) for a in arguments]
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
        (["--step", "0"], ["step", "positive"]),
        (["--eval-start="], ["--eval-start", "''"]),
        (["--eval-start", "NaT"], ["--eval-start", "'NaT'"]),
        (["--eval-days", "100"], ["history before the evaluation start"]),
        (["--min-replicas", "3", "--max-replicas", "2"], ["max_replicas"]),
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
