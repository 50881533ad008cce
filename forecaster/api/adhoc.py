"""Ad-hoc forecasts (POST /api/v1/forecast) in worker processes, at most N at a time.

A forecast of thousands of points leaves memory behind in the process that ran it (freed blocks
the allocators keep, caches of the models' libraries), and the engine's process lives for
weeks. So everything large about one (parsing and validating the body, the fit, the prediction,
the answer's JSON) runs in a small process pool of its own: spawned (no copy of the engine's
memory), at normal priority (a person waits on the answer, unlike the engine's background
refits), with one math thread each. The serving process keeps only the raw body, the answer's
bytes, and the Prometheus query of a query body (it holds the clients and their credentials).

The pool starts on first use and is shut down after IDLE_SECONDS without work, and each worker
is replaced after TASKS_PER_WORKER jobs, so the workers do not hold a fit's memory for long
either. A request beyond the slots is refused at once (Busy: 503 with Retry-After), never
queued.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from types import TracebackType

import pandas as pd

from forecaster.api.errors import Busy, PayloadTooLarge
from forecaster.api.inputs import AdhocRequest, adhoc_request, parse_body
from forecaster.api.render import forecast_json
from forecaster.errors import ForecasterError, InvalidInputError
from forecaster.fitting import exit_with_parent, pin_math_threads
from forecaster.models import fit_with_fallback
from forecaster.series import to_grid

log = logging.getLogger(__name__)

SLOTS = 2  # ad-hoc forecasts at once
IDLE_SECONDS = 60.0  # the workers are shut down after this long without work
TASKS_PER_WORKER = 8  # then the worker is replaced, with the memory it grew
TIMEOUT_SECONDS = 120.0  # a request waits this long for its forecast
BUSY_RETRY_AFTER_SECONDS = 5
FIT_HORIZON = 2  # what the engine fits for; longer horizons are predicted from that fit
OOM_SCORE_ADJ = 500  # of -1000..1000; a process may raise its own without privileges


@dataclass(frozen=True)
class AdhocJob:
    """A request body to parse, validate and (inline points) answer; or a validated request,
    with the history Prometheus gave for it when it is a query."""

    body: bytes | None = None
    request: AdhocRequest | None = None
    history: pd.Series | None = None


@dataclass(frozen=True)
class AdhocAnswer:
    """A worker's answer: the response body; or, for a query body, the validated request
    (the serving process holds the Prometheus clients); or a refusal. Our exceptions do not
    survive pickling (their constructors take fields), so a refusal comes back as
    (kind, message, field), kind one of invalid (400), too_large (413), unprocessable (422)."""

    json: bytes | None = None
    query: AdhocRequest | None = None
    error: tuple[str, str, str | None] | None = None
    worker_pid: int = 0


def run_adhoc(job: AdhocJob) -> AdhocAnswer:
    """Parse and validate the body, grid, fit (with the named fallbacks), predict and render,
    as the engine and the routes do; in a worker. Every large object lives and dies here."""
    blame = "series"
    try:
        if job.body is not None:
            wanted = adhoc_request(parse_body(job.body))
            if wanted.series is None:
                return AdhocAnswer(query=wanted, worker_pid=os.getpid())
        elif job.request is not None:
            wanted = job.request
        else:
            raise ValueError("an AdhocJob needs a body or a validated request")
        history = wanted.series
        if history is None:
            history, blame = job.history, "historyWindow"
        if history is None:
            raise ValueError("a query request needs the history Prometheus gave for it")
        step = pd.Timedelta(seconds=wanted.step_seconds)
        # Models that tune themselves to a quantile (auto, gbm_quantile) get the highest one
        # asked for, as the scaler gives them the one it provisions for.
        quantile = max(wanted.quantiles) if max(wanted.quantiles) >= 0.5 else 0.9
        grid = to_grid(history, step)
        fit = fit_with_fallback(wanted.model, grid.filled, step, quantile=quantile,
                                horizon=FIT_HORIZON)
        forecast = fit.model.predict(wanted.horizon, wanted.quantiles)
    except InvalidInputError as exc:
        return AdhocAnswer(error=("invalid", exc.reason, exc.field), worker_pid=os.getpid())
    except PayloadTooLarge as exc:
        return AdhocAnswer(error=("too_large", exc.message, exc.field), worker_pid=os.getpid())
    except ForecasterError as exc:  # too little history for any model, even the fallbacks
        return AdhocAnswer(error=("unprocessable", str(exc), blame), worker_pid=os.getpid())
    answer = {
        "requestedModel": wanted.model,
        "fellBack": fit.fell_back,
        "failures": [{"model": model, "reason": reason} for model, reason in fit.failures],
        "historyPoints": int(grid.filled.notna().sum()),
        "pointsReceived": int(history.notna().sum()),
        "pointsFilled": grid.held_steps,
        **forecast_json(forecast, wanted.horizon, wanted.quantiles, fit.model.chosen_name),
    }
    return AdhocAnswer(json=json.dumps(answer, allow_nan=False).encode(),
                       worker_pid=os.getpid())


def _init_worker(parent: int) -> None:
    """One BLAS/OpenMP thread, as for every fit on a small pod; first in line for the
    kernel's OOM killer: a forecast that outgrows the pod's memory ends its own worker (503),
    not the engine's process; and an exit with the engine's process, however it ends."""
    pin_math_threads(override=True)
    exit_with_parent(parent)
    try:
        with open("/proc/self/oom_score_adj", "w", encoding="ascii") as adjust:
            adjust.write(str(OOM_SCORE_ADJ))
    except OSError:  # not Linux: no OOM killer to steer
        pass


class AdhocRunner:
    """The slots and the worker processes of ad-hoc forecasts.

    >>> runner = AdhocRunner()
    >>> with runner.reserve() as slot:      # Busy when every slot is taken   # doctest: +SKIP
    ...     answer = slot.run(AdhocJob(body=b'{"series": [...]}'))          # doctest: +SKIP
    >>> runner.close()
    """

    def __init__(
        self,
        slots: int = SLOTS,
        *,
        idle_seconds: float = IDLE_SECONDS,
        timeout_seconds: float = TIMEOUT_SECONDS,
        tasks_per_worker: int = TASKS_PER_WORKER,
    ) -> None:
        self.slots = slots
        self.idle_seconds = idle_seconds
        self.timeout_seconds = timeout_seconds
        self.tasks_per_worker = tasks_per_worker
        self.free = threading.BoundedSemaphore(slots)  # public: tests take slots to fill them
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._running = 0
        self._idle_timer: threading.Timer | None = None
        self._closed = False

    def reserve(self) -> AdhocSlot:
        """Take a slot now, or raise Busy; the slot is held until its forecast ends."""
        if not self.free.acquire(blocking=False):
            raise Busy(
                f"{self.slots} ad-hoc forecasts are already running; retry shortly",
                retry_after=BUSY_RETRY_AFTER_SECONDS,
            )
        return AdhocSlot(self)

    @property
    def started(self) -> bool:
        """Whether worker processes exist now (they end after idle_seconds without work)."""
        return self._pool is not None

    def close(self) -> None:
        """End the workers, a forecast in flight included (the service is stopping)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            if self._idle_timer is not None:
                self._idle_timer.cancel()
        if pool is not None:
            _terminate(pool)

    def _submit(self, job: AdhocJob) -> tuple[ProcessPoolExecutor, Future[AdhocAnswer]]:
        with self._lock:
            if self._closed:
                raise Busy("the service is stopping", retry_after=BUSY_RETRY_AFTER_SECONDS)
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            try:
                pool = self._pool or self._start()
                future = pool.submit(run_adhoc, job)
            except BrokenProcessPool:  # a worker died since the last job: start afresh
                broken = self._pool
                pool = self._start()
                future = pool.submit(run_adhoc, job)
                if broken is not None:
                    _terminate(broken)
            self._running += 1
        future.add_done_callback(lambda _: self._finished(pool))
        return pool, future

    def _start(self) -> ProcessPoolExecutor:
        self._pool = ProcessPoolExecutor(
            self.slots,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(os.getpid(),),
            max_tasks_per_child=self.tasks_per_worker,
        )
        return self._pool

    def _finished(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0 and self._pool is pool and not self._closed:
                self._idle_timer = threading.Timer(self.idle_seconds, self._retire, (pool,))
                self._idle_timer.daemon = True
                self._idle_timer.start()

    def _retire(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is not pool or self._running:
                return
            self._pool = None
            self._idle_timer = None
        pool.shutdown(wait=True)

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        """A worker died (killed, out of memory): the pool is unusable; the next request
        starts a new one."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
        _terminate(pool)


class AdhocSlot:
    """One reserved slot: it is given back once the block is left and every job run in it has
    ended (a job that outlives its request's wait still holds it)."""

    def __init__(self, runner: AdhocRunner) -> None:
        self._runner = runner
        self._holds = 1  # the block, and each job in flight
        self._lock = threading.Lock()

    def __enter__(self) -> AdhocSlot:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._let_go()

    def _let_go(self) -> None:
        with self._lock:
            self._holds -= 1
            last = self._holds == 0
        if last:
            self._runner.free.release()

    def run(self, job: AdhocJob) -> AdhocAnswer:
        """The job's answer from a worker; Busy when the worker died or took too long."""
        runner = self._runner
        with self._lock:
            self._holds += 1
        try:
            pool, future = runner._submit(job)
        except BaseException:
            self._let_go()
            raise
        future.add_done_callback(lambda _: self._let_go())
        try:
            return future.result(timeout=runner.timeout_seconds)
        except FutureTimeout:
            raise Busy(
                f"the forecast did not finish within {runner.timeout_seconds:.0f}s; ask for "
                f"a simpler model, fewer points or a shorter horizon",
                retry_after=BUSY_RETRY_AFTER_SECONDS,
            ) from None
        except BrokenProcessPool:
            runner._discard(pool)
            log.warning("an ad-hoc forecast's worker process died; starting a new one")
            raise Busy(
                "the worker process of this forecast ended unexpectedly (out of memory?); "
                "retry with fewer points or a simpler model",
                retry_after=BUSY_RETRY_AFTER_SECONDS,
            ) from None


def _terminate(pool: ProcessPoolExecutor) -> None:
    # A fit in flight would hold up a stop: end the workers too. The pool keeps them in a
    # private attribute (as the engine's stop also reads it).
    workers = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in workers:
        process.terminate()
