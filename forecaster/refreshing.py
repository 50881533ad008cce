"""Refreshes: each target's new points and current value, read from its source on one
bounded lane per source, folded in and published. A slow or hung server holds up only its own
targets; refreshes of one target never overlap."""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol

import pandas as pd

from forecaster.config import EngineSettings
from forecaster.errors import SourceError, SourceUnavailableError
from forecaster.sources import HistorySource
from forecaster.sources.prometheus import RefusedPointsError
from forecaster.target import Target, begin_outage, end_outage, freshness_limit

log = logging.getLogger(__name__)


class FitSubmitter(Protocol):
    """Where a target without a model after its refresh is sent to be fitted."""

    def submit(self, target: Target) -> None: ...


class RefreshListener(Protocol):
    """Told of each refresh as it finishes (the service's metrics implement this)."""

    def refresh_finished(self, target_id: str, ok: bool) -> None: ...


class _Lane:
    """One source's refreshes: at most `limit` run at once, on daemon threads, the rest wait
    in order. Daemon threads, because a thread stuck in a hung HTTP call must not hold up exit."""

    def __init__(self, name: str, limit: int, work: Callable[[Target], None]) -> None:
        self.name = name
        self.limit = limit
        self._work = work
        self._queue: deque[Target] = deque()
        self._lock = threading.Lock()
        self._running = 0
        self._closed = False

    def put(self, target: Target) -> bool:
        """Queue the target's refresh; False once the lane is closed."""
        with self._lock:
            if self._closed:
                return False
            self._queue.append(target)
            if self._running < self.limit:
                self._running += 1
                threading.Thread(target=self._drain, name=f"refresh-{self.name}",
                                 daemon=True).start()
        return True

    def close(self) -> list[Target]:
        """Take no more work; the refreshes that had not started, dropped and returned."""
        with self._lock:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
        return pending

    def _drain(self) -> None:
        while True:
            with self._lock:
                if self._closed or not self._queue:
                    self._running -= 1
                    return
                target = self._queue.popleft()
            self._work(target)


class Refreshes:
    """Refreshes on one bounded lane per source: new points and the current value from each
    target's source, folded in and published. A slow or hung server holds up only its own
    targets' refreshes; refreshes of one target never overlap."""

    def __init__(
        self,
        settings: EngineSettings,
        refits: FitSubmitter,
        *,
        clock: Callable[[], float],
        listener: RefreshListener,
        read_failed: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.refits = refits
        self.clock = clock
        self.listener = listener
        # Called after a failed read: a refused reply was read (up to maxReplyBytes) and
        # perhaps parsed, and the engine hands that memory back at its next trim.
        self.read_failed = read_failed
        self._lanes: dict[int, tuple[HistorySource, _Lane]] = {}  # by id(source); keeps it alive
        self._lanes_lock = threading.Lock()
        self._closed = False
        self._claims = threading.Lock()  # taken to mark a target refreshing, for no overlap

    def submit(self, target: Target) -> None:
        """Refresh on the target's source's lane, unless a refresh of the target is in flight."""
        if self._claim(target) and not self._lane(target.source).put(target):
            target.refreshing = False  # shut down: nothing will run it

    def run(self, target: Target) -> bool:
        """Refresh in the calling thread; False, doing nothing, while one is in flight."""
        if not self._claim(target):
            return False
        self._refresh(target)
        return True

    def concurrency(self, source: HistorySource) -> int:
        """How many refreshes of this source may run at once: its server's
        maxConcurrentQueries, else the engine's ioWorkers."""
        server = getattr(source, "server", None)
        limit = getattr(server, "max_concurrent_queries", None)
        return limit if isinstance(limit, int) and limit > 0 else self.settings.io_workers

    def shutdown(self) -> None:
        """Drop the refreshes not started; those in flight are abandoned, never waited for
        (a hung HTTP call would hold up the stop for its whole timeout and retries)."""
        with self._lanes_lock:
            self._closed = True
            lanes = [lane for _, lane in self._lanes.values()]
        for lane in lanes:
            for target in lane.close():
                target.refreshing = False

    def _lane(self, source: HistorySource) -> _Lane:
        with self._lanes_lock:
            entry = self._lanes.get(id(source))
            if entry is None:
                url = getattr(getattr(source, "server", None), "url", None)
                lane = _Lane(str(url or type(source).__name__), self.concurrency(source),
                             self._refresh)
                if self._closed:
                    lane.close()
                entry = self._lanes[id(source)] = (source, lane)
            return entry[1]

    def _claim(self, target: Target) -> bool:
        with self._claims:
            if target.refreshing:
                return False
            target.refreshing = True
        target.next_refresh = self.clock() + self.settings.refresh_seconds
        return True

    def _refresh(self, target: Target) -> None:
        try:
            fetched = self._fetch(target)
            if fetched is not None:
                with target.lock:  # held only to fold in and publish, never during a query
                    target.fold_in(*fetched, freshness_limit(self.settings, target.spec))
        except Exception:
            target.next_refresh = max(target.next_refresh,
                                      self.clock() + self.settings.refresh_seconds)
            log.exception("refresh of %s failed unexpectedly", target.target_id)
        finally:
            target.refreshing = False
        retry_due = target.fit_failures == 0 or self.clock() >= target.next_refit
        if target.model is None and not target.fit_pending and len(target.buffer) and retry_due:
            self.refits.submit(target)

    def _fetch(self, target: Target) -> tuple[pd.Series, tuple[float, float]] | None:
        """New grid points since the last refresh, and the current value; None on failure."""
        try:
            fetched = read_since_last(target, self.clock())
        except (SourceError, SourceUnavailableError) as exc:
            if isinstance(exc, SourceUnavailableError):  # an outage; SourceError is data
                begin_outage(target, self.clock(), freshness_limit(self.settings, target.spec))
            with target.lock:  # a fit may be publishing at the same moment
                if not isinstance(exc, SourceUnavailableError):
                    end_outage(target)  # it answers again, with no usable data: no outage
                target.refresh_failures += 1
                target.snapshot = replace(target.snapshot, last_error=str(exc))
            # The next try waits a whole interval from now, however long this one hung.
            target.next_refresh = max(target.next_refresh,
                                      self.clock() + self.settings.refresh_seconds)
            log.warning("refresh of %s failed: %s", target.target_id, exc)
            self.listener.refresh_finished(target.target_id, False)
            self.read_failed()
            target.mark_first_value()  # a request waiting for the first value gets this error now
            return None
        self.listener.refresh_finished(target.target_id, True)
        return fetched


def read_since_last(target: Target, now: float) -> tuple[pd.Series, tuple[float, float]]:
    """New grid points since the target's last bin (the whole window at first) and the
    current value (epoch seconds, value), from its source; SourceError or
    SourceUnavailableError. The source leaves out the points it refuses (gaps in history).

    Only the target's refresh extends its buffer, and refreshes of one target never overlap,
    so reading `buffer.last` here needs no lock.
    """
    spec, step = target.spec, target.spec.step_seconds
    end = datetime.fromtimestamp(math.floor(now / step) * step, UTC)
    last = target.buffer.last
    start = (
        end - pd.Timedelta(seconds=spec.history_window_seconds - step)
        if last is None
        else (last + target.step).to_pydatetime()
    )
    # The current value first: when it is refused (negative, NaN, Inf) the refresh fails
    # with that reason alone, before the range is read and its refusals logged too.
    stamp, value = target.source.query_instant(spec.query, datetime.fromtimestamp(now, UTC))
    points = pd.Series(dtype=float)
    if start <= end:
        try:
            points = target.source.query_range(spec.query, start, end, step)
        except SourceError as exc:
            if last is None:
                raise
            # No new points in an incremental window: the current value is enough.
            if isinstance(exc, RefusedPointsError):  # but say why, as a refresh would
                log.warning("refresh of %s: %s; left out as gaps", target.target_id, exc)
    return points, (stamp.timestamp(), value)
