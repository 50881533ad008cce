"""The engine's side of the scaler: starts the front process and keeps it supplied.

The front (forecaster.scaler.front) answers KEDA from what this bridge sends it: a trigger
resolved on request (metadata parsed and checked, the target registered, by the same
TargetResolver the REST API uses), and each asked-about target's answer (planned load,
activity, or the reason there is none), pushed whenever it changes. The answer is computed
here by `Engine.serve` and `Engine.is_active`, so freshness, dry-run and activation follow
one rule on every interface. The front reports back which targets were asked about (so
that they are not dropped as idle), how many calls ended with which code, and how many of
them an unexpected error ended.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc

from forecaster.config import Settings
from forecaster.engine import Engine
from forecaster.errors import (
    InsufficientHistoryError,
    InvalidInputError,
    NotReadyError,
    SourceError,
    SourceUnavailableError,
    TooManyTargetsError,
    UnknownTargetError,
)
from forecaster.scaler.messages import (
    ANSWERS,
    FAILED,
    FORGET,
    REPORT,
    RESOLVE,
    RESOLVED,
    SERVE,
    START,
    STOP,
    Answer,
    Failure,
    FrontSettings,
    Trigger,
    unexpected_failure,
)
from forecaster.target import Snapshot, Target, freshness_limit
from forecaster.targets import TargetResolver

log = logging.getLogger(__name__)

PUSH_SECONDS = 0.25  # how often changed answers go to the front; a first value goes at once
HEARTBEAT_SECONDS = 1.0  # an empty push at least this often: the front's sign of life
POLL_SECONDS = 0.05
START_TIMEOUT_SECONDS = 60.0
STALE_AGE_STEP_SECONDS = 10  # a stale answer's age is restated in steps of this many seconds
# The front reports from its event loop every half second; silent for this long, it is wedged
# (alive, socket open, answering nothing) and /healthz says so, for the liveness probe.
FRONT_SILENCE_SECONDS = 10.0


def status_for(exc: Exception) -> grpc.StatusCode | None:
    """Our errors to gRPC codes, in one place; None for any other exception, a bug, which
    `failure_for` answers as unexpected. UNAVAILABLE lets KEDA's `fallback` apply."""
    if isinstance(exc, InvalidInputError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, TooManyTargetsError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    # An unknown target here was just dropped as idle between resolve and read: transient.
    if isinstance(exc, NotReadyError | SourceUnavailableError | SourceError |
                  InsufficientHistoryError | UnknownTargetError):
        return grpc.StatusCode.UNAVAILABLE
    return None


def failure_for(exc: Exception, doing: str) -> Failure:
    """What a caller is told. An unexpected error is logged here with its traceback and
    answered UNAVAILABLE without its text (`unexpected_failure`), so KEDA's fallback applies."""
    code = status_for(exc)
    if code is None:
        log.error("unexpected error %s", doing, exc_info=exc)
        return unexpected_failure(doing)
    return Failure(code.name, str(exc))


@dataclass(slots=True)
class AnswerBasis:
    """What the front's answer for a target was computed from: a change in any of these
    (a new snapshot, the first refresh done, the data growing stale) means a new answer."""

    target: Target
    snapshot: Snapshot
    first_value: bool
    stale_seconds: int | None


class ScalerBridge:
    """The gRPC front process, started, supplied and stopped from the engine's process.

    >>> bridge = ScalerBridge(settings, engine, resolver, on_request=count)  # doctest: +SKIP
    >>> bridge.port; bridge.start(); ...; bridge.stop()                      # doctest: +SKIP

    The constructor starts the process and waits until it has bound its port (a taken port
    raises InvalidInputError naming grpcPort here, unreadable TLS files RuntimeError);
    `start` lets it answer calls. If the front exits on its own, `on_exit` is called: the
    service then stops, so that Kubernetes restarts the pod rather than leave it serving HTTP
    with no scaler. Silent for longer than `front_silence_seconds`, the front is reported
    stuck by `problem`. The front's call counts go to `on_request(method, code, calls)`, and
    those of them that an unexpected error (a bug) ended to `on_unexpected(method, calls)`.
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        resolver: TargetResolver,
        *,
        on_request: Callable[[str, str, int], None],
        on_unexpected: Callable[[str, int], None] | None = None,
        on_exit: Callable[[], None] | None = None,
        front_silence_seconds: float = FRONT_SILENCE_SECONDS,
    ) -> None:
        self.engine = engine
        self.front_silence_seconds = front_silence_seconds
        self.resolver = resolver
        self.on_request = on_request
        self.on_unexpected = on_unexpected or (lambda method, calls: None)
        self.on_exit = on_exit or (lambda: None)
        self._sent: dict[str, AnswerBasis] = {}
        self._heard = time.monotonic()  # when the front last sent anything
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scaler-bridge", daemon=True)
        ours, theirs = socket.socketpair()
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-c", front_command(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
            )
        self._connection = Connection(ours.detach())
        try:
            self._connection.send((START, front_settings(settings)))
            self.port = self._await_ready()
        except BaseException:
            self._end_process(0.0)
            raise

    @property
    def pid(self) -> int:
        """The front process's id."""
        return self._process.pid

    def _await_ready(self) -> int:
        if not self._connection.poll(START_TIMEOUT_SECONDS):
            raise RuntimeError(
                f"the gRPC front process did not start within {START_TIMEOUT_SECONDS:.0f}s"
            )
        try:
            tag, value, *setting = self._connection.recv()
        except EOFError:
            code = self._process.wait(10)
            raise RuntimeError(f"the gRPC front process exited with code {code}") from None
        if tag == FAILED and setting and setting[0]:
            raise InvalidInputError(
                setting[0], f"{value}: choose a free port (--grpc-port, {setting[0]} in the "
                f"config or FORECASTER_GRPC_PORT), or stop what listens there",
            )
        if tag == FAILED:
            raise RuntimeError(value)
        return int(value)

    def start(self) -> None:
        self._connection.send((SERVE,))
        self._heard = time.monotonic()
        self._thread.start()

    def problem(self) -> str | None:
        """Why the front cannot answer KEDA (exited, or silent past front_silence_seconds),
        None while it reports on time. For /healthz: a wedged front needs a restart."""
        if self._process.poll() is not None:
            return f"the gRPC scaler front process exited with code {self._process.returncode}"
        silent = time.monotonic() - self._heard
        limit = self.front_silence_seconds
        if self._thread.is_alive() and silent > limit:
            return (f"the gRPC scaler front process has not reported for {silent:.0f}s "
                    f"(limit {limit:.0f}s): its event loop is stuck")
        return None

    def stop(self, grace_seconds: float = 5.0) -> None:
        """The front reports NOT_SERVING, ends open streams, lets calls in flight finish."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(2)  # it checks the flag every POLL_SECONDS
        self._end_process(grace_seconds)

    def _end_process(self, grace_seconds: float) -> None:
        if self._process.poll() is None:
            try:
                self._connection.send((STOP, grace_seconds))
                self._process.wait(grace_seconds + 5)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait(5)
        self._connection.close()

    # -- the bridge thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except (EOFError, OSError):  # the socket to the front: it has gone
            if not self._stopping.is_set():
                self._front_gone()

    def _serve(self) -> None:
        """Read the front's messages; push changed answers every PUSH_SECONDS, at once when
        a first value arrives, and at least every HEARTBEAT_SECONDS."""
        next_push = last_sent = 0.0
        while not self._stopping.is_set():
            while (not self._wake.is_set() and time.monotonic() < next_push
                   and self._connection.poll(POLL_SECONDS)):
                message = self._connection.recv()
                self._heard = time.monotonic()
                self._guarded(self._handle, message)
            if not self._wake.is_set() and time.monotonic() < next_push:
                continue
            self._wake.clear()
            now = time.monotonic()
            next_push = now + PUSH_SECONDS
            if self._guarded(self._push, now - last_sent >= HEARTBEAT_SECONDS):
                last_sent = now

    def _guarded(self, work: Callable[..., bool | None], *args: Any) -> bool | None:
        """One message's or one push's work: an error in it is logged, not the bridge's end
        (a failed send shows up as the next read's error)."""
        try:
            return work(*args)
        except Exception:
            log.exception("the scaler bridge failed to handle a message or push answers")
            return None

    def _front_gone(self) -> None:
        try:
            code = self._process.wait(10)
        except subprocess.TimeoutExpired:  # its socket closed but it lives on: end it
            self._process.kill()
            code = self._process.wait(10)
        log.error("the gRPC front process exited with code %s; stopping the service", code)
        self.on_exit()

    def _handle(self, message: tuple[Any, ...]) -> None:
        tag = message[0]
        if tag == RESOLVE:
            self._resolve(*message[1:])
        elif tag == REPORT:
            self._report(message[1], message[2], message[3])
        else:
            log.error("unexpected message %r from the gRPC front process", tag)

    def _resolve(
        self, request_id: int, namespace: str, name: str, metadata: dict[str, str]
    ) -> None:
        try:
            target = self.resolver.resolve(namespace, name, metadata)
        except Exception as exc:
            failure = failure_for(exc, "resolving a scaler trigger")
            self._connection.send((RESOLVED, request_id, failure, None))
            return
        spec = target.spec
        trigger = Trigger(target.target_id, spec.effective_metric_name, spec.target_value)
        before = self._sent.get(target.target_id)
        if before is not None and before.target is not target:
            # This trigger replaced the target: other triggers the front cached for the same
            # id (the spec before an edit, say) must be resolved again, not served from cache.
            self._connection.send((FORGET, (target.target_id,)))
        self._sent[target.target_id] = self._basis(target)  # before the answer: none missed
        answer = self._answer(target)
        if not answer.first_value:
            target.when_first_value(self._wake.set)  # sent on the next pass, not in 0.25 s
        self._connection.send((RESOLVED, request_id, trigger, answer))

    def _report(
        self, touched: tuple[str, ...], counts: dict[tuple[str, str], int],
        unexpected: dict[str, int],
    ) -> None:
        for target_id in touched:
            with contextlib.suppress(UnknownTargetError):  # dropped: the next push forgets it
                self.engine.touch(target_id)
        for (method, code), calls in counts.items():
            self.on_request(method, code, calls)
        for method, calls in unexpected.items():
            self.on_unexpected(method, calls)

    def _push(self, heartbeat: bool) -> bool:
        """Send the answers that changed (an empty message too, for a heartbeat); forget
        targets dropped or replaced since. True when something was sent."""
        changed: dict[str, Answer] = {}
        gone: list[str] = []
        for target_id, sent in list(self._sent.items()):
            try:
                target = self.engine.get(target_id)
            except UnknownTargetError:
                target = None
            if target is not sent.target:
                gone.append(target_id)
                del self._sent[target_id]
                continue
            basis = self._basis(target)
            if (basis.snapshot is not sent.snapshot or basis.first_value != sent.first_value
                    or basis.stale_seconds != sent.stale_seconds):
                self._sent[target_id] = basis
                changed[target_id] = self._answer(target)
        if gone:
            self.resolver.forget(set(gone))
            self._connection.send((FORGET, tuple(gone)))
        if changed or heartbeat:
            self._connection.send((ANSWERS, changed))
        return bool(gone or changed or heartbeat)

    def _basis(self, target: Target) -> AnswerBasis:
        snapshot = target.snapshot
        age = self.engine.age(snapshot)
        stale = math.isfinite(age) and age > freshness_limit(self.engine.settings, target.spec)
        step = STALE_AGE_STEP_SECONDS
        return AnswerBasis(target, snapshot, target.first_value.is_set(),
                           int(age // step) * step if stale else None)

    def _answer(self, target: Target) -> Answer:
        first_value = target.first_value.is_set()
        try:
            planned = self.engine.serve(target.target_id, wait=False)
            active = self.engine.is_active(target.target_id, wait=False)
        except Exception as exc:
            return Answer(first_value, failure=failure_for(exc, "reading a target's forecast"))
        return Answer(first_value, planned.value, active)


def front_settings(settings: Settings) -> FrontSettings:
    """The front's share of the service's settings, and the log level this process uses."""
    tls = settings.tls
    return FrontSettings(
        address=f"{settings.host}:{settings.grpc_port}",
        first_value_wait_seconds=settings.engine.first_value_wait_seconds,
        cert_file=tls.cert_file if tls else None,
        key_file=tls.key_file if tls else None,
        client_ca_file=tls.client_ca_file if tls else None,
        log_level=logging.getLogger().getEffectiveLevel(),
        defaults=tuple(settings.defaults.items()),
        configured_target_values=settings.configured_target_values(),
    )


def front_command(fd: int) -> str:
    """The front's entry point as `python -c` code. This package's root is appended to the
    import path, so an installed copy comes first, as it does here, and a checkout works."""
    root = str(Path(__file__).resolve().parents[2])
    return (f"import sys; sys.path.append({root!r}); "
            f"from forecaster.scaler.front import serve_fd; sys.exit(serve_fd({fd}))")
