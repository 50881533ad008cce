"""Saved state: each target's fitted model and live state on disk, so a restart serves
forecasts from the saved models instead of fitting every target again.

Two files per target, named by a hash of its id: `<hash>.model`, the pickled fitted model
(its selection and calibration inside it), written after each refit; and `<hash>.live`, the
spec, plan smoothing, SLO controller, accuracy and the newest bin they have seen, written
after each refit and, at shutdown, for the targets changed since their last save (with the
model again when it has taken new bins since its save, so a restart has fewer to replay). The live
file names the model file it goes with by a token, so a model from one refit is never
paired with the live state of another. Each file is one JSON header line (format number,
forecaster's version, kind, target id, token, the payload's SHA-256) and a pickle. A write
goes to a temporary file in the same directory, is flushed to disk, then renamed over the
old one: a reader sees the old file or the new one, never half of one.

A file from another version, a corrupt one, or a pair that does not match is refused:
logged, counted, removed, and its target fits again as a new one would. So is a target the
service can no longer take as saved: its server unconfigured, past maxTargets, or its spec
over the targetMemoryBytes budget.

Trust: unpickling runs code the file names, so only forecaster may write the directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pandas as pd

from forecaster import __version__
from forecaster.errors import InvalidInputError
from forecaster.models import ForecastModel
from forecaster.policy import ForecastSmoother
from forecaster.spec import TriggerSpec
from forecaster.target import AccuracyKeeper, ShareKeeper, Target

log = logging.getLogger(__name__)

FORMAT = 1  # bumped when the files' layout changes; another number is refused as "version"
MODEL_SUFFIX = ".model"
LIVE_SUFFIX = ".live"
TEMP_PREFIX = ".tmp-"
SHUTDOWN_SECONDS = 5.0  # the most a shutdown spends writing the unsaved targets
SHUTDOWN_WRITERS = 8  # threads writing at shutdown: see Saver.close
MAX_HEADER_BYTES = 4096
REFUSAL_REASONS = ("version", "corrupt", "server", "limit", "memory")

T = TypeVar("T")


class StateListener(Protocol):
    """Told of each save and each refused file (the service's metrics implement this)."""

    def state_saved(self, ok: bool) -> None: ...

    def state_refused(self, reason: str) -> None: ...


class _NoListener:
    def state_saved(self, ok: bool) -> None:
        pass

    def state_refused(self, reason: str) -> None:
        pass


class Refused(Exception):
    """A saved file that cannot be used: `reason` is one of REFUSAL_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class LiveState:
    """What a target keeps between refits, beside its model; pickled as the live file."""

    target_id: str
    spec: TriggerSpec
    configured: bool
    fitted_at: float | None
    model_name: str | None
    model_token: str | None  # the model file this state goes with; None: no model
    smoother: ForecastSmoother
    share_keeper: ShareKeeper | None
    scores: AccuracyKeeper
    seen_through: pd.Timestamp | None  # the newest bin the keeper and accuracy have seen
    saved_at: float


@dataclass
class SavedTarget:
    """A target as loaded: its live state and, when it had one, its fitted model."""

    live: LiveState
    model: ForecastModel | None = None

    @property
    def target_id(self) -> str:
        return self.live.target_id

    @property
    def spec(self) -> TriggerSpec:
        return self.live.spec


@dataclass
class Capture:
    """One target's state, pickled under its lock, to be written outside it."""

    target: Target
    live: bytes
    token: str | None
    model: bytes | None = None  # a new model file, after a refit


def file_stem(target_id: str) -> str:
    """The files' name for a target: a hash, since an id holds slashes."""
    return hashlib.sha256(target_id.encode()).hexdigest()[:32]


def capture(target: Target, *, with_model: bool, clock: Callable[[], float]) -> Capture:
    """The target's state as bytes; under its lock, so that the copy is consistent. With
    `with_model`, the model too, under a new token (after a refit, and at shutdown when the
    model has taken new bins since its last save)."""
    model = target.model
    token = target.model_token if model is not None else None
    model_bytes = None
    if with_model and model is not None:
        token = uuid.uuid4().hex
        model_bytes = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
        target.model_token = token
        target.model_saved_through = model.last_timestamp_
    snapshot = target.snapshot
    live = LiveState(
        target_id=target.target_id,
        spec=target.spec,
        configured=target.configured,
        fitted_at=snapshot.fitted_at if model is not None else None,
        model_name=snapshot.model if model is not None else None,
        model_token=token,
        smoother=target.smoother,
        share_keeper=target.share_keeper,
        scores=target.scores,
        seen_through=target.resumed_through if target.resuming else target.buffer.last,
        saved_at=clock(),
    )
    target.unsaved = False
    return Capture(target, pickle.dumps(live, protocol=pickle.HIGHEST_PROTOCOL), token,
                   model_bytes)


def restore(target: Target, saved: SavedTarget) -> None:
    """Give a new target its saved state; it resumes at its first refresh (Target.fold_in)."""
    live = saved.live
    target.smoother = live.smoother
    target.share_keeper = live.share_keeper
    target.scores = live.scores
    # The first refresh brings the model, the keeper and the scores up to date (fold_in).
    model = saved.model
    target.resuming = True
    target.resumed_through = live.seen_through
    target.model = model
    target.model_token = live.model_token if model is not None else None
    target.model_saved_through = model.last_timestamp_ if model is not None else None
    target.restored = model is not None
    target.unsaved = False
    if model is not None:
        target.snapshot = replace(target.snapshot, fitted_at=live.fitted_at,
                                  model=live.model_name)


class StateStore:
    """The state directory: atomic writes, loading, refusals and removal.

    >>> store = StateStore.open(Path("/var/lib/forecaster"), "stateDir")   # doctest: +SKIP
    >>> for saved in store.load(): ...                                     # doctest: +SKIP
    """

    def __init__(
        self, directory: Path, *, listener: StateListener | None = None,
        version: str = __version__,
    ) -> None:
        self.directory = directory
        self.listener: StateListener = listener or _NoListener()
        self.version = version

    @classmethod
    def open(cls, directory: Path, setting: str, **kwargs: Any) -> StateStore:
        """The store for `directory`, created if missing; InvalidInputError naming `setting`
        when it cannot be created or written."""
        check_directory(directory, setting)
        return cls(directory, **kwargs)

    # -- writing -----------------------------------------------------------------------------

    def write(self, item: Capture) -> bool:
        """Write a capture's files (the model first: the live file names it); True when all
        were written. A failure is logged and counted, never raised."""
        stem = file_stem(item.target.target_id)
        try:
            if item.model is not None:
                self._write_file(stem + MODEL_SUFFIX, "model", item.target.target_id,
                                 item.token, item.model)
            self._write_file(stem + LIVE_SUFFIX, "live", item.target.target_id,
                             item.token, item.live)
        except OSError as exc:
            log.warning("saving the state of %s in %s failed: %s", item.target.target_id,
                        self.directory, exc)
            if item.model is not None and item.target.model_token == item.token:
                item.target.model_token = None  # the model on disk is not this one
            item.target.unsaved = True  # tried again at the next save or at shutdown
            self.listener.state_saved(False)
            return False
        self.listener.state_saved(True)
        return True

    def _write_file(self, name: str, kind: str, target_id: str, token: str | None,
                    payload: bytes) -> None:
        header = {
            "format": FORMAT, "version": self.version, "kind": kind, "target": target_id,
            "token": token, "sha256": hashlib.sha256(payload).hexdigest(),
        }
        temp = self.directory / f"{TEMP_PREFIX}{name}.{uuid.uuid4().hex[:8]}"
        try:
            with open(temp, "wb") as out:
                out.write(json.dumps(header).encode() + b"\n")
                out.write(payload)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, self.directory / name)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        self._sync_directory()

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, target_id: str) -> None:
        """Remove a target's files (dropped, replaced, or refused)."""
        stem = file_stem(target_id)
        for suffix in (MODEL_SUFFIX, LIVE_SUFFIX):
            try:
                (self.directory / (stem + suffix)).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("removing the saved state of %s failed: %s", target_id, exc)

    # -- loading -----------------------------------------------------------------------------

    def saved_count(self) -> int:
        """How many targets have a live file (what load() will try)."""
        return sum(1 for _ in self._live_files())

    def load(self) -> Iterator[SavedTarget]:
        """Each usable saved target; every refused file is logged, counted and removed, and
        leftover temporary files and model files without a live file go too."""
        wanted: set[str] = set()
        for path in self._live_files():
            stem = path.name[: -len(LIVE_SUFFIX)]
            try:
                saved = self._load_one(path, stem)
            except Refused as exc:
                self.refuse(None, exc.reason, f"{path.name}: {exc}", stem=stem)
                continue
            except Exception as exc:  # whatever a file holds, loading never stops the start
                self.refuse(None, "corrupt", f"{path.name}: {exc!r}", stem=stem)
                continue
            if saved.live.model_token is not None:
                wanted.add(stem)
            yield saved
        for path in self._entries():
            name = path.name
            orphan = name.endswith(MODEL_SUFFIX) and name[: -len(MODEL_SUFFIX)] not in wanted
            if name.startswith(TEMP_PREFIX) or orphan:
                with contextlib.suppress(OSError):
                    path.unlink()

    def read(self, target_id: str) -> SavedTarget:
        """One target's saved state, changing nothing on disk; Refused when it has none or
        its files cannot be used."""
        stem = file_stem(target_id)
        return self._load_one(self.directory / (stem + LIVE_SUFFIX), stem)

    def refuse(self, target_id: str | None, reason: str, message: str, *,
               stem: str | None = None) -> None:
        """Log, count and remove a saved target that cannot be used; it fits anew."""
        log.warning("saved state refused (%s) in %s: %s; the target fits again as a new "
                    "one", reason, self.directory, message)
        self.listener.state_refused(reason)
        stem = stem or file_stem(target_id or "")
        for suffix in (MODEL_SUFFIX, LIVE_SUFFIX):
            with contextlib.suppress(OSError):
                (self.directory / (stem + suffix)).unlink(missing_ok=True)

    def _entries(self) -> list[Path]:
        try:
            return list(self.directory.iterdir())
        except OSError as exc:
            log.warning("cannot list the state directory %s: %s", self.directory, exc)
            return []

    def _live_files(self) -> Iterator[Path]:
        return (p for p in sorted(self._entries()) if p.name.endswith(LIVE_SUFFIX)
                and not p.name.startswith(TEMP_PREFIX))

    def _load_one(self, path: Path, stem: str) -> SavedTarget:
        header, payload = self._read(path, "live")
        live = _unpickle(payload, LiveState, path)
        if header.get("target") != live.target_id or file_stem(live.target_id) != stem:
            raise Refused("corrupt", "the file is not under its target's name")
        if header.get("token") != live.model_token:
            raise Refused("corrupt", "the header's model token differs from the state's")
        kinds = (
            (live.spec, TriggerSpec), (live.smoother, ForecastSmoother),
            (live.scores, AccuracyKeeper),
            (live.share_keeper, ShareKeeper | None),
        )
        wrong = [type(value).__name__ for value, kind in kinds if not isinstance(value, kind)]
        if wrong:
            raise Refused("corrupt", f"its state holds the wrong kinds: {', '.join(wrong)}")
        if live.model_token is None:
            return SavedTarget(live)
        model_path = path.with_name(stem + MODEL_SUFFIX)
        if not model_path.exists():
            raise Refused("corrupt", f"its model file {model_path.name} is missing")
        model_header, model_payload = self._read(model_path, "model")
        if model_header.get("token") != live.model_token:
            raise Refused("corrupt", "the model file is from another refit than the state")
        model = _unpickle(model_payload, ForecastModel, model_path)  # type: ignore[type-abstract]
        return SavedTarget(live, model)

    def _read(self, path: Path, kind: str) -> tuple[dict[str, Any], bytes]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise Refused("corrupt", f"cannot read it: {exc.strerror}") from exc
        line, newline, payload = data.partition(b"\n")
        if not newline or len(line) > MAX_HEADER_BYTES:
            raise Refused("corrupt", "it has no header line")
        try:
            header = json.loads(line)
        except ValueError:
            raise Refused("corrupt", "its header is not JSON") from None
        if not isinstance(header, dict):
            raise Refused("corrupt", "its header is not a JSON object")
        if header.get("format") != FORMAT or header.get("version") != self.version:
            raise Refused(
                "version",
                f"written by forecaster {header.get('version')!r} in format "
                f"{header.get('format')!r}; this is {self.version!r} in format {FORMAT}",
            )
        if header.get("kind") != kind:
            raise Refused("corrupt", f"its header says {header.get('kind')!r}, not {kind!r}")
        if header.get("sha256") != hashlib.sha256(payload).hexdigest():
            raise Refused("corrupt", "its payload does not match its checksum (truncated?)")
        return header, payload


def _unpickle(payload: bytes, kind: type[T], path: Path) -> T:
    try:
        value = pickle.loads(payload)
    except Exception as exc:  # any error unpickling: a class that moved, a bad byte
        raise Refused("corrupt", f"cannot unpickle it: {type(exc).__name__}: {exc}") from exc
    if not isinstance(value, kind):
        raise Refused("corrupt", f"it holds a {type(value).__name__}, not a {kind.__name__}")
    return value


def check_directory(directory: Path, setting: str) -> None:
    """Create the directory if missing and prove it writable; InvalidInputError naming
    `setting` otherwise."""
    probe = directory / f"{TEMP_PREFIX}probe-{os.getpid()}"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(probe, "wb") as out:
            out.write(b"probe")
            os.fsync(out.fileno())
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InvalidInputError(
            setting,
            f"cannot use {str(directory)!r} as the state directory ({reason}); give a "
            f"directory forecaster may create and write, or leave it unset to keep no state",
        ) from None


class Saver:
    """Writes captures and removals in order on a thread of its own, so that a refit never
    waits on the disk; at shutdown, writes what is left and the unsaved targets within a
    deadline.

    >>> saver = Saver(store)                                     # doctest: +SKIP
    >>> saver.after_refit(target)   # under the target's lock    # doctest: +SKIP
    >>> saver.close(engine.targets(), SHUTDOWN_SECONDS)          # doctest: +SKIP
    """

    def __init__(self, store: StateStore, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._queue: deque[Capture | str] = deque()  # a str: remove that target's files
        self._ready = threading.Condition()
        self._closed = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="state-saver", daemon=True)
        self._thread.start()

    def after_refit(self, target: Target) -> None:
        """Save a target whose refit just landed; call under its lock."""
        if not target.retired:
            self._put(capture(target, with_model=True, clock=self.clock))

    def forget(self, target_id: str) -> None:
        """Remove a target's files (dropped as idle, or replaced by a new spec)."""
        self._put(target_id)

    def _put(self, item: Capture | str) -> None:
        with self._ready:
            if self._closed:
                return
            self._queue.append(item)
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return
                item = self._queue.popleft()
                self._busy = True
            try:
                self._do(item)
            except Exception:  # the saver must outlive any one bad item
                log.exception("saving state failed unexpectedly")
            finally:
                with self._ready:
                    self._busy = False
                    self._ready.notify_all()

    def _do(self, item: Capture | str) -> None:
        if isinstance(item, str):
            self.store.remove(item)
        else:
            self.store.write(item)

    def idle(self) -> bool:
        """Nothing queued and nothing being written."""
        with self._ready:
            return not self._queue and not self._busy

    def close(self, targets: Iterable[Target], seconds: float = SHUTDOWN_SECONDS) -> int:
        """Stop the thread, then write what was queued and each target changed since its last
        save (its model too when it took new bins since), for at most `seconds`; returns how
        many targets were saved. Those left when
        the time is up are logged with their count (they restart from their last save).

        The writes run on SHUTDOWN_WRITERS threads, each target's in order: a file's fsync
        waits on the disk, and concurrent ones share the filesystem's journal commits."""
        deadline = time.monotonic() + seconds
        with self._ready:
            self._closed = True
            self._ready.notify_all()
            while self._busy and time.monotonic() < deadline:
                self._ready.wait(max(0.0, deadline - time.monotonic()))
            queued = list(self._queue)
            self._queue.clear()
        work: dict[str, list[Capture | str | Target]] = {}
        for item in [*queued, *targets]:
            tid = item if isinstance(item, str) else (
                item.target.target_id if isinstance(item, Capture) else item.target_id)
            work.setdefault(tid, []).append(item)
        saved, left = 0, 0
        lock = threading.Lock()

        def run(items: list[Capture | str | Target]) -> None:
            nonlocal saved, left
            for position, item in enumerate(items):
                if time.monotonic() >= deadline:
                    with lock:
                        left += 1 if any(not isinstance(i, Target) or i.unsaved
                                         for i in items[position:]) else 0
                    return
                done = (self._capture_unsaved(item, deadline) if isinstance(item, Target)
                        else item)
                if done is not None:
                    self._do(done)
                    if isinstance(done, Capture):
                        with lock:
                            saved += 1

        with ThreadPoolExecutor(SHUTDOWN_WRITERS, thread_name_prefix="state-shutdown") as pool:
            list(pool.map(run, work.values()))
        if left:
            log.warning("shutdown: %d saves left unwritten after %.1fs; those targets "
                        "restart from their last save", left, seconds)
        return saved

    def _capture_unsaved(self, target: Target, deadline: float) -> Capture | None:
        """A target's live state if it changed since its last save, None if not (or if its
        lock stays held past the deadline)."""
        if not target.unsaved:
            return None
        if not target.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return None
        try:
            # A model saved at its refit has taken the bins since: saving it again (0.25 ms
            # to pickle an `auto` model) spares the restart their updates (3.6 ms a bin).
            model = target.model
            advanced = model is not None and model.last_timestamp_ != target.model_saved_through
            return capture(target, with_model=advanced, clock=self.clock)
        finally:
            target.lock.release()
