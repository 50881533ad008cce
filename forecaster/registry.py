"""The live targets by id: creation, replacement when a trigger changes, restoring from
saved state, and dropping idle ones."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

from forecaster.config import EngineSettings
from forecaster.errors import TooManyTargetsError, UnknownTargetError
from forecaster.refitting import restored_refit_due
from forecaster.refreshing import Refreshes
from forecaster.sources import HistorySource
from forecaster.spec import TriggerSpec, changed_keys, quoted
from forecaster.state import SavedTarget, Saver, restore
from forecaster.target import Target, freshness_limit

log = logging.getLogger(__name__)


class SpecListener(Protocol):
    """Told when a trigger differs from the config file's, or replaces a target's spec."""

    def spec_conflict(self, target_id: str) -> None: ...

    def spec_changed(self, target_id: str) -> None: ...


class Registry:
    """The targets by id. A new or replaced target's first refresh is submitted before the
    engine's loop can see it, so refreshes of one target never overlap."""

    def __init__(
        self,
        settings: EngineSettings,
        refreshes: Refreshes,
        *,
        clock: Callable[[], float],
        listener: SpecListener,
        saver: Saver | None,
    ) -> None:
        self.settings = settings
        self._refreshes = refreshes
        self.clock = clock
        self.listener = listener
        self.saver = saver
        self._targets: dict[str, Target] = {}
        self._lock = threading.Lock()

    def ensure(
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
        with self._lock:
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
                    self.retire(replaced)  # the old spec's state: never restored
                target = Target(target_id, spec, source, configured=keep, clock=self.clock,
                                created_at=now)
                target.last_requested = now
                if (previous is not None and same_series(previous.spec, spec)
                        and len(previous.buffer) and not previous.resuming):
                    # A setting changed, not the series (targetValue, quantile...): the
                    # history read stays good, and the new target serves from it at once.
                    carry_over(previous, target, freshness_limit(self.settings, spec))
                    target.next_refresh = previous.next_refresh
                    self._refreshes.refits.submit(target)  # its first fit, from that history
                elif (previous is not None
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
        with self._lock:
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

    def drop_if_idle(self, target: Target, now: float) -> bool:
        """Drop a target KEDA has not asked about for idleSeconds (configured ones stay);
        True when it was dropped."""
        idle = self.settings.idle_seconds
        if target.configured or now - target.last_requested <= idle:
            return False
        with self._lock:
            still_idle = self.clock() - target.last_requested > idle
            if not still_idle or self._targets.get(target.target_id) is not target:
                return False
            del self._targets[target.target_id]
        log.info("dropped target %s: not asked about for %.0fs", target.target_id,
                 now - target.last_requested)
        self.retire(target)
        return True

    def retire(self, target: Target) -> None:
        """A target leaves the registry (idle, or replaced): its saved state goes, and a fit
        landing later saves nothing. Under its lock, so no save can come after the removal."""
        with target.lock:
            target.retired = True
            if self.saver is not None:
                self.saver.forget(target.target_id)


def same_series(old: TriggerSpec, new: TriggerSpec) -> bool:
    """Whether two specs read the same history: server, query, step and window."""
    return (old.server_address, old.query, old.step_seconds, old.history_window_seconds) == (
        new.server_address, new.query, new.step_seconds, new.history_window_seconds)


def carry_over(previous: Target, target: Target, freshness: float) -> None:
    """Give a replacement the history and current value its predecessor read, and publish
    its plan from them; before the replacement is visible to other threads."""
    with previous.lock:
        points = previous.buffer.series()
        snapshot = previous.snapshot
    target.buffer.extend(points)
    if snapshot.current_value is not None and snapshot.current_time is not None:
        with target.lock:
            target.publish((snapshot.current_time, snapshot.current_value), freshness)
        target.mark_first_value()


def spec_changed(target_id: str, old: TriggerSpec, new: TriggerSpec) -> None:
    """Say that a target's trigger changed, which drops its history and model: a takeover
    of the id (two triggers sharing it) shows here first."""
    keys = ", ".join(changed_keys(old, new)) or "no metadata key"
    log.warning("target %s: its trigger changed (%s): query was %s, now %s; starting a new "
                "series without its history and model. Two triggers that share this id "
                "replace each other: give each its own metricName", target_id, keys,
                quoted(old.query), quoted(new.query))
