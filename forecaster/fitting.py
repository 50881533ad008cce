"""Fits in worker processes: what a worker is sent, what it runs, and the pool that owns them.

A fit runs in a spawned process, one math thread each and at a lower priority, so that it
never holds up the process answering KEDA. The pool also hands the memory of replaced
models back to the system while fits land (`FitPool.trim_if_due`).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from forecaster.models import FallbackFit

MATH_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
WORKER_NICENESS = 10
TRIM_INTERVAL_SECONDS = 60.0  # at most this often, while fits land: see FitPool.trim_if_due


def pin_math_threads(*, override: bool = False) -> None:
    """One BLAS/OpenMP thread here and in child processes: with two on a 2-core machine,
    scikit-learn fits were seen to stall for minutes. `override` replaces values already set
    in the environment; otherwise they are kept."""
    from threadpoolctl import threadpool_limits

    for name in MATH_THREAD_VARIABLES:
        if override:
            os.environ[name] = "1"
        else:
            os.environ.setdefault(name, "1")
    threadpool_limits(limits=1)


def pin_worker_threads() -> None:
    """Fit workers: one math thread each, and a lower priority than the process answering
    KEDA (measured: GetMetrics during refits went from 789 to 1,845 calls/s)."""
    os.nice(WORKER_NICENESS)
    pin_math_threads(override=True)


def release_free_memory() -> bool:
    """glibc's malloc_trim(0): free pages in every arena go back to the system. False where
    the C library has none (musl, macOS). ctypes lets go of the GIL for the call."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


@dataclass(frozen=True)
class FitRequest:
    """What a worker process needs to fit one target: the grid as start + values (cheap to
    pickle), and the model it replaces, pickled under the target's lock so that it is a
    consistent copy (it may carry a model selection that is costly to redo)."""

    model: str
    step_seconds: int
    start: pd.Timestamp
    values: np.ndarray
    quantile: float
    horizon: int
    previous: bytes | None
    time_zone: str = "UTC"


def fit_job(request: FitRequest) -> FallbackFit:
    """Runs in a worker process."""
    # Imported here, not at the top: the CLI pins its math threads from this module before
    # any command runs, and the models' libraries take a second to load.
    from forecaster.models import fit_with_fallback

    step = pd.Timedelta(seconds=request.step_seconds)
    index = pd.date_range(request.start, periods=len(request.values), freq=step)
    previous = pickle.loads(request.previous) if request.previous is not None else None
    return fit_with_fallback(
        request.model,
        pd.Series(request.values, index=index),
        step,
        quantile=request.quantile,
        horizon=request.horizon,
        time_zone=request.time_zone,
        previous=previous,
    )


class FitPool:
    """The worker processes that fit, and the memory trimming their results call for.

    >>> pool = FitPool(2)                                       # doctest: +SKIP
    >>> pool.submit(request).add_done_callback(publish)         # doctest: +SKIP
    >>> pool.fit_landed(); pool.trim_if_due()                   # doctest: +SKIP
    >>> pool.shutdown()                                         # doctest: +SKIP

    Any `Executor` may stand in for the processes (tests fit in a thread).
    """

    def __init__(
        self,
        workers: int,
        *,
        executor: Executor | None = None,
        trim_interval_seconds: float = TRIM_INTERVAL_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.executor = executor or ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=pin_worker_threads,
        )
        self.trim_interval_seconds = trim_interval_seconds
        self._monotonic = monotonic
        self._landed_since_trim = 0  # fits published since memory was last trimmed
        self._last_trim = monotonic()

    def submit(self, request: FitRequest) -> Future[FallbackFit]:
        """Fit in a worker; the future holds the fit, or the worker's exception."""
        return self.executor.submit(fit_job, request)

    def pids(self) -> list[int]:
        """The worker processes' ids, in order (none before the first fit, or in a thread)."""
        processes, _ = self._internals()
        return sorted(int(pid) for pid in processes)

    def fit_landed(self) -> None:
        """A fitted model replaced an older one: its memory is worth trimming."""
        self._landed_since_trim += 1

    def trim_if_due(self) -> bool:
        """Hand the memory of replaced models back to the system, at most once per
        trim_interval_seconds while fits land; True when it trimmed. The C allocator keeps
        freed blocks otherwise: after a refit round of 1,000 targets the service held 622 MB,
        and 428 MB once trimmed."""
        now = self._monotonic()
        if not self._landed_since_trim or now - self._last_trim < self.trim_interval_seconds:
            return False
        self._landed_since_trim = 0
        self._last_trim = now
        release_free_memory()
        return True

    def shutdown(self) -> None:
        """Cancel queued fits and end the workers; a fit in flight is abandoned."""
        # A fit in flight would hold up the exit (Kubernetes sends SIGTERM at any time): end
        # the worker processes too.
        processes, manager = self._internals()
        self.executor.shutdown(wait=False, cancel_futures=True)
        for process in processes.values():
            process.terminate()
        # Let the pool's manager thread finish before the interpreter does: Python 3.11's exit
        # handler wakes it through a pipe it may be closing at that moment (a traceback with
        # "Bad file descriptor" at exit, about 1 run in 6 of `forecaster serve`).
        if manager is not None:
            manager.join(timeout=10)

    def _internals(self) -> tuple[dict[int, multiprocessing.process.BaseProcess],
                                  threading.Thread | None]:
        """The executor's worker processes by pid, and its manager thread. The one place that
        reads ProcessPoolExecutor's private attributes: it offers no public way to end its
        workers or to wait for its manager thread, and both are needed at shutdown."""
        processes = dict(getattr(self.executor, "_processes", None) or {})
        manager = getattr(self.executor, "_executor_manager_thread", None)
        return processes, manager if isinstance(manager, threading.Thread) else None
