"""Builders for the scaler's tests: the settings of a Service on port 0 behind a real
Prometheus, KEDA's ScaledObjectRef, and a clock the test moves forward."""

from __future__ import annotations

import time

import grpc
import pytest

from forecaster.config import EngineSettings, Settings
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.sources.prometheus import PrometheusServerConfig

SECRET = "s3cr3t-token-do-not-log"


class Clock:
    """Real time plus an offset the test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def scaler_settings(url: str, **engine: float) -> Settings:
    return Settings(
        engine=EngineSettings(
            refresh_seconds=engine.get("refresh_seconds", 1.0),
            refit_seconds=3600.0,
            fit_workers=1,
            first_value_wait_seconds=10.0,
        ),
        servers=(PrometheusServerConfig(url=url, bearer_token=SECRET, timeout_seconds=2.0,
                                        retries=1),),
        grpc_port=0,
        http_port=0,
        host="127.0.0.1",
    )


def scaled_object_ref(url: str, **metadata: str) -> pb.ScaledObjectRef:
    base = {
        "serverAddress": url,
        "query": 'sum(web_requests{job="web"})',
        "targetValue": "16.7",
        "model": "holt_winters",
        "startupSeconds": "300",
        "scalerAddress": "forecaster.autoscaling:50051",  # KEDA's own key, ignored
    }
    base.update(metadata)
    return pb.ScaledObjectRef(name="web", namespace="shop", scalerMetadata=base)


def refusals(
    stub: pb_grpc.ExternalScalerStub, ref: pb.ScaledObjectRef, metric_name: str
) -> list[grpc.RpcError]:
    """KEDA's reads after GetMetricSpec, GetMetrics then IsActive, each of which must fail:
    their errors, for the test to check (these are what KEDA's fallback counts)."""
    errors = []
    for call in (
        lambda: stub.GetMetrics(
            pb.GetMetricsRequest(scaledObjectRef=ref, metricName=metric_name), timeout=10
        ),
        lambda: stub.IsActive(ref, timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        errors.append(caught.value)
    return errors
