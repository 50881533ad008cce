"""A configured Prometheus server that answers what no Prometheus should: a reply far over
its maxReplyBytes, an HTML page (a login proxy in front of the URL), a redirect. Through the
real service's gRPC front, as KEDA calls it, each such trigger's GetMetrics and IsActive fail
UNAVAILABLE (so KEDA's fallback applies) with a message naming the cause, never UNKNOWN or
INTERNAL, refresh after refresh; a target on a real Prometheus in the same service keeps
answering OK all the while."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from forecaster.config import EngineSettings, Settings
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.service import Service
from forecaster.sources.prometheus import PrometheusServerConfig
from forecaster.target import Target
from tests.support.faulty import HTML, LARGE, REDIRECT, FaultyPrometheus
from tests.support.prometheus import PrometheusServer
from tests.support.scaler import refusals, scaled_object_ref
from tests.support.waiting import wait_for, wait_for_call

MAX_REPLY_BYTES = 1024 * 1024
REPLY_BYTES = 4_000_000  # a few MB over the cap: enough to be refused while it streams
MODEL = "seasonal_naive"
# What each fault's message must say: the cause, and what to change.
CAUSES = {
    LARGE: "with more than 1,048,576 bytes (the server's maxReplyBytes)",
    HTML: "like a Prometheus API (a 200 without JSON)",
    REDIRECT: "with a redirect to '{url}/login'; redirects are not followed",
}


@pytest.fixture(scope="module")
def faulty() -> Iterator[FaultyPrometheus]:
    with FaultyPrometheus(reply_bytes=REPLY_BYTES) as server:
        yield server


@pytest.fixture(scope="module")
def service(prometheus_now: PrometheusServer, faulty: FaultyPrometheus) -> Iterator[Service]:
    settings = Settings(
        engine=EngineSettings(refresh_seconds=1.0, refit_seconds=3600.0, fit_workers=1,
                              first_value_wait_seconds=10.0),
        servers=(PrometheusServerConfig(url=faulty.url, max_reply_bytes=MAX_REPLY_BYTES,
                                        timeout_seconds=5.0),
                 PrometheusServerConfig(url=prometheus_now.url, timeout_seconds=5.0)),
        grpc_port=0, http_port=0, host="127.0.0.1",
    )
    fits = ThreadPoolExecutor(1, thread_name_prefix="test-fit")  # no process spawn: faster
    started = Service(settings, fit_pool=fits)
    started.start()
    try:
        yield started
    finally:
        started.stop()
        fits.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def stub(service: Service) -> Iterator[pb_grpc.ExternalScalerStub]:
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        yield pb_grpc.ExternalScalerStub(channel)


def _register(stub: pb_grpc.ExternalScalerStub, ref: pb.ScaledObjectRef) -> str:
    """GetMetricSpec, as KEDA sends it first: the trigger's metric name."""
    return str(stub.GetMetricSpec(ref, timeout=10).metricSpecs[0].metricName)


def _get_metrics(stub: pb_grpc.ExternalScalerStub, ref: pb.ScaledObjectRef,
                 metric: str) -> float:
    answer = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName=metric),
                             timeout=10)
    return float(answer.metricValues[0].metricValueFloat)


def _unavailable(exc: Exception) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() is grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def healthy(service: Service, stub: pb_grpc.ExternalScalerStub,
            prometheus_now: PrometheusServer) -> tuple[pb.ScaledObjectRef, str, Target]:
    """A trigger on the real Prometheus, answering OK: its ref, metric name and target."""
    ref = scaled_object_ref(prometheus_now.url, model=MODEL)
    metric = _register(stub, ref)
    wait_for_call(lambda: _get_metrics(stub, ref, metric), timeout=30, retry=_unavailable,
                  what="the healthy target's first answer")
    return ref, metric, service.engine.get(f"shop/web/{metric}")


def _refused(errors: list[grpc.RpcError], cause: str, server: str, query: str) -> None:
    """UNAVAILABLE for each call, naming the cause, the server and the query."""
    assert [e.code() for e in errors] == [grpc.StatusCode.UNAVAILABLE] * len(errors), [
        (e.code(), e.details()) for e in errors]
    for error in errors:
        assert cause in error.details(), error.details()
        assert server in error.details() and query in error.details(), error.details()


def _still_answers(stub: pb_grpc.ExternalScalerStub,
                   healthy: tuple[pb.ScaledObjectRef, str, Target]) -> None:
    """The healthy target refreshes once more, and answers OK."""
    ref, metric, target = healthy
    stamp = target.snapshot.current_time or 0.0
    wait_for(lambda: (target.snapshot.current_time or 0.0) > stamp, timeout=15,
             what="a refresh of the healthy target")
    assert _get_metrics(stub, ref, metric) > 0
    stub.IsActive(ref, timeout=10)  # OK, or it raises


@pytest.mark.parametrize("fault", [LARGE, HTML, REDIRECT])
def test_a_faulty_reply_is_unavailable_naming_its_cause_and_spares_the_healthy_target(
    service: Service, stub: pb_grpc.ExternalScalerStub, faulty: FaultyPrometheus,
    healthy: tuple[pb.ScaledObjectRef, str, Target], fault: str,
) -> None:
    query = f"rate({fault}_requests_total[5m])"
    ref = pb.ScaledObjectRef(namespace="shop", name=f"{fault}-app", scalerMetadata={
        "serverAddress": faulty.url, "query": query, "targetValue": "10", "model": MODEL})
    metric = _register(stub, ref)
    cause = CAUSES[fault].format(url=faulty.url)
    # The first GetMetrics registers the target and waits for its first read.
    _refused(refusals(stub, ref, metric), cause, faulty.url, query)  # GetMetrics, IsActive
    _still_answers(stub, healthy)
    target = service.engine.get(f"shop/{fault}-app/{metric}")
    wait_for(lambda: target.refresh_failures >= 2, timeout=30,
             what=f"a second read of the {fault} trigger")
    _refused(refusals(stub, ref, metric), cause, faulty.url, query)
    _still_answers(stub, healthy)
    replies = faulty.answered(fault)
    assert replies and {r.path for r in replies} <= {"/api/v1/query", "/api/v1/query_range"}
