"""The fit pool: real spawned workers, pinned, ended at shutdown; the trimming schedule."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from forecaster.fitting import FitPool, FitRequest, fit_job
from forecaster.series import read_csv, to_grid

TRACE = Path(__file__).parent.parent / "data" / "aws_elb_request_count_8c0756.csv"
STEP = pd.Timedelta(minutes=5)


def _request(steps: int = 2016) -> FitRequest:
    grid = to_grid(read_csv(TRACE), STEP).filled.iloc[:steps]
    return FitRequest(model="seasonal_naive", step_seconds=int(STEP.total_seconds()),
                      start=grid.index[0], values=grid.to_numpy(), quantile=0.9, horizon=2,
                      previous=None)


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_worker_process_fits_at_low_priority_and_shutdown_ends_it() -> None:
    pool = FitPool(1)
    try:
        assert pool.pids() == []  # spawned on the first submit
        fit = pool.submit(_request()).result(timeout=120)
        assert fit.model.name == "seasonal_naive" and not fit.fell_back
        (pid,) = pool.pids()
        assert pid != os.getpid()
        assert os.getpriority(os.PRIO_PROCESS, pid) >= os.getpriority(os.PRIO_PROCESS, 0) + 10
    finally:
        pool.shutdown()
    assert _gone(pid), "shutdown left the worker process running"


def test_a_thread_pool_stands_in_and_fits_what_a_worker_would() -> None:
    request = _request()
    pool = FitPool(1, executor=ThreadPoolExecutor(1))
    try:
        fit = pool.submit(request).result(timeout=60)
    finally:
        pool.shutdown()
    assert pool.pids() == []
    alone = fit_job(request).model.predict(2, (0.9,))
    pd.testing.assert_series_equal(
        pd.Series(fit.model.predict(2, (0.9,)).mean), pd.Series(alone.mean)
    )


def test_memory_is_trimmed_after_fits_land_at_most_once_per_interval() -> None:
    now = [100.0]
    pool = FitPool(1, executor=ThreadPoolExecutor(1), trim_interval_seconds=60.0,
                   monotonic=lambda: now[0])
    try:
        pool.fit_landed()
        assert not pool.trim_if_due()  # within the interval since the pool started
        now[0] += 60.0
        assert pool.trim_if_due()
        now[0] += 600.0
        assert not pool.trim_if_due()  # no fit landed since: nothing to hand back
        pool.fit_landed()
        pool.fit_landed()
        assert pool.trim_if_due()
        pool.fit_landed()
        now[0] += 59.0
        assert not pool.trim_if_due()  # within the interval since the last trim
        now[0] += 1.0
        assert pool.trim_if_due()
    finally:
        pool.shutdown()
