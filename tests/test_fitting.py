"""The fit pool: real spawned workers, pinned, at the lowest priority, ended at shutdown and
with the engine's process, replaced when one dies; the trimming schedule."""

from __future__ import annotations

import gc
import os
import pickle
import queue
import signal
import sys
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from forecaster.fitting import (
    FitPool,
    FitRequest,
    FitWorkerDied,
    WorkerDeath,
    fit_job,
    spawn_workers,
)
from forecaster.models import FallbackFit
from forecaster.policy import ScalingPolicy
from forecaster.series import read_csv, to_grid
from forecaster.slo import ShareScorer
from tests.support.processes import assert_child_ends_with_parent, wait_ended
from tests.support.waiting import wait_for

TRACE = Path(__file__).parent.parent / "data" / "aws_elb_request_count_8c0756.csv"
STEP = pd.Timedelta(minutes=5)


def _request(steps: int = 2016, model: str = "seasonal_naive") -> FitRequest:
    grid = to_grid(read_csv(TRACE), STEP).filled.iloc[:steps]
    return FitRequest(model=model, step_seconds=int(STEP.total_seconds()),
                      start=grid.index[0], values=grid.to_numpy(), quantile=0.9, horizon=2,
                      previous=None)




@pytest.fixture
def deaths() -> queue.Queue[str]:
    return queue.Queue()


@pytest.fixture
def pool(deaths: queue.Queue[str]) -> Iterator[FitPool]:
    pool = FitPool(1)
    pool.notify_deaths(deaths.put)
    yield pool
    pool.shutdown()


def test_a_worker_process_fits_at_idle_priority_and_shutdown_ends_it() -> None:
    pool = FitPool(1)
    try:
        assert pool.pids() == []  # spawned on the first submit
        fit = pool.submit(_request()).result(timeout=120)
        assert fit.model.name == "seasonal_naive" and not fit.fell_back
        (pid,) = pool.pids()
        assert pid != os.getpid()
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the engine's process keeps its own
    finally:
        pool.shutdown()
    wait_ended(pid, "the worker process ended by shutdown")


def test_workers_at_nice_10_where_asked() -> None:
    pool = FitPool(1, executor_factory=lambda: spawn_workers(1, priority="nice"))
    try:
        pool.submit(_request()).result(timeout=120)
        (pid,) = pool.pids()
        assert os.sched_getscheduler(pid) == os.SCHED_OTHER
        assert os.getpriority(os.PRIO_PROCESS, pid) >= os.getpriority(os.PRIO_PROCESS, 0) + 10
    finally:
        pool.shutdown()


def _kill_when_spawned(pool: FitPool, fit: Future[FallbackFit], before: list[int]) -> int:
    """kill -9 the worker a fit spawned (booting or fitting: the fit is in flight)."""
    (pid,) = wait_for(lambda: [p for p in pool.pids() if p not in before], timeout=60)
    assert not fit.done()
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_worker_killed_in_a_fit_is_replaced_and_the_fit_tried_again(
    pool: FitPool, deaths: queue.Queue[str]
) -> None:
    request = _request()
    fit = pool.submit(request)
    killed = _kill_when_spawned(pool, fit, [])
    assert fit.result(timeout=120).model.name == "seasonal_naive"
    assert deaths.get_nowait() == f"fit worker process {killed} was killed by signal 9 (SIGKILL)"
    assert pool.deaths == 1 and pool.problem() is None
    (replacement,) = pool.pids()
    assert replacement != killed
    assert pool.submit(request).result(timeout=120).model.name == "seasonal_naive"
    assert pool.pids() == [replacement] and deaths.empty()


def test_a_fit_whose_worker_dies_twice_fails_with_both_causes(
    pool: FitPool, deaths: queue.Queue[str]
) -> None:
    fit = pool.submit(_request())
    first = _kill_when_spawned(pool, fit, [])
    second = _kill_when_spawned(pool, fit, [first])
    with pytest.raises(FitWorkerDied) as died:
        fit.result(timeout=60)
    assert died.value.deaths == (WorkerDeath(first, -9), WorkerDeath(second, -9))
    assert str(died.value) == (
        f"its worker process died on each of 2 tries: fit worker process {first} was killed "
        f"by signal 9 (SIGKILL); then fit worker process {second} was killed by signal 9 "
        "(SIGKILL)"
    )
    assert [deaths.get_nowait(), deaths.get_nowait()] == [str(d) for d in died.value.deaths]
    assert pool.submit(_request()).result(timeout=120).model.name == "seasonal_naive"
    assert pool.deaths == 2 and pool.problem() is None


def test_a_worker_that_died_idle_is_replaced_at_the_next_fit(
    pool: FitPool, deaths: queue.Queue[str]
) -> None:
    pool.submit(_request()).result(timeout=120)
    (idle,) = pool.pids()
    os.kill(idle, signal.SIGTERM)  # as `kill` would: an exit status other than SIGKILL's
    wait_ended(idle, "the killed worker process ended")
    assert pool.submit(_request()).result(timeout=120).model.name == "seasonal_naive"
    assert deaths.get(timeout=5) == f"fit worker process {idle} was killed by signal 15 (SIGTERM)"
    assert pool.deaths == 1 and pool.pids() != [idle]


class Flaky:
    """Real spawned workers, except while `failing`: then no executor can be built."""

    def __init__(self) -> None:
        self.failing = False

    def __call__(self) -> Executor:
        if self.failing:
            raise OSError(11, "Resource temporarily unavailable")
        return spawn_workers(1)


def test_a_pool_that_cannot_be_rebuilt_says_so_until_it_can() -> None:
    factory = Flaky()
    pool = FitPool(1, executor_factory=factory)
    try:
        fit = pool.submit(_request())
        factory.failing = True
        killed = _kill_when_spawned(pool, fit, [])
        with pytest.raises(FitWorkerDied) as died:
            fit.result(timeout=60)
        assert str(died.value) == (
            f"fit worker process {killed} was killed by signal 9 (SIGKILL), and no new fit "
            "worker could be started: [Errno 11] Resource temporarily unavailable"
        )
        assert pool.problem() == ("the fit pool cannot start worker processes: "
                                  "[Errno 11] Resource temporarily unavailable")
        with pytest.raises(OSError):  # still failing: the next fit says why at once
            pool.submit(_request()).result(timeout=60)
        factory.failing = False
        assert pool.submit(_request()).result(timeout=120).model.name == "seasonal_naive"
        assert pool.problem() is None and pool.deaths == 1
    finally:
        pool.shutdown()


def test_a_given_executor_that_breaks_is_not_replaced() -> None:
    pool = FitPool(1, executor=spawn_workers(1))
    try:
        fit = pool.submit(_request())
        _kill_when_spawned(pool, fit, [])
        with pytest.raises(FitWorkerDied, match="it has no executor_factory"):
            fit.result(timeout=60)
        problem = pool.problem()
        assert problem is not None and "executor_factory" in problem
    finally:
        pool.shutdown()


def test_submit_after_shutdown_raises() -> None:
    pool = FitPool(1, executor=ThreadPoolExecutor(1))
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(_request())


WATCHED = """
import os, sys, threading
from forecaster.fitting import watch_parent
watch_parent(os.getppid(), poll_seconds=0.05)
print("watching", flush=True)
threading.Event().wait()
"""

PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print(child.pid, flush=True)
sys.stdin.read()
"""


def test_without_the_parent_death_signal_a_watch_thread_ends_the_orphan() -> None:
    assert_child_ends_with_parent([sys.executable, "-c", PARENT, WATCHED],
                                  "the orphan ended with its parent")


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


class Cycle:
    """An object that refers to itself: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_a_trim_after_drops_collects_garbage_first() -> None:
    """What only a full collection frees (garbage in cycles, CPython's free lists) goes before
    the trim after targets were dropped, so that its blocks do not keep the pages the trim
    would hand back; a trim after fits alone does not walk every object."""
    pool = FitPool(1, executor=ThreadPoolExecutor(1), trim_interval_seconds=0.0)
    gc.disable()  # no automatic collection: only the trim's may free the cycle
    try:
        cycle = Cycle()
        freed = weakref.ref(cycle)
        del cycle
        pool.fit_landed()
        assert pool.trim_if_due()
        assert freed() is not None
        pool.memory_freed(dropped=True)
        assert pool.trim_if_due()
        assert freed() is None
    finally:
        gc.enable()
        pool.shutdown()


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


def test_a_worker_ranks_auto_by_the_scorer_the_request_carries() -> None:
    """As a worker receives it: pickled across the process boundary (a worker process at idle
    priority is starved on a busy machine, and the pickling is what the boundary adds)."""
    scorer = ShareScorer(0.05, ScalingPolicy(target_per_replica=16.7), lead_steps=1)
    request = replace(_request(steps=3 * 288, model="auto"), scorer=scorer)
    fit = fit_job(pickle.loads(pickle.dumps(request)))
    selection = fit.model.selection_  # type: ignore[attr-defined]
    assert selection.scored_by == "scorer"
    validated = [score for score in selection.scores if score.error is None]
    assert validated and all(score.cost is not None for score in validated)
    assert fit.model.scorer == scorer  # type: ignore[attr-defined]


class _CountingAtStart(ThreadPoolExecutor):
    """One thread that notes, as each fit starts, how many requests had been built."""

    def __init__(self, built: list[int]) -> None:
        super().__init__(1)
        self.built = built
        self.seen: list[int] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        def run() -> Any:
            self.seen.append(len(self.built))
            return fn(*args, **kwargs)

        return super().submit(run)


def test_fits_waiting_for_a_worker_build_their_request_only_when_one_is_free() -> None:
    built: list[int] = []
    executor = _CountingAtStart(built)
    pool = FitPool(1, executor=executor)

    def request_of(i: int) -> Callable[[], FitRequest]:
        def build() -> FitRequest:
            built.append(i)
            return _request(steps=600)

        return build

    try:
        fits = [pool.submit(request_of(i)) for i in range(4)]
        for fit in fits:
            fit.result(timeout=60)
    finally:
        pool.shutdown()
    assert built == [0, 1, 2, 3]
    # Each fit started with only its own request and those before it built: the ones still
    # waiting held none (built all at once, every fit would have seen 4).
    assert executor.seen == [1, 2, 3, 4]


def test_a_request_that_cannot_be_built_fails_its_fit_and_frees_the_worker() -> None:
    pool = FitPool(1, executor=ThreadPoolExecutor(1))

    def broken() -> FitRequest:
        raise ValueError("no history")

    try:
        failed = pool.submit(broken)
        after = pool.submit(lambda: _request(steps=600))
        with pytest.raises(ValueError, match="no history"):
            failed.result(timeout=60)
        assert after.result(timeout=60).model is not None
    finally:
        pool.shutdown()
