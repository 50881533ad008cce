"""The live targets: background refreshes and refits, and the latest forecast of each.

Requests never fit and never wait on a fit: each target publishes an immutable `Snapshot`
that readers take without a lock. The engine keeps the registry and a loop thread that
schedules refreshes (`Refreshes`: new points and the current value, on one bounded lane of
I/O threads per source) and refits (`Refits`: in worker processes, so a fit never holds up
the process that answers requests). A fit that fails keeps the last good model. What a
target makes of the points and models they bring is forecaster.target's.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import replace
from typing import Protocol

import pandas as pd

from forecaster.config import EngineSettings
from forecaster.errors import (
    ForecasterError,
    NotReadyError,
    TooManyTargetsError,
    UnknownTargetError,
)
from forecaster.fitting import FitPool
from forecaster.models import FallbackFit, Forecast
from forecaster.policy import PlannedLoad
from forecaster.refreshing import Refreshes
from forecaster.sources import HistorySource
from forecaster.spec import TriggerSpec, changed_keys, quoted
from forecaster.state import SHUTDOWN_SECONDS, SavedTarget, Saver, restore
from forecaster.target import (
    Snapshot,
    Target,
    freshness_limit,
    serve_through_outage,
)

log = logging.getLogger(__name__)

LOOP_PERIOD_SECONDS = 0.5


class EngineListener(Protocol):
    """Told of background work as it finishes (the service's metrics implement this)."""

    def fit_finished(self, target_id: str, seconds: float, ok: bool, fell_back: bool) -> None: ...

    def refresh_finished(self, target_id: str, ok: bool) -> None: ...

    def fit_worker_died(self, cause: str) -> None: ...

    def spec_conflict(self, target_id: str) -> None: ...

    def spec_changed(self, target_id: str) -> None: ...


class _NoListener:
    def fit_finished(self, target_id: str, seconds: float, ok: bool, fell_back: bool) -> None:
        pass

    def refresh_finished(self, target_id: str, ok: bool) -> None:
        pass

    def fit_worker_died(self, cause: str) -> None:
        pass

    def spec_conflict(self, target_id: str) -> None:
        pass

    def spec_changed(self, target_id: str) -> None:
        pass


class Engine:
    """Keeps every target's latest forecast fresh; answers reads from published snapshots.

    >>> engine = Engine(EngineSettings(), clock=time.time)          # doctest: +SKIP
    >>> engine.start()                                              # doctest: +SKIP
    >>> engine.ensure_target("shop/web/fc-1", spec, source)         # doctest: +SKIP
    >>> engine.serve("shop/web/fc-1").value                         # doctest: +SKIP
    """

    def __init__(
        self,
        settings: EngineSettings,
        *,
        clock: Callable[[], float] = time.time,
        fit_pool: Executor | FitPool | None = None,
        listener: EngineListener | None = None,
        saver: Saver | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self.listener: EngineListener = listener or _NoListener()
        self.saver = saver  # None: no saved state
        self._targets: dict[str, Target] = {}
        self._registry_lock = threading.Lock()
        self.fits = (fit_pool if isinstance(fit_pool, FitPool)
                     else FitPool(settings.fit_workers, executor=fit_pool))
        self._refits = Refits(self.fits, settings, clock=clock, listener=self.listener,
                              saver=saver)
        self._refreshes = Refreshes(settings, self._refits, clock=clock, listener=self.listener)
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None
        self.started_at = clock()

    @property
    def clock(self) -> Callable[[], float]:
        """The engine's time in epoch seconds (injected: tests pass a clock of their own)."""
        return self._clock

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background loop (idempotent)."""
        if self._loop is None:
            self._loop = threading.Thread(target=self._run, name="engine-loop", daemon=True)
            self._loop.start()

    def stop(self, save_seconds: float = SHUTDOWN_SECONDS) -> None:
        """Stop the loop and the pools (in-flight fits are abandoned), then save the targets
        changed since their last save, for at most `save_seconds`."""
        self._stop.set()
        if self._loop is not None:
            self._loop.join(timeout=5)
        self._refreshes.shutdown()
        self.fits.shutdown()  # ends the worker processes: a fit in flight would hold up exit
        if self.saver is not None:
            began = time.monotonic()
            saved = self.saver.close(self.targets(), save_seconds)
            log.info("saved the state of %d targets in %.2fs", saved, time.monotonic() - began)

    def _run(self) -> None:
        while not self._stop.wait(LOOP_PERIOD_SECONDS):
            try:
                self.tick()
                self.fits.trim_if_due()
            except Exception:  # the loop must outlive any one bad pass
                log.exception("engine loop pass failed")

    # -- registry ----------------------------------------------------------------------------

    def ensure_target(
        self, target_id: str, spec: TriggerSpec, source: HistorySource, *, configured: bool = False
    ) -> Target:
        """The target for this id, created (or replaced, when its spec changed) as needed.

        A new target is refreshed at once in the background (a replacement of a target made
        less than a refresh interval ago, once that interval is over); its first fit follows.
        """
        now = self.clock()
        target = self._targets.get(target_id)
        if target is not None and target.spec == spec:
            target.last_requested = now
            if self._targets.get(target_id) is target:  # not dropped as idle meanwhile
                return target
        with self._registry_lock:
            target = self._targets.get(target_id)
            if target is not None and target.configured and not configured and target.spec != spec:
                # The config file's spec wins: replacing it on every poll would never let a
                # forecast form. Said once per differing spec.
                if target.spec_conflict != spec:
                    target.spec_conflict = spec
                    log.warning("target %s: a scaler request's trigger differs from the config "
                                "file's; serving the config file's", target_id)
                    self.listener.spec_conflict(target_id)
                target.last_requested = now
                return target
            full = len(self._targets) >= self.settings.max_targets
            if target is None and not configured and full:
                raise TooManyTargetsError(target_id, self.settings.max_targets)
            if target is None or target.spec != spec:
                previous = target
                if previous is not None:
                    spec_changed(target_id, previous.spec, spec)
                    self.listener.spec_changed(target_id)
                keep = configured or (previous is not None and previous.configured)
                replaced = self._targets.get(target_id)
                if replaced is not None:
                    self._retire(replaced)  # the old spec's state: never restored
                target = Target(target_id, spec, source, configured=keep, clock=self.clock,
                                created_at=now)
                target.last_requested = now
                if (previous is not None
                        and now - previous.created_at < self.settings.refresh_seconds):
                    # Replaced again within a refresh interval (two triggers sharing this
                    # id): its first read waits for the interval, as its predecessor's
                    # next one would have, so replacements cannot query in a loop.
                    target.next_refresh = max(previous.next_refresh,
                                              previous.created_at + self.settings.refresh_seconds)
                else:
                    self._refreshes.submit(target)  # before the loop sees it: no overlap
                self._targets[target_id] = target
                log.info("new target %s: serving the current value until its first fit", target_id)
            target.last_requested = now
            return target

    def restore(
        self, saved: SavedTarget, source: HistorySource, *, configured: bool = False
    ) -> Target:
        """Recreate a target from its saved state (forecaster.state): its first refresh
        reads the history since and serves a forecast from the saved model, and it refits
        when its saved fit is refitInterval old. TooManyTargetsError past maxTargets."""
        now = self.clock()
        with self._registry_lock:
            existing = self._targets.get(saved.target_id)
            if existing is not None:
                return existing
            if not configured and len(self._targets) >= self.settings.max_targets:
                raise TooManyTargetsError(saved.target_id, self.settings.max_targets)
            target = Target(saved.target_id, saved.spec, source, configured=configured,
                            clock=self.clock)
            restore(target, saved)
            target.last_requested = now
            target.next_refit = restored_refit_due(saved, now, self.settings.refit_seconds)
            self._refreshes.submit(target)  # before it is visible to the loop: no overlap
            self._targets[saved.target_id] = target
        return target

    def get(self, target_id: str) -> Target:
        try:
            return self._targets[target_id]
        except KeyError:
            raise UnknownTargetError(target_id) from None

    def targets(self) -> Iterator[Target]:
        return iter(list(self._targets.values()))

    def __len__(self) -> int:
        return len(self._targets)

    # -- reads (never block on fits) ---------------------------------------------------------

    def serve(self, target_id: str, *, wait: bool = True) -> PlannedLoad:
        """The load to plan for now; NotReadyError when there is no fresh data to stand on.

        A new target's first value is waited for (up to first_value_wait_seconds) unless
        `wait` is False: the scaler's bridge sends the first value when it comes instead."""
        target = self.get(target_id)
        snapshot = target.snapshot
        if snapshot.current_value is None and wait:
            target.first_value.wait(self.settings.first_value_wait_seconds)
            snapshot = target.snapshot
        if snapshot.current_value is None or snapshot.planned is None:
            reason = f": {snapshot.last_error}" if snapshot.last_error else ""
            raise NotReadyError(
                f"no data yet for target {target_id}{reason}",
                retry_after_seconds=self.settings.refresh_seconds,
            )
        age = self.age(snapshot)
        limit = freshness_limit(self.settings, target.spec)
        outage = snapshot.outage
        # Dry run serves KEDA what a reactive scaler would have: nothing through an outage.
        if outage is not None and outage.path is not None and not self.settings.dry_run:
            return serve_through_outage(
                target, snapshot, self.clock(), age, limit, self.settings.refresh_seconds
            )
        if age > limit:
            reason = f"; last error: {snapshot.last_error}" if snapshot.last_error else ""
            raise NotReadyError(
                f"data for target {target_id} is {age:.0f}s old, over the {limit:.0f}s "
                f"freshness limit{reason}",
                retry_after_seconds=self.settings.refresh_seconds,
            )
        if self.settings.dry_run:
            # The decision stays published (REST, /metrics); KEDA gets the reactive value.
            return replace(snapshot.planned, value=snapshot.planned.current, mode="dry_run")
        return snapshot.planned

    def serving_outage(self, target_id: str) -> PlannedLoad | None:
        """The outage plan the target serves now, if it serves one."""
        try:
            if self.get(target_id).snapshot.outage is None:
                return None
            planned = self.serve(target_id, wait=False)
        except ForecasterError:  # not ready, or dropped meanwhile
            return None
        return planned if planned.mode == "outage" else None

    def is_active(self, target_id: str, *, wait: bool = True) -> bool:
        """Active when the current load or the forecast up to the lead time exceeds the
        activation value, so a workload can wake from zero before its traffic arrives."""
        planned = self.serve(target_id, wait=wait)
        activation = self.get(target_id).spec.activation_value
        peak = max(planned.current, planned.peak_over_lead or 0.0, planned.value)
        return peak > activation

    def touch(self, target_id: str) -> None:
        """Count a read (e.g. KEDA's metrics-api over REST) as activity, so the target stays."""
        self.get(target_id).last_requested = self.clock()

    def predict(
        self, target_id: str, horizon: int, quantiles: Sequence[float]
    ) -> tuple[Snapshot, Forecast]:
        """A forecast of any horizon from the target's current model (never a fit): the model
        is copied under the lock, then predicts outside it."""
        target = self.get(target_id)
        with target.lock:
            snapshot, model = target.snapshot, copy.deepcopy(target.model)
        if model is None:
            raise NotReadyError(
                f"target {target_id} has no fitted model yet",
                retry_after_seconds=self.settings.refresh_seconds,
            )
        return snapshot, model.predict(horizon, quantiles)

    def age(self, snapshot: Snapshot) -> float:
        if snapshot.current_time is None:
            return math.inf
        return max(0.0, self.clock() - snapshot.current_time)

    # -- steering ----------------------------------------------------------------------------

    def refit_now(self, target_id: str) -> None:
        """Make the target's refit due at once: the loop's next pass starts it. A fit already
        in flight counts as that refit."""
        self.get(target_id).next_refit = -math.inf

    def run_refresh(self, target_id: str) -> bool:
        """Refresh the target in the calling thread, as the loop does on its I/O pool: new
        points and the current value, folded in and published. False, doing nothing, while
        a refresh of the target is in flight already."""
        return self._refreshes.run(self.get(target_id))

    def observe(self, target_id: str, points: pd.Series, current: tuple[float, float]) -> None:
        """Fold in grid points and a current value (epoch seconds, value) read elsewhere, and
        publish, as a refresh does with what it reads."""
        target = self.get(target_id)
        with target.lock:
            target.fold_in(points, current, freshness_limit(self.settings, target.spec))

    def _retire(self, target: Target) -> None:
        """A target leaves the registry (idle, or replaced): its saved state goes, and a fit
        landing later saves nothing. Under its lock, so no save can come after the removal."""
        with target.lock:
            target.retired = True
            if self.saver is not None:
                self.saver.forget(target.target_id)

    # -- background work ---------------------------------------------------------------------

    def tick(self) -> None:
        """One pass: drop idle targets, start due refreshes and refits."""
        now = self.clock()
        for target in list(self._targets.values()):
            if not target.configured and now - target.last_requested > self.settings.idle_seconds:
                with self._registry_lock:
                    still_idle = self.clock() - target.last_requested > self.settings.idle_seconds
                    if not still_idle or self._targets.get(target.target_id) is not target:
                        continue
                    del self._targets[target.target_id]
                log.info("dropped target %s: not asked about for %.0fs", target.target_id,
                         now - target.last_requested)
                self._retire(target)
                continue
            if not target.refreshing and now >= target.next_refresh:
                self._refreshes.submit(target)
            if not target.fit_pending and now >= target.next_refit and len(target.buffer):
                self._refits.submit(target)


def spec_changed(target_id: str, old: TriggerSpec, new: TriggerSpec) -> None:
    """Say that a target's trigger changed, which drops its history and model: a takeover
    of the id (two triggers sharing it) shows here first."""
    keys = ", ".join(changed_keys(old, new)) or "no metadata key"
    log.warning("target %s: its trigger changed (%s): query was %s, now %s; starting a new "
                "series without its history and model. Two triggers that share this id "
                "replace each other: give each its own metricName", target_id, keys,
                quoted(old.query), quoted(new.query))


class Refits:
    """Fits on the fit pool, landed in their targets: a fit that fails, or that cannot catch
    up with the newest bins, keeps the target's last good model."""

    def __init__(
        self,
        pool: FitPool,
        settings: EngineSettings,
        *,
        clock: Callable[[], float],
        listener: EngineListener,
        saver: Saver | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.clock = clock
        self.listener = listener
        self.saver = saver
        pool.notify_deaths(listener.fit_worker_died)

    def submit(self, target: Target) -> None:
        """Refit in a worker, unless a fit of the target is in flight."""
        with target.lock:
            if target.fit_pending:  # the loop and a refresh may both ask
                return
            target.fit_pending = True
            request = target.fit_request()
        began = time.perf_counter()
        try:
            future = self.pool.submit(request)
        except Exception as exc:  # the pool is shut down: fail the fit, free the target
            future = Future()
            future.set_exception(exc)
        future.add_done_callback(lambda done: self._landed(target, done, began))

    def _landed(self, target: Target, future: Future[FallbackFit], began: float) -> None:
        seconds = time.perf_counter() - began
        now = self.clock()
        with target.lock:
            target.fit_pending = False
            target.next_refit = now + self.settings.refit_seconds
            try:
                fit = future.result()
            except Exception as exc:  # a worker crash or a model bug: keep the last good model
                target.fit_failures += 1
                self.listener.fit_finished(target.target_id, seconds, False, False)
                target.snapshot = replace(target.snapshot, last_error=f"fit failed: {exc}")
                log.warning("fit of %s failed; keeping the last good model: %s",
                            target.target_id, exc)
                return
            target.fit_seconds = [*target.fit_seconds[-19:], seconds]
            if fit.fell_back:
                target.fallbacks += 1
                log.info("target %s fell back to %s: %s", target.target_id, fit.model.name,
                         "; ".join(f"{m}: {why}" for m, why in fit.failures))
            model = fit.model
            try:
                target.catch_up(model)
            except ForecasterError as exc:
                target.fit_failures += 1
                self.listener.fit_finished(target.target_id, seconds, False, fit.fell_back)
                log.warning("fitted model of %s could not catch up: %s", target.target_id, exc)
                return
            target.fits += 1
            self.pool.fit_landed()
            self.listener.fit_finished(target.target_id, seconds, True, fit.fell_back)
            target.adopt(model, now, freshness_limit(self.settings, target.spec))
            if self.saver is not None:
                try:
                    self.saver.after_refit(target)
                except Exception:  # a model that will not pickle: serve it, unsaved
                    log.exception("saving the state of %s failed", target.target_id)


def restored_refit_due(saved: SavedTarget, now: float, refit_seconds: float) -> float:
    """When a restored target refits: refitInterval after its saved fit, or, when that has
    passed, at a point within the next refitInterval set by a hash of its id, so that
    targets restored together do not all refit at once. No model: at once."""
    fitted_at = saved.live.fitted_at
    if saved.model is None or fitted_at is None:
        return now
    due = fitted_at + refit_seconds
    if due > now:
        return due
    share = zlib.crc32(saved.target_id.encode()) / 2**32
    return now + share * refit_seconds
