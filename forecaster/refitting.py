"""Refits on the fit pool, landed in their targets, and when a restored target refits.

A fit that fails, or that cannot catch up with the newest bins, keeps the target's last good
model; a fit that lands is saved (forecaster.state) when the service keeps state.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from typing import Protocol

from forecaster.config import EngineSettings
from forecaster.errors import ForecasterError
from forecaster.fitting import FitPool, FitRequest
from forecaster.models import FallbackFit
from forecaster.state import SavedTarget, Saver
from forecaster.target import Target, freshness_limit

log = logging.getLogger(__name__)


class FitListener(Protocol):
    """Told of each fit as it lands and of each fit worker's death."""

    def fit_finished(self, target_id: str, seconds: float, ok: bool, fell_back: bool) -> None: ...

    def fit_worker_died(self, cause: str) -> None: ...


class Refits:
    """Fits on the fit pool, landed in their targets: a fit that fails, or that cannot catch
    up with the newest bins, keeps the target's last good model."""

    def __init__(
        self,
        pool: FitPool,
        settings: EngineSettings,
        *,
        clock: Callable[[], float],
        listener: FitListener,
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
            first = target.model is None  # it serves no forecast of its own: it goes first

        def request() -> FitRequest:  # built when a worker is free: see FitPool.submit
            with target.lock:
                return target.fit_request()

        began = time.perf_counter()
        try:
            future = self.pool.submit(request, first=first)
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
                log.warning("target %s fell back to %s: %s", target.target_id, fit.model.name,
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
