"""KEDA's ExternalScaler service: the planned load as the metric, forecast-aware activity.

Replica bounds and scale-down behaviour belong to the ScaledObject; this service serves the
load to plan for and the HPA turns it into replicas (targetSizeFloat = targetValue).

The methods run on the gRPC server's asyncio loop. A call only resolves the trigger (parsed
once, then cached) and reads a published snapshot, tens of microseconds, so it runs inline:
handing it to a thread would cost more than the work. The one wait, for a new target's first
value, is a future the engine resolves from its own thread, so it never holds up other calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from grpc import aio

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
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.targets import TargetResolver

log = logging.getLogger(__name__)

STREAM_CHECK_SECONDS = 5.0

_T = TypeVar("_T")


def status_for(exc: Exception) -> grpc.StatusCode:
    """Our errors to gRPC codes, in one place. UNAVAILABLE lets KEDA's `fallback` apply."""
    if isinstance(exc, InvalidInputError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, TooManyTargetsError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    # An unknown target here was just dropped as idle between resolve and read: transient.
    if isinstance(exc, NotReadyError | SourceUnavailableError | SourceError |
                  InsufficientHistoryError | UnknownTargetError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


class ExternalScaler(pb_grpc.ExternalScalerServicer):
    """The gRPC servicer; every method resolves the ScaledObjectRef, then reads a snapshot."""

    def __init__(
        self,
        engine: Engine,
        resolver: TargetResolver,
        *,
        stream_check_seconds: float = STREAM_CHECK_SECONDS,
        on_request: Callable[[str, str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.resolver = resolver
        self.stream_check_seconds = stream_check_seconds
        self.on_request = on_request or (lambda method, code: None)
        self.stopping = threading.Event()  # set by stop_streams: open streams end
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called on the server's loop before it serves: where stop_streams sends its wake-up."""
        self._loop, self._wake = loop, asyncio.Event()

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
        code = status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s failed", method, exc_info=exc)
            message = f"internal error in {method}; see the forecaster logs"
        else:
            message = str(exc)
        self.on_request(method, code.name)
        await context.abort(code, message)
        raise AssertionError("context.abort returned")  # pragma: no cover

    def _target_id(self, ref: pb.ScaledObjectRef) -> str:
        return self.resolver.resolve(ref.namespace, ref.name, dict(ref.scalerMetadata)).target_id

    async def _first_value(self, target_id: str) -> None:
        """A target created by this very call has no value yet: wait for its first refresh
        (bounded by the engine's first-value wait, cut short by a stop) without blocking."""
        if not self.engine.awaiting_first_value(target_id):
            return
        loop = asyncio.get_running_loop()
        arrived: asyncio.Future[None] = loop.create_future()

        def arrive() -> None:
            if not arrived.done():
                arrived.set_result(None)

        def wake() -> None:  # on an engine thread; the loop may have closed since
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(arrive)

        self.engine.when_first_value(target_id, wake)
        await self._until_stopped(self.engine.settings.first_value_wait_seconds, arrived)
        arrived.cancel()

    async def GetMetricSpec(
        self, request: pb.ScaledObjectRef, context: aio.ServicerContext
    ) -> pb.GetMetricSpecResponse:
        try:
            target = self.resolver.resolve(
                request.namespace, request.name, dict(request.scalerMetadata)
            )
            value = target.spec.target_value
            spec = pb.MetricSpec(
                metricName=target.spec.effective_metric_name,
                targetSize=math.ceil(value),
                targetSizeFloat=value,
            )
        except Exception as exc:
            await self._abort("GetMetricSpec", context, exc)
        self.on_request("GetMetricSpec", "OK")
        return pb.GetMetricSpecResponse(metricSpecs=[spec])

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: aio.ServicerContext
    ) -> pb.GetMetricsResponse:
        try:
            ref = request.scaledObjectRef
            target = self.resolver.resolve(ref.namespace, ref.name, dict(ref.scalerMetadata))
            name = target.spec.effective_metric_name
            if request.metricName and request.metricName != name:
                raise InvalidInputError(
                    "metricName",
                    f"{request.metricName!r} is not this trigger's metric; GetMetricSpec "
                    f"named it {name!r}",
                )
            await self._first_value(target.target_id)
            planned = self.engine.serve(target.target_id, wait=False)
        except Exception as exc:
            await self._abort("GetMetrics", context, exc)
        self.on_request("GetMetrics", "OK")
        value = pb.MetricValue(
            metricName=name, metricValue=math.ceil(planned.value), metricValueFloat=planned.value
        )
        return pb.GetMetricsResponse(metricValues=[value])

    async def _is_active(self, request: pb.ScaledObjectRef) -> bool:
        target_id = self._target_id(request)  # also keeps the target from going idle
        await self._first_value(target_id)
        return self.engine.is_active(target_id, wait=False)

    async def IsActive(
        self, request: pb.ScaledObjectRef, context: aio.ServicerContext
    ) -> pb.IsActiveResponse:
        try:
            active = await self._is_active(request)
        except Exception as exc:
            await self._abort("IsActive", context, exc)
        self.on_request("IsActive", "OK")
        return pb.IsActiveResponse(result=active)

    async def StreamIsActive(
        self, request: pb.ScaledObjectRef, context: aio.ServicerContext
    ) -> AsyncIterator[pb.IsActiveResponse]:
        """Send the state at once, then on each change (checked every few seconds); end when
        the client goes away (the call is cancelled) or the server stops."""
        try:
            self._target_id(request)
        except Exception as exc:
            await self._abort("StreamIsActive", context, exc)
        last: bool | None = None
        failed = False  # counted by _abort; otherwise the stream is counted OK when it ends
        try:
            while not self.stopping.is_set():
                try:
                    active = await self._is_active(request)
                except Exception as exc:
                    if status_for(exc) is not grpc.StatusCode.UNAVAILABLE:
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
                self.on_request("StreamIsActive", "OK")
