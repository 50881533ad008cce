"""KEDA's ExternalScaler service: the planned load as the metric, forecast-aware activity.

Replica bounds and scale-down behaviour belong to the ScaledObject; this service serves the
load to plan for and the HPA turns it into replicas (targetSizeFloat = targetValue).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from forecaster.engine import Engine
from forecaster.errors import (
    InsufficientHistoryError,
    InvalidInputError,
    NotReadyError,
    SourceError,
    SourceUnavailableError,
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
        self.stopping = threading.Event()

    def _call(self, method: str, context: grpc.ServicerContext, work: Callable[[], _T]) -> _T:
        try:
            result = work()
        except Exception as exc:
            code = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method)
                message = f"internal error in {method}; see the forecaster logs"
            else:
                message = str(exc)
            self.on_request(method, code.name)
            context.abort(code, message)
        self.on_request(method, "OK")
        return result

    def _target_id(self, ref: pb.ScaledObjectRef) -> str:
        return self.resolver.resolve(ref.namespace, ref.name, dict(ref.scalerMetadata)).target_id

    def GetMetricSpec(
        self, request: pb.ScaledObjectRef, context: grpc.ServicerContext
    ) -> pb.GetMetricSpecResponse:
        def work() -> pb.GetMetricSpecResponse:
            target = self.resolver.resolve(
                request.namespace, request.name, dict(request.scalerMetadata)
            )
            value = target.spec.target_value
            spec = pb.MetricSpec(
                metricName=target.spec.effective_metric_name,
                targetSize=math.ceil(value),
                targetSizeFloat=value,
            )
            return pb.GetMetricSpecResponse(metricSpecs=[spec])

        return self._call("GetMetricSpec", context, work)

    def GetMetrics(
        self, request: pb.GetMetricsRequest, context: grpc.ServicerContext
    ) -> pb.GetMetricsResponse:
        def work() -> pb.GetMetricsResponse:
            ref = request.scaledObjectRef
            target = self.resolver.resolve(ref.namespace, ref.name, dict(ref.scalerMetadata))
            name = target.spec.effective_metric_name
            if request.metricName and request.metricName != name:
                raise InvalidInputError(
                    "metricName",
                    f"{request.metricName!r} is not this trigger's metric; GetMetricSpec "
                    f"named it {name!r}",
                )
            planned = self.engine.serve(target.target_id)
            value = pb.MetricValue(
                metricName=name,
                metricValue=math.ceil(planned.value),
                metricValueFloat=planned.value,
            )
            return pb.GetMetricsResponse(metricValues=[value])

        return self._call("GetMetrics", context, work)

    def IsActive(
        self, request: pb.ScaledObjectRef, context: grpc.ServicerContext
    ) -> pb.IsActiveResponse:
        return self._call(
            "IsActive",
            context,
            lambda: pb.IsActiveResponse(result=self.engine.is_active(self._target_id(request))),
        )

    def StreamIsActive(
        self, request: pb.ScaledObjectRef, context: grpc.ServicerContext
    ) -> Iterator[pb.IsActiveResponse]:
        """Send the state at once, then on each change (checked every few seconds); end when
        the client goes away or the server stops."""
        target_id = self._call("StreamIsActive", context, lambda: self._target_id(request))
        last: bool | None = None
        while context.is_active() and not self.stopping.is_set():
            try:
                target_id = self._target_id(request)  # also keeps the target from going idle
                active = self.engine.is_active(target_id)
            except Exception as exc:
                code = status_for(exc)
                if code is grpc.StatusCode.UNAVAILABLE:  # transient: keep the stream, retry
                    log.info("StreamIsActive: %s", exc)
                    self.stopping.wait(self.stream_check_seconds)
                    continue
                context.abort(code, str(exc) if code is not grpc.StatusCode.INTERNAL else
                              "internal error in StreamIsActive; see the forecaster logs")
            if active != last:
                last = active
                yield pb.IsActiveResponse(result=active)
            self.stopping.wait(self.stream_check_seconds)
