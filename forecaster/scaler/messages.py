"""What the scaler's front process and the engine's process say to each other.

The front (`forecaster.scaler.front`) answers KEDA; the engine's process holds the targets and
their models. They share one socket pair, over which each message is a tuple whose first item
is one of the tags below. The payloads are the small frozen records here, cheap to pickle.
This module imports nothing heavy: the front process loads it, and stays small.
"""

from __future__ import annotations

from dataclasses import dataclass

from forecaster.logs import FRONT_LOG_FORMAT

STREAM_CHECK_SECONDS = 5.0  # how often an open StreamIsActive looks for a change
ENGINE_SILENCE_SECONDS = 10.0  # the engine's process unheard for longer: answers UNAVAILABLE

# engine -> front
START = "start"  # (START, FrontSettings): the first message; the front binds its port
SERVE = "serve"  # (SERVE,): start answering calls
RESOLVED = "resolved"  # (RESOLVED, request_id, Trigger | Failure, Answer | None)
ANSWERS = "answers"  # (ANSWERS, {target_id: Answer}): answers that changed (or none, at
# least once a second: the front takes silence for a stalled engine, see ENGINE_SILENCE_SECONDS)
FORGET = "forget"  # (FORGET, (target_id, ...)): dropped or replaced targets
STOP = "stop"  # (STOP, grace_seconds): shut down gracefully, then exit

# front -> engine
READY = "ready"  # (READY, port): bound; waiting for SERVE
FAILED = "failed"  # (FAILED, message, setting | None): could not bind; the setting to change
# ("grpcPort") when the port is taken, None otherwise (unreadable TLS files)
RESOLVE = "resolve"  # (RESOLVE, request_id, namespace, name, metadata)
REPORT = "report"  # (REPORT, (target_id, ...), {(method, code): calls}, {method: calls}):
# asked-about targets, finished calls, and those of them that ended in an unexpected error


@dataclass(frozen=True, slots=True)
class Failure:
    """A call's failure: a gRPC status code's name and a message for the caller; `unexpected`
    when a bug caused it (see `unexpected_failure`), so that the front counts it apart."""

    code: str
    message: str
    unexpected: bool = False


def unexpected_failure(doing: str) -> Failure:
    """What a caller is told of an exception that is none of forecaster's own errors (a bug,
    logged with its traceback where it happened): UNAVAILABLE, which KEDA takes for transient,
    so its fallback applies; the exception's own text stays in the log."""
    return Failure("UNAVAILABLE", f"unexpected error {doing}; see the forecaster logs",
                   unexpected=True)


class FailedCall(Exception):
    """Raised in the front to end a call with `failure`'s status and message."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


@dataclass(frozen=True, slots=True)
class Trigger:
    """A resolved trigger: the target it maps to, and what GetMetricSpec reports."""

    target_id: str
    metric_name: str
    target_value: float


@dataclass(frozen=True, slots=True)
class Answer:
    """What a scaler call about one target gets now: the planned load and activity, or why
    there is none. `first_value` is False until the target's first refresh is done, which a
    new target's first call waits for."""

    first_value: bool
    value: float | None = None
    active: bool = False
    failure: Failure | None = None


@dataclass(frozen=True, slots=True)
class FrontSettings:
    """How the front serves: address, TLS files, waits; from the service's settings."""

    address: str
    first_value_wait_seconds: float
    stream_check_seconds: float = STREAM_CHECK_SECONDS
    engine_silence_seconds: float = ENGINE_SILENCE_SECONDS
    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    max_concurrent_rpcs: int = 4096
    # The config's trigger metadata defaults: GetMetricSpec names a metric as the engine does.
    defaults: tuple[tuple[str, str], ...] = ()
    # (target id, targetValue) of each target the config lists: its spec wins over a trigger
    # that lands on it, so GetMetricSpec gives the HPA the targetValue the plan is made for.
    configured_target_values: tuple[tuple[str, float], ...] = ()
    log_level: int = 20
    log_format: str = FRONT_LOG_FORMAT
