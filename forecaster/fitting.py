"""Fits in worker processes: what a worker is sent, what it runs, and the pool that owns them.

A fit runs in a spawned process, one math thread each and at the lowest CPU priority, so that
it never holds up the process answering KEDA; a worker ends with the process that spawned it.
The pool replaces a worker that dies, and hands the memory of replaced models and dropped
targets back to the system (`FitPool.trim_if_due`).
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import (
    BrokenExecutor,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from forecaster.models import FallbackFit
    from forecaster.slo import ShareScorer

log = logging.getLogger(__name__)

MATH_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
WORKER_NICENESS = 10  # where SCHED_IDLE is refused
TRIM_INTERVAL_SECONDS = 60.0  # at most this often, while fits land: see FitPool.trim_if_due
FIT_TRIES = 2  # a fit whose worker dies is tried once more: twice, it may be what kills it
PARENT_POLL_SECONDS = 0.5  # how often a worker without PR_SET_PDEATHSIG looks for its parent
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
EXIT_STATUS_WAIT_SECONDS = 1.0  # for the exit status of a worker found dead
MALLOC_ARENAS = 1  # the serving process's glibc malloc arenas: see limit_malloc_arenas
M_ARENA_MAX = -8  # from <malloc.h>
M_MMAP_THRESHOLD = -3  # from <malloc.h>
MMAP_THRESHOLD_BYTES = 64 * 1024  # blocks this large get pages of their own: limit_malloc_arenas
SYSTEM_ALLOCATOR_MARK = "FORECASTER_SYSTEM_ALLOCATOR"  # set for the re-executed serving process
NO_THREAD_CACHE = "glibc.malloc.tcache_count=0"  # GLIBC_TUNABLES of the serving process

Priority = Literal["idle", "nice"]


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


def lower_priority(priority: Priority = "idle") -> Priority:
    """Give this process's CPU to every other one: SCHED_IDLE ("idle", which Linux lets any
    user set) runs it only on a core nothing else wants; nice 10 ("nice") only weighs it
    lower, and is the fallback where SCHED_IDLE is refused. Returns the one in force."""
    if priority == "idle":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "idle"
        except (AttributeError, OSError):  # not Linux, or refused (a seccomp profile)
            pass
    os.nice(WORKER_NICENESS)
    return "nice"


def exit_with_parent(parent: int) -> Literal["signal", "watch"]:
    """End this process when `parent` ends, even by SIGKILL: the kernel's parent-death
    signal on Linux ("signal"), else a thread that watches the parent pid ("watch")."""
    if sys.platform == "linux":
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != parent:  # it died before the signal was armed
                os._exit(1)
            return "signal"
    watch_parent(parent)
    return "watch"


def watch_parent(parent: int, poll_seconds: float = PARENT_POLL_SECONDS) -> threading.Thread:
    """A daemon thread that ends this process once its parent is no longer `parent` (an
    orphan is adopted by another process)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


def prepare_worker(priority: Priority, parent: int) -> None:
    """A fit worker's initializer: the lowest CPU priority (measured: see bench/README.md,
    bench_fit_priority.py), one math thread, and an exit with the engine's process."""
    lower_priority(priority)
    pin_math_threads(override=True)
    exit_with_parent(parent)


def spawn_workers(workers: int, *, priority: Priority = "idle") -> ProcessPoolExecutor:
    """An executor of `workers` spawned fit worker processes (spawned on demand)."""
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=prepare_worker,
        initargs=(priority, os.getpid()),
    )


def release_free_memory(*, collect: bool = False) -> bool:
    """glibc's malloc_trim(0): free pages in every arena go back to the system. With
    `collect`, a full collection first: it empties CPython's free lists (tuples, floats,
    lists, dicts kept for reuse) and frees garbage in cycles, whose blocks, left from a
    burst of targets, would each keep a page of the heap; it walks every live object, so it
    is for after drops, not every trim. False where the C library has no trim (musl,
    macOS). ctypes lets go of the GIL for the call."""
    import ctypes
    import ctypes.util

    if collect:
        gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def use_system_allocator() -> None:
    """Run the serving process on the C allocator (PYTHONMALLOC=malloc) by executing it again
    with that set, unless PYTHONMALLOC is set already: CPython's own allocator keeps a whole
    1 MiB arena for a few small objects that outlive a burst of targets, where glibc's trim
    hands the freed pages back (bench/README.md, "Dropped targets"). Unless GLIBC_TUNABLES
    is set, glibc's per-thread caches go too (NO_THREAD_CACHE): each thread's cache keeps
    up to seven freed blocks of every small size, which the trim sees as in use, and which
    keep their pages. The re-executed process takes both variables out of its environment,
    so that the fit workers and the gRPC front it starts keep CPython's allocator and
    glibc's defaults. Call it first thing: the process is replaced."""
    if os.environ.pop(SYSTEM_ALLOCATOR_MARK, None) is not None:
        os.environ.pop("PYTHONMALLOC", None)
        if os.environ.get("GLIBC_TUNABLES") == NO_THREAD_CACHE:
            del os.environ["GLIBC_TUNABLES"]
        return
    if "PYTHONMALLOC" in os.environ or not sys.orig_argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
              {"GLIBC_TUNABLES": NO_THREAD_CACHE, **os.environ, "PYTHONMALLOC": "malloc",
               SYSTEM_ALLOCATOR_MARK: "1"})


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """glibc's mallopt(M_ARENA_MAX): at most `arenas` malloc arenas for this process's
    threads, so that blocks freed by one thread are not stranded in an arena of its own and
    trimming hands more of them back (one: a model a refresh thread updated and the fit
    thread replaced leaves holes in neither's arena; bench/README.md, "Target memory"); and
    a fixed M_MMAP_THRESHOLD, so that glibc does not
    raise it as large blocks are freed and then carve them from the heap, where they strand
    pages (bench/README.md, "Dropped targets"). Call it before threads start; False where
    the C library has no such option (musl, macOS)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_ARENA_MAX, arenas)) and bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


@dataclass(frozen=True)
class FitRequest:
    """What a worker process needs to fit one target: the grid as start + values (cheap to
    pickle), and the model it replaces, pickled under the target's lock so that it is a
    consistent copy (it may carry a model selection that is costly to redo). With a
    maxUnderProvisioned, `scorer` is what `auto` ranks its candidates by: the cost of holding
    the share with each one's plan, served as the target serves it."""

    model: str
    step_seconds: int
    start: pd.Timestamp
    values: np.ndarray
    quantile: float
    horizon: int
    previous: bytes | None
    time_zone: str = "UTC"
    scorer: ShareScorer | None = None


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
        scorer=request.scorer,
    )


class FitPool:
    """The worker processes that fit, their replacement when one dies, and the memory
    trimming their results call for.

    >>> pool = FitPool(2)                                       # doctest: +SKIP
    >>> pool.submit(request).add_done_callback(publish)         # doctest: +SKIP
    >>> pool.fit_landed(); pool.trim_if_due()                   # doctest: +SKIP
    >>> pool.problem()                                          # doctest: +SKIP
    >>> pool.shutdown()                                         # doctest: +SKIP

    A worker that dies (a signal such as the OOM killer's) breaks a ProcessPoolExecutor for
    good; here the pool is replaced and each fit it held is tried once more. A fit whose
    second try also loses its worker fails with `FitWorkerDied`. `executor_factory` builds
    each executor (spawned workers by default); an `executor` given alone stands in for the
    processes (tests fit in a thread) and is not replaced.
    """

    def __init__(
        self,
        workers: int,
        *,
        executor: Executor | None = None,
        executor_factory: Callable[[], Executor] | None = None,
        trim_interval_seconds: float = TRIM_INTERVAL_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if executor_factory is None:
            executor_factory = (
                (lambda: spawn_workers(workers)) if executor is None else _not_replaceable
            )
        self.executor_factory = executor_factory
        self.trim_interval_seconds = trim_interval_seconds
        self._monotonic = monotonic
        self._freed_since_trim = 0  # models let go since memory was last trimmed
        self._collect_at_trim = False  # targets dropped since: collect before the trim
        self._last_trim = monotonic()
        self._lock = threading.Lock()
        self._executor = executor  # built by the factory on the first fit, and after a death
        self._problem: str | None = None
        self._deaths = 0
        self._broken: weakref.WeakKeyDictionary[Executor, tuple[WorkerDeath, ...]] = (
            weakref.WeakKeyDictionary()
        )
        self._death_listeners: list[Callable[[str], None]] = []
        self._closed = False
        # Fits wait here, first fits ahead of refits, until one of `workers` slots is free:
        # an executor's own queue is first come, first served.
        self._slots = max(1, workers)
        self._waiting: list[tuple[bool, int, FitRequest | Callable[[], FitRequest],
                                  Future[FallbackFit]]] = []
        self._arrivals = itertools.count()
        # Every executor is fed from this one thread: a worker spawned by a thread exits when
        # that thread does (PR_SET_PDEATHSIG follows the parent thread), and this one lasts as
        # long as the pool.
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="fit-sender")

    def submit(self, request: FitRequest | Callable[[], FitRequest], *,
               first: bool = False) -> Future[FallbackFit]:
        """Fit in a worker; the future holds the fit, or the worker's exception
        (`FitWorkerDied` when its worker died on both tries). RuntimeError once shut down.
        A `first` fit (of a target with no model yet) goes before the refits waiting. A
        callable is called for the request when a worker is free, so that fits waiting hold
        no copy of their history and model."""
        fit: Future[FallbackFit] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the fit pool is shut down")
            heapq.heappush(self._waiting, (not first, next(self._arrivals), request, fit))
        self._sender.submit(self._send_next)
        return fit

    def notify_deaths(self, listener: Callable[[str], None]) -> None:
        """Call `listener` with the cause of each worker death (for the service's metrics)."""
        self._death_listeners.append(listener)

    @property
    def deaths(self) -> int:
        """Worker processes found dead since the pool started."""
        return self._deaths

    def problem(self) -> str | None:
        """Why fits cannot run (no executor or worker process could be started), None once a
        fit lands again. For /healthz: a process that cannot fit needs a restart."""
        return self._problem

    def pids(self) -> list[int]:
        """The worker processes' ids, in order (none before the first fit, or in a thread)."""
        processes, _ = _internals(self._executor)
        return sorted(int(pid) for pid in processes)

    def fit_landed(self) -> None:
        """A fitted model replaced an older one: its memory is worth trimming."""
        self.memory_freed()

    def memory_freed(self, *, dropped: bool = False) -> None:
        """Models were let go (replaced, or their targets dropped): trim at the next due
        trim_if_due, after a full collection when targets were `dropped` (see
        release_free_memory)."""
        self._freed_since_trim += 1
        self._collect_at_trim |= dropped

    def trim_if_due(self) -> bool:
        """Hand the memory of replaced models and dropped targets back to the system, at most
        once per trim_interval_seconds while they are let go; True when it trimmed. The C
        allocator keeps freed blocks otherwise: after a refit round of 1,000 targets the
        service held 622 MB, and 428 MB once trimmed."""
        now = self._monotonic()
        if not self._freed_since_trim or now - self._last_trim < self.trim_interval_seconds:
            return False
        self._freed_since_trim = 0
        self._last_trim = now
        collect, self._collect_at_trim = self._collect_at_trim, False
        release_free_memory(collect=collect)
        return True

    def shutdown(self) -> None:
        """Cancel queued fits and end the workers; a fit in flight is abandoned."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = self._waiting, []
        for *_, fit in waiting:
            fit.cancel()
        self._sender.shutdown(wait=True)  # fits still queued there are cancelled, not sent
        executor = self._executor
        if executor is None:
            return
        # A fit in flight would hold up the exit (Kubernetes sends SIGTERM at any time): end
        # the worker processes too.
        processes, manager = _internals(executor)
        executor.shutdown(wait=False, cancel_futures=True)
        for process in processes.values():
            process.terminate()
        # Let the pool's manager thread finish before the interpreter does: Python 3.11's exit
        # handler wakes it through a pipe it may be closing at that moment (a traceback with
        # "Bad file descriptor" at exit, about 1 run in 6 of `forecaster serve`).
        if manager is not None:
            manager.join(timeout=10)

    # -- sending, and replacing a broken executor ----------------------------------------------

    def _send_next(self) -> None:
        """On the sender thread: send the first waiting fit while a slot is free."""
        with self._lock:
            if self._closed or self._slots == 0 or not self._waiting:
                return
            *_, waiting, fit = heapq.heappop(self._waiting)
            self._slots -= 1
        fit.add_done_callback(self._slot_freed)
        try:
            request = waiting() if callable(waiting) else waiting
        except Exception as exc:  # the target could not say what to fit: the fit fails
            fit.set_exception(exc)
            return
        self._send(request, fit, ())

    def _slot_freed(self, _: Future[FallbackFit]) -> None:
        with self._lock:
            self._slots += 1
        with contextlib.suppress(RuntimeError):  # shut down: what waited was cancelled
            self._sender.submit(self._send_next)

    def _send(self, request: FitRequest, fit: Future[FallbackFit],
              deaths: tuple[WorkerDeath, ...]) -> None:
        """On the sender thread: hand the fit to the current executor, built if need be."""
        try:
            executor = self._current()
        except _Closed:
            fit.cancel()
            return
        except Exception as exc:  # no executor: the fit fails with the reason
            fit.set_exception(FitWorkerDied(deaths, replacement_error=exc) if deaths else exc)
            return
        try:
            job = executor.submit(fit_job, request)
        except BrokenExecutor:  # a worker died while idle: noticed on this submit
            self._retry(request, fit, (*deaths, *self._replace(executor)))
            return
        except OSError as exc:  # no worker process could be spawned (pid or fd limits)
            self._cannot_start(exc)
            fit.set_exception(exc)
            return
        except Exception as exc:  # shut down meanwhile
            fit.set_exception(exc)
            return
        job.add_done_callback(lambda done: self._returned(executor, request, fit, deaths, done))

    def _returned(self, executor: Executor, request: FitRequest, fit: Future[FallbackFit],
                  deaths: tuple[WorkerDeath, ...], job: Future[FallbackFit]) -> None:
        """In the executor's thread: pass the outcome on, or try again after a death."""
        if job.cancelled():
            fit.cancel()
            return
        error = job.exception()
        if error is None:
            self._problem = None  # fits run again
            fit.set_result(job.result())
        elif not isinstance(error, BrokenExecutor) or self._closed:
            fit.set_exception(error)
        else:
            self._retry(request, fit, (*deaths, *self._replace(executor)))

    def _retry(self, request: FitRequest, fit: Future[FallbackFit],
               deaths: tuple[WorkerDeath, ...]) -> None:
        if len(deaths) >= FIT_TRIES:
            fit.set_exception(FitWorkerDied(deaths))
            return
        try:
            self._sender.submit(self._send, request, fit, deaths)
        except RuntimeError:  # shut down
            fit.cancel()

    def _current(self) -> Executor:
        with self._lock:
            if self._closed:
                raise _Closed
            if self._executor is None:
                try:
                    self._executor = self.executor_factory()
                except Exception as exc:
                    self._cannot_start(exc)
                    raise
            return self._executor

    def _cannot_start(self, error: Exception) -> None:
        """Say so on /healthz until a fit lands again."""
        self._problem = f"the fit pool cannot start worker processes: {error}"
        log.error("%s", self._problem)

    def _replace(self, executor: Executor) -> tuple[WorkerDeath, ...]:
        """The deaths that broke `executor`, found once; the next fit builds its successor."""
        with self._lock:
            known = self._broken.get(executor)
            if known is not None:
                return known[:1]  # another fit it held: the same death, counted once
            deaths = _deaths_of(executor)
            self._broken[executor] = deaths
            if self._executor is executor:
                self._executor = None
            self._deaths += len(deaths)
        for death in deaths:
            log.warning("%s; replacing the fit pool and trying its fits once more", death)
            for listener in self._death_listeners:
                listener(str(death))
        return deaths[:1]


@dataclass(frozen=True)
class WorkerDeath:
    """A fit worker process found dead: its pid and exit code (negative: the signal), when
    known."""

    pid: int | None
    exitcode: int | None

    def __str__(self) -> str:
        if self.pid is None or self.exitcode is None:
            return "a fit worker process died; its exit status is unknown"
        if self.exitcode < 0:
            number = -self.exitcode
            try:
                name = f" ({signal.Signals(number).name})"
            except ValueError:
                name = ""
            return f"fit worker process {self.pid} was killed by signal {number}{name}"
        return f"fit worker process {self.pid} exited with code {self.exitcode}"


class FitWorkerDied(RuntimeError):
    """A fit lost its worker process on every try, or no new worker could be started."""

    def __init__(self, deaths: tuple[WorkerDeath, ...],
                 replacement_error: BaseException | None = None) -> None:
        self.deaths = deaths
        self.replacement_error = replacement_error
        if replacement_error is not None:
            message = (f"{deaths[-1]}, and no new fit worker could be started: "
                       f"{replacement_error}")
        else:
            message = (f"its worker process died on each of {len(deaths)} tries: "
                       + "; then ".join(str(death) for death in deaths))
        super().__init__(message)


class _Closed(Exception):
    pass


def _not_replaceable() -> Executor:
    raise RuntimeError("the executor given to the fit pool broke, and it has no "
                       "executor_factory to build another")


def _deaths_of(executor: Executor) -> tuple[WorkerDeath, ...]:
    """The workers of a broken executor that had exited when it broke (the rest it ends with
    SIGTERM, after its fits are failed), at least one."""
    processes, _ = _internals(executor)
    dead = []
    for pid, process in processes.items():
        # Its sentinel closes as it exits, a moment before the kernel has its exit status.
        if process.exitcode is None and _sentinel_ready(process):
            process.join(EXIT_STATUS_WAIT_SECONDS)
        if process.exitcode is not None:
            dead.append(WorkerDeath(int(pid), process.exitcode))
    first = [death for death in dead if death.exitcode != -signal.SIGTERM] or dead
    return tuple(first) or (WorkerDeath(None, None),)


def _sentinel_ready(process: multiprocessing.process.BaseProcess) -> bool:
    try:
        return bool(multiprocessing.connection.wait([process.sentinel], timeout=0))
    except (OSError, ValueError):  # closed: the process was joined and closed
        return False


def _internals(executor: Executor | None) -> tuple[
    dict[int, multiprocessing.process.BaseProcess], threading.Thread | None
]:
    """The executor's worker processes by pid, and its manager thread. The one place that
    reads ProcessPoolExecutor's private attributes: it offers no public way to end its
    workers, to wait for its manager thread or to say how a worker died, and all are needed."""
    processes = dict(getattr(executor, "_processes", None) or {})
    manager = getattr(executor, "_executor_manager_thread", None)
    return processes, manager if isinstance(manager, threading.Thread) else None
