"""KEDA's ExternalScaler service: the planned load as the metric, forecast-aware activity.

Replica bounds and scale-down behaviour belong to the ScaledObject; this service serves the
load to plan for and the HPA turns it into replicas (targetSizeFloat = targetValue).

It runs in the scaler's front process, on the gRPC server's event loop. GetMetricSpec answers
from the trigger's metadata alone: KEDA's fallback counts only GetMetrics and IsActive errors,
and a failed GetMetricSpec leaves the HPA without a metric. GetMetrics and IsActive look up the
trigger (resolved once by the engine's process, then cached) and the target's latest answer,
which the engine's process pushes as it changes. A call about a known target with an answer
ready is answered without suspending the call, from caches keyed by the ref's deterministic
serialization, and with a response built once per answer: the front is CPU-bound at 2,000
calls/s, so what a call costs beyond the gRPC framework queues every other call. Any other
call takes the full path, which says why it cannot be answered or waits. The one wait, for
a new target's first value, is a future the next answer resolves, bounded by the call's
deadline, so it never holds up other calls.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import grpc
from grpc import aio

from forecaster.errors import InvalidInputError
from forecaster.scaler.board import Board
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.scaler.messages import (
    ENGINE_SILENCE_SECONDS,
    STREAM_CHECK_SECONDS,
    Answer,
    FailedCall,
    Failure,
    Trigger,
    unexpected_failure,
)
from forecaster.spec import MetricSpec, metric_spec, target_id

log = logging.getLogger(__name__)

# Left of a call's deadline to answer in: a wait that ends then still reports its reason.
DEADLINE_MARGIN_SECONDS = 0.2
METRIC_SPEC_CACHE_SIZE = 20_000
INT64_MAX = 2**63 - 1
# KEDA 2.5-2.6 send GetMetrics the name with its trigger index: "s0-<name>".
_INDEX_PREFIX = re.compile(r"s[0-9]+-")
_ACTIVE, _INACTIVE = pb.IsActiveResponse(result=True), pb.IsActiveResponse(result=False)


@dataclass(slots=True)
class _Known:
    """What one ref always gets from GetMetricSpec, and the last GetMetrics response with the
    answer it was built from."""

    spec: MetricSpec
    spec_response: pb.GetMetricSpecResponse
    answer: Answer | None = None
    metrics: pb.GetMetricsResponse | None = None

    def metrics_for(self, answer: Answer) -> pb.GetMetricsResponse:
        """The GetMetrics response for `answer`, built once per answer the engine sends."""
        if answer is not self.answer or self.metrics is None:
            assert answer.value is not None  # an answer without a failure has a value
            value = pb.MetricValue(metricName=self.spec.metric_name,
                                   metricValue=_whole(answer.value),
                                   metricValueFloat=answer.value)
            self.answer, self.metrics = answer, pb.GetMetricsResponse(metricValues=[value])
        return self.metrics


def ref_key(ref: pb.ScaledObjectRef) -> bytes:
    """The ref's deterministic serialization (map entries sorted): equal for equal refs
    whatever the order KEDA's client sent its metadata in, and cheaper than a frozenset."""
    return ref.SerializeToString(deterministic=True)


class ExternalScaler(pb_grpc.ExternalScalerServicer):
    """The gRPC servicer; every method resolves the ScaledObjectRef, then reads an answer."""

    def __init__(
        self,
        board: Board,
        *,
        first_value_wait_seconds: float,
        stream_check_seconds: float = STREAM_CHECK_SECONDS,
        engine_silence_seconds: float = ENGINE_SILENCE_SECONDS,
        defaults: Mapping[str, str] | None = None,
        configured_target_values: Mapping[str, float] | None = None,
    ) -> None:
        self.board = board
        self.defaults = dict(defaults or {})
        self.configured_target_values = dict(configured_target_values or {})
        self._known: dict[bytes, _Known] = {}  # by ref_key
        self.first_value_wait_seconds = first_value_wait_seconds
        self.stream_check_seconds = stream_check_seconds
        self.engine_silence_seconds = engine_silence_seconds
        self.stopping = threading.Event()  # set by stop_streams: open streams end
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called on the server's loop before it serves: where stop_streams sends its wake-up."""
        self._loop, self._wake = loop, asyncio.Event()
        self.board.bind(loop)

    def stop_streams(self) -> None:
        """End every open StreamIsActive and first-value wait (from any thread)."""
        self.stopping.set()
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _until_stopped(self, timeout: float, *also: asyncio.Future[None]) -> None:
        """Wait `timeout` seconds, less if the server stops or one of `also` completes."""
        if self._wake is None:
            self.bind(asyncio.get_running_loop())
        assert self._wake is not None
        stopped = asyncio.ensure_future(self._wake.wait())
        waiters: set[asyncio.Future[Any]] = {stopped, *also}
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()

    async def _abort(self, method: str, context: aio.ServicerContext, exc: Exception) -> NoReturn:
        """End the call with the failure's status. Any other exception is a bug: logged with
        its traceback and answered UNAVAILABLE (KEDA's fallback applies) without its text.
        An unexpected error is counted apart, whichever process it happened in."""
        if isinstance(exc, FailedCall):
            failure = exc.failure
        else:
            log.error("unexpected error in %s", method, exc_info=exc)
            failure = unexpected_failure(f"in {method}")
        if failure.unexpected:
            self.board.count_unexpected(method)
        self.board.count(method, failure.code)
        await context.abort(grpc.StatusCode[failure.code], failure.message)
        raise AssertionError("context.abort returned")  # pragma: no cover

    def _metric_spec(self, key: bytes, ref: pb.ScaledObjectRef) -> _Known:
        """The metric's name and target from the metadata alone (and the config's targets);
        cached, as KEDA repeats it."""
        found = self._known.get(key)
        if found is None:
            try:
                spec = self._configured(ref, metric_spec(dict(ref.scalerMetadata), self.defaults))
            except InvalidInputError as exc:
                raise FailedCall(Failure("INVALID_ARGUMENT", str(exc))) from None
            value = spec.target_value
            response = pb.GetMetricSpecResponse(metricSpecs=[pb.MetricSpec(
                metricName=spec.metric_name, targetSize=_whole(value), targetSizeFloat=value
            )])
            if len(self._known) >= METRIC_SPEC_CACHE_SIZE:
                del self._known[next(iter(self._known))]  # the oldest
            found = self._known[key] = _Known(spec, response)
        return found

    def _configured(self, ref: pb.ScaledObjectRef, spec: MetricSpec) -> MetricSpec:
        """A trigger that lands on a target the config lists is planned with the config's
        spec, so the HPA must divide by the config's targetValue too."""
        listed = self.configured_target_values.get(
            target_id(ref.namespace, ref.name, spec.metric_name)
        )
        if listed is None or listed == spec.target_value:
            return spec
        log.warning("trigger %s/%s asks targetValue %g for metric %s; the config lists %g "
                    "for it, which the HPA is given", ref.namespace, ref.name,
                    spec.target_value, spec.metric_name, listed)
        return replace(spec, target_value=listed)

    def _ready(self, key: bytes) -> Answer | None:
        """The answer for a ref whose trigger is known, when the call can have it at once:
        the engine heard from lately, the first value in, no failure. None sends the call
        the full way (`_trigger`, `_answer`), which says why not or waits."""
        trigger = self.board.known(key)  # also keeps the target from going idle
        if trigger is None or self.board.silent_for() > self.engine_silence_seconds:
            return None
        answer = self.board.answer(trigger.target_id)
        if answer is None or not answer.first_value or answer.failure is not None:
            return None
        return answer

    async def _trigger(
        self, key: bytes, ref: pb.ScaledObjectRef, context: aio.ServicerContext
    ) -> Trigger:
        return await self.board.trigger(
            ref.namespace, ref.name, dict(ref.scalerMetadata), key=key,
            timeout=_time_left(context),
        )

    async def _answer(self, target_id: str, context: aio.ServicerContext) -> Answer:
        """The target's answer. A target new to the engine has none until its first refresh:
        wait for it (bounded by the first-value wait, cut short by a stop) without blocking.
        An engine that has gone silent may be stalled: its last answers are not trusted."""
        silent = self.board.silent_for()
        if silent > self.engine_silence_seconds:
            raise FailedCall(Failure(
                "UNAVAILABLE", f"the forecaster engine has not been heard from for {silent:.0f}s"
            ))
        loop = asyncio.get_running_loop()
        wait = self.first_value_wait_seconds
        left = _time_left(context)
        deadline = loop.time() + (wait if left is None else min(wait, left))
        answer = self.board.answer(target_id)
        while answer is not None and not answer.first_value:
            remaining = deadline - loop.time()
            if remaining <= 0 or self.stopping.is_set():
                break
            changed = self.board.changed(target_id)
            await self._until_stopped(remaining, changed)
            changed.cancel()
            answer = self.board.answer(target_id)
        if answer is None:  # a resolved trigger always comes with one: it was forgotten since
            raise FailedCall(Failure(
                "UNAVAILABLE",
                f"target {target_id} was dropped or replaced just now; the next call "
                "registers it again",
            ))
        if answer.failure is not None:
            raise FailedCall(answer.failure)
        return answer

    async def GetMetricSpec(
        self, request: pb.ScaledObjectRef, context: aio.ServicerContext
    ) -> pb.GetMetricSpecResponse:
        try:
            found = self._metric_spec(ref_key(request), request)
        except Exception as exc:
            await self._abort("GetMetricSpec", context, exc)
        self.board.count("GetMetricSpec", "OK")
        return found.spec_response

    async def StreamMetricSpec(
        self, request: pb.ScaledObjectRef, context: aio.ServicerContext
    ) -> AsyncIterator[pb.GetMetricSpecResponse]:
        """Not offered: KEDA then polls GetMetricSpec, which is what this scaler expects."""
        self.board.count("StreamMetricSpec", "UNIMPLEMENTED")
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "StreamMetricSpec is not offered: the metric spec comes from GetMetricSpec",
        )
        yield pb.GetMetricSpecResponse()  # pragma: no cover: makes this an async generator

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: aio.ServicerContext
    ) -> pb.GetMetricsResponse:
        try:
            ref = request.scaledObjectRef
            key = ref_key(ref)
            known = self._metric_spec(key, ref)
            name, asked = known.spec.metric_name, request.metricName
            if asked and asked != name and _INDEX_PREFIX.sub("", asked, count=1) != name:
                raise FailedCall(Failure(
                    "INVALID_ARGUMENT",
                    f"metricName: {asked!r} is not this trigger's metric; "
                    f"GetMetricSpec named it {name!r}",
                ))
            response = known.metrics_for(await self._current(key, ref, context))
        except Exception as exc:
            await self._abort("GetMetrics", context, exc)
        self.board.count("GetMetrics", "OK")
        return response

    async def _current(
        self, key: bytes, ref: pb.ScaledObjectRef, context: aio.ServicerContext
    ) -> Answer:
        """The target's answer: at once when it is ready (`_ready`), else the full way, which
        resolves the trigger (keeping the target from idling) and says why not or waits."""
        answer = self._ready(key)
        if answer is None:
            trigger = await self._trigger(key, ref, context)
            answer = await self._answer(trigger.target_id, context)
        return answer

    async def _is_active(
        self, key: bytes, request: pb.ScaledObjectRef, context: aio.ServicerContext
    ) -> bool:
        return (await self._current(key, request, context)).active

    async def IsActive(
        self, request: pb.ScaledObjectRef, context: aio.ServicerContext
    ) -> pb.IsActiveResponse:
        try:
            active = await self._is_active(ref_key(request), request, context)
        except Exception as exc:
            await self._abort("IsActive", context, exc)
        self.board.count("IsActive", "OK")
        return _ACTIVE if active else _INACTIVE

    async def StreamIsActive(
        self, request: pb.ScaledObjectRef, context: aio.ServicerContext
    ) -> AsyncIterator[pb.IsActiveResponse]:
        """Send the state at once, then on each change (checked every few seconds); end when
        the client goes away (the call is cancelled) or the server stops."""
        key = ref_key(request)
        try:
            await self._trigger(key, request, context)
        except Exception as exc:
            await self._abort("StreamIsActive", context, exc)
        last: bool | None = None
        failed = False  # counted by _abort; otherwise the stream is counted OK when it ends
        try:
            while not self.stopping.is_set():
                try:
                    active = await self._is_active(key, request, context)
                except Exception as exc:
                    if not _transient(exc):
                        failed = True
                        await self._abort("StreamIsActive", context, exc)
                    log.info("StreamIsActive: %s", exc)  # transient: keep the stream, retry
                else:
                    if active != last:
                        last = active
                        yield pb.IsActiveResponse(result=active)
                await self._until_stopped(self.stream_check_seconds)
        finally:
            if not failed:
                self.board.count("StreamIsActive", "OK")


def _transient(exc: Exception) -> bool:
    """Whether an open stream outlives `exc`: an UNAVAILABLE the next check may clear, but not
    an unexpected error (a bug), which ends the stream as it ends a unary call."""
    return (isinstance(exc, FailedCall) and exc.failure.code == "UNAVAILABLE"
            and not exc.failure.unexpected)


def _time_left(context: aio.ServicerContext) -> float | None:
    """Seconds until the call's deadline, less a margin to answer in; None without one."""
    left = context.time_remaining()
    return None if left is None else max(0.0, left - DEADLINE_MARGIN_SECONDS)


def _whole(value: float) -> int:
    """The integer field KEDA reads before 2.17: rounded up, held within int64 (the float
    field keeps the value itself)."""
    return min(math.ceil(value), INT64_MAX)
