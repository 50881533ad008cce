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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import replace
from typing import Protocol

import pandas as pd

from forecaster.config import EngineSettings
from forecaster.errors import (
    ForecasterError,
    NotReadyError,
)
from forecaster.fitting import FitPool
from forecaster.models import Forecast
from forecaster.policy import PlannedLoad
from forecaster.refitting import Refits
from forecaster.refreshing import Refreshes
from forecaster.registry import Registry
from forecaster.sources import HistorySource
from forecaster.spec import TriggerSpec
from forecaster.state import SHUTDOWN_SECONDS, SavedTarget, Saver
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
        self.fits = (fit_pool if isinstance(fit_pool, FitPool)
                     else FitPool(settings.fit_workers, executor=fit_pool))
        self._refits = Refits(self.fits, settings, clock=clock, listener=self.listener,
                              saver=saver)
        self._refreshes = Refreshes(settings, self._refits, clock=clock, listener=self.listener,
                                    read_failed=self.fits.memory_freed)
        self.registry = Registry(settings, self._refreshes, clock=clock, listener=self.listener,
                                 saver=saver)
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
        """The target for this id, created (or replaced, when its spec changed) as needed;
        see Registry.ensure."""
        return self.registry.ensure(target_id, spec, source, configured=configured)

    def restore(
        self, saved: SavedTarget, source: HistorySource, *, configured: bool = False
    ) -> Target:
        """Recreate a target from its saved state; see Registry.restore."""
        return self.registry.restore(saved, source, configured=configured)

    def get(self, target_id: str) -> Target:
        return self.registry.get(target_id)

    def targets(self) -> Iterator[Target]:
        return self.registry.targets()

    def __len__(self) -> int:
        return len(self.registry)

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

    # -- background work ---------------------------------------------------------------------

    def tick(self) -> None:
        """One pass: drop idle targets, start due refreshes and refits."""
        now = self.clock()
        for target in self.registry.targets():
            if self.registry.drop_if_idle(target, now):
                self.fits.memory_freed(dropped=True)  # its history and model go back
                continue
            if not target.refreshing and now >= target.next_refresh:
                self._refreshes.submit(target)
            if not target.fit_pending and now >= target.next_refit and len(target.buffer):
                self._refits.submit(target)
