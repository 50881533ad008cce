"""KEDA's ExternalScaler service: the planned load as the metric, forecast-aware activity.

Replica bounds and scale-down behaviour belong to the ScaledObject; this service serves the
load to plan for and the HPA turns it into replicas (targetSizeFloat = targetValue).

It runs in the scaler's front process, on the gRPC server's event loop. GetMetricSpec answers
from the trigger's metadata alone: KEDA's fallback counts only GetMetrics and IsActive errors,
and a failed GetMetricSpec leaves the HPA without a metric. GetMetrics and IsActive look up the
trigger (resolved once by the engine's process, then cached) and the target's latest answer,
which the engine's process pushes as it changes: tens of microseconds, so it runs inline. The
one wait, for a new target's first value, is a future the next answer resolves, bounded by the
call's deadline, so it never holds up other calls.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
from collections.abc import AsyncIterator, Mapping
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
)
from forecaster.spec import MetricSpec, metric_spec

log = logging.getLogger(__name__)

# Left of a call's deadline to answer in: a wait that ends then still reports its reason.
DEADLINE_MARGIN_SECONDS = 0.2
METRIC_SPEC_CACHE_SIZE = 20_000
INT64_MAX = 2**63 - 1
# KEDA 2.5-2.6 send GetMetrics the name with its trigger index: "s0-<name>".
_INDEX_PREFIX = re.compile(r"s[0-9]+-")


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
    ) -> None:
        self.board = board
        self.defaults = dict(defaults or {})
        self._metric_specs: dict[frozenset[tuple[str, str]], MetricSpec] = {}
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
        if isinstance(exc, FailedCall):
            code, message = grpc.StatusCode[exc.failure.code], exc.failure.message
        else:
            log.error("%s failed", method, exc_info=exc)
            code = grpc.StatusCode.INTERNAL
            message = f"internal error in {method}; see the forecaster logs"
        self.board.count(method, code.name)
        await context.abort(code, message)
        raise AssertionError("context.abort returned")  # pragma: no cover

    def _metric_spec(self, ref: pb.ScaledObjectRef) -> MetricSpec:
        """The metric's name and target from the metadata alone; cached, as KEDA repeats it."""
        key = frozenset(ref.scalerMetadata.items())
        found = self._metric_specs.get(key)
        if found is None:
            try:
                found = metric_spec(dict(ref.scalerMetadata), self.defaults)
            except InvalidInputError as exc:
                raise FailedCall(Failure("INVALID_ARGUMENT", str(exc))) from None
            if len(self._metric_specs) >= METRIC_SPEC_CACHE_SIZE:
                del self._metric_specs[next(iter(self._metric_specs))]  # the oldest
            self._metric_specs[key] = found
        return found

    async def _trigger(self, ref: pb.ScaledObjectRef, context: aio.ServicerContext) -> Trigger:
        return await self.board.trigger(
            ref.namespace, ref.name, dict(ref.scalerMetadata), timeout=_time_left(context)
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
            found = self._metric_spec(request)
        except Exception as exc:
            await self._abort("GetMetricSpec", context, exc)
        self.board.count("GetMetricSpec", "OK")
        value = found.target_value
        spec = pb.MetricSpec(
            metricName=found.metric_name, targetSize=_whole(value), targetSizeFloat=value
        )
        return pb.GetMetricSpecResponse(metricSpecs=[spec])

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
            name = self._metric_spec(request.scaledObjectRef).metric_name
            asked = request.metricName
            if asked and asked != name and _INDEX_PREFIX.sub("", asked, count=1) != name:
                raise FailedCall(Failure(
                    "INVALID_ARGUMENT",
                    f"metricName: {asked!r} is not this trigger's metric; "
                    f"GetMetricSpec named it {name!r}",
                ))
            trigger = await self._trigger(request.scaledObjectRef, context)
            answer = await self._answer(trigger.target_id, context)
            assert answer.value is not None  # an answer without a failure has a value
        except Exception as exc:
            await self._abort("GetMetrics", context, exc)
        self.board.count("GetMetrics", "OK")
        value = pb.MetricValue(
            metricName=name, metricValue=_whole(answer.value), metricValueFloat=answer.value
        )
        return pb.GetMetricsResponse(metricValues=[value])

    async def _is_active(self, request: pb.ScaledObjectRef, context: aio.ServicerContext) -> bool:
        trigger = await self._trigger(request, context)  # also keeps the target from going idle
        return (await self._answer(trigger.target_id, context)).active

    async def IsActive(
        self, request: pb.ScaledObjectRef, context: aio.ServicerContext
    ) -> pb.IsActiveResponse:
        try:
            active = await self._is_active(request, context)
        except Exception as exc:
            await self._abort("IsActive", context, exc)
        self.board.count("IsActive", "OK")
        return pb.IsActiveResponse(result=active)

    async def StreamIsActive(
        self, request: pb.ScaledObjectRef, context: aio.ServicerContext
    ) -> AsyncIterator[pb.IsActiveResponse]:
        """Send the state at once, then on each change (checked every few seconds); end when
        the client goes away (the call is cancelled) or the server stops."""
        try:
            await self._trigger(request, context)
        except Exception as exc:
            await self._abort("StreamIsActive", context, exc)
        last: bool | None = None
        failed = False  # counted by _abort; otherwise the stream is counted OK when it ends
        try:
            while not self.stopping.is_set():
                try:
                    active = await self._is_active(request, context)
                except Exception as exc:
                    if not (isinstance(exc, FailedCall) and exc.failure.code == "UNAVAILABLE"):
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


def _time_left(context: aio.ServicerContext) -> float | None:
    """Seconds until the call's deadline, less a margin to answer in; None without one."""
    left = context.time_remaining()
    return None if left is None else max(0.0, left - DEADLINE_MARGIN_SECONDS)


def _whole(value: float) -> int:
    """The integer field KEDA reads before 2.17: rounded up, held within int64 (the float
    field keeps the value itself)."""
    return min(math.ceil(value), INT64_MAX)
