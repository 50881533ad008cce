"""KEDA's ExternalScaler service: the planned load as the metric, forecast-aware activity.

Replica bounds and scale-down behaviour belong to the ScaledObject; this service serves the
load to plan for and the HPA turns it into replicas (targetSizeFloat = targetValue).

It runs in the scaler's front process, on the gRPC server's event loop. A call looks up its
trigger (resolved once by the engine's process, then cached) and the target's latest answer,
which the engine's process pushes as it changes: tens of microseconds, so it runs inline. The
one wait, for a new target's first value, is a future the next answer resolves, so it never
holds up other calls.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from grpc import aio

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

log = logging.getLogger(__name__)


class ExternalScaler(pb_grpc.ExternalScalerServicer):
    """The gRPC servicer; every method resolves the ScaledObjectRef, then reads an answer."""

    def __init__(
        self,
        board: Board,
        *,
        first_value_wait_seconds: float,
        stream_check_seconds: float = STREAM_CHECK_SECONDS,
        engine_silence_seconds: float = ENGINE_SILENCE_SECONDS,
    ) -> None:
        self.board = board
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

    async def _trigger(self, ref: pb.ScaledObjectRef) -> Trigger:
        return await self.board.trigger(ref.namespace, ref.name, dict(ref.scalerMetadata))

    async def _answer(self, target_id: str) -> Answer:
        """The target's answer. A target new to the engine has none until its first refresh:
        wait for it (bounded by the first-value wait, cut short by a stop) without blocking.
        An engine that has gone silent may be stalled: its last answers are not trusted."""
        silent = self.board.silent_for()
        if silent > self.engine_silence_seconds:
            raise FailedCall(Failure(
                "UNAVAILABLE", f"the forecaster engine has not been heard from for {silent:.0f}s"
            ))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.first_value_wait_seconds
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
            trigger = await self._trigger(request)
        except Exception as exc:
            await self._abort("GetMetricSpec", context, exc)
        self.board.count("GetMetricSpec", "OK")
        value = trigger.target_value
        spec = pb.MetricSpec(
            metricName=trigger.metric_name, targetSize=math.ceil(value), targetSizeFloat=value
        )
        return pb.GetMetricSpecResponse(metricSpecs=[spec])

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: aio.ServicerContext
    ) -> pb.GetMetricsResponse:
        try:
            trigger = await self._trigger(request.scaledObjectRef)
            name = trigger.metric_name
            if request.metricName and request.metricName != name:
                raise FailedCall(Failure(
                    "INVALID_ARGUMENT",
                    f"metricName: {request.metricName!r} is not this trigger's metric; "
                    f"GetMetricSpec named it {name!r}",
                ))
            answer = await self._answer(trigger.target_id)
            assert answer.value is not None  # an answer without a failure has a value
        except Exception as exc:
            await self._abort("GetMetrics", context, exc)
        self.board.count("GetMetrics", "OK")
        value = pb.MetricValue(
            metricName=name, metricValue=math.ceil(answer.value), metricValueFloat=answer.value
        )
        return pb.GetMetricsResponse(metricValues=[value])

    async def _is_active(self, request: pb.ScaledObjectRef) -> bool:
        trigger = await self._trigger(request)  # also keeps the target from going idle
        return (await self._answer(trigger.target_id)).active

    async def IsActive(
        self, request: pb.ScaledObjectRef, context: aio.ServicerContext
    ) -> pb.IsActiveResponse:
        try:
            active = await self._is_active(request)
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
            await self._trigger(request)
        except Exception as exc:
            await self._abort("StreamIsActive", context, exc)
        last: bool | None = None
        failed = False  # counted by _abort; otherwise the stream is counted OK when it ends
        try:
            while not self.stopping.is_set():
                try:
                    active = await self._is_active(request)
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
