"""A started Service with one target that has its first forecast, behind a real Prometheus
holding the trace up to two hours ahead: what the /metrics and page tests read.

tests/conftest.py serves these as the module-scoped fixtures `prometheus_now` and `live`.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import requests
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.service import Service
from forecaster.target import Target
from tests.support.prometheus import PrometheusServer, write_openmetrics
from tests.support.rest import live_trace
from tests.support.scaler import scaled_object_ref, scaler_settings
from tests.support.waiting import wait_for

MODEL = "seasonal_naive"  # the cheapest real model: the tests are about what is exported


@dataclass
class Live:
    """A started service with one target that has its first forecast."""

    service: Service
    stub: pb_grpc.ExternalScalerStub
    prometheus: PrometheusServer
    target: Target

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.service.http_port}"

    def ref(self, **metadata: str) -> pb.ScaledObjectRef:
        return scaled_object_ref(self.prometheus.url, model=MODEL, **metadata)


@contextmanager
def prometheus_now(root: Path) -> Iterator[PrometheusServer]:
    """The trace from 14 days ago to 2 hours ahead (see tests.support.rest.live_trace), so
    instant queries find a value however long the session has run."""
    write_openmetrics(live_trace(datetime.now(UTC)), "web_requests", root / "web.om",
                      {"job": "web"})
    with PrometheusServer([root / "web.om"], workdir=root / "server") as server:
        yield server


@contextmanager
def live_service(prometheus: PrometheusServer, **options: Any) -> Iterator[Live]:
    """The service (with Service's `options`, such as a resolver), once its one target has a
    forecast and its front has counted the call."""
    fits = ThreadPoolExecutor(1, thread_name_prefix="test-fit")  # no process spawn: faster
    service = Service(scaler_settings(prometheus.url), fit_pool=fits, **options)
    service.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            stub = pb_grpc.ExternalScalerStub(channel)
            ref = scaled_object_ref(prometheus.url, model=MODEL)
            name = stub.GetMetricSpec(ref, timeout=10).metricSpecs[0].metricName
            stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName=name), timeout=20)
            target = service.engine.get(f"shop/web/{name}")
            wait_for(lambda: target.snapshot.forecast is not None, timeout=60)
            live = Live(service, stub, prometheus, target)
            # The front reports its call counts every half second: tests that count calls
            # start once the registering call above is in.
            wait_for(lambda: any(
                s.labels.get("method") == "GetMetrics" and s.value >= 1
                for s in scrape(live).get("forecaster_requests_total", [])), timeout=10)
            yield live
    finally:
        service.stop()
        fits.shutdown(wait=True, cancel_futures=True)


def scrape(live: Live) -> dict[str, list[Sample]]:
    """GET /metrics, parsed by prometheus_client's own parser: samples by sample name."""
    response = requests.get(f"{live.base}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples
