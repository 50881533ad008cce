"""The scaler's event loop is never held: a new target waiting for its first value does not
delay calls for other targets, and a graceful stop ends open streams. The bundled traces are
replayed as the source; one query's history is held back by a gate the test opens."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import grpc
import pandas as pd
import pytest

from forecaster.config import EngineSettings, Settings
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.service import Service
from forecaster.sources.replay import ReplaySource
from tests.support.scaler import refusals

DATA = Path(__file__).parent.parent / "data"
QUICK = "aws_elb_request_count_8c0756"
HELD = "nasa_http_1995_requests_per_minute"


class GatedSource:
    """The replayed traces, with every query of HELD waiting until `gate` is set; `asked` is
    set once one of them is waiting."""

    def __init__(self, replay: ReplaySource) -> None:
        self.replay = replay
        self.gate = threading.Event()
        self.asked = threading.Event()

    def _hold(self, query: str) -> None:
        if query == HELD:
            self.asked.set()
            assert self.gate.wait(30), "the test never opened the gate"

    def query_range(
        self, query: str, start: datetime, end: datetime, step_seconds: int
    ) -> pd.Series:
        self._hold(query)
        return self.replay.query_range(query, start, end, step_seconds)

    def query_instant(self, query: str, at: datetime | None = None) -> tuple[datetime, float]:
        self._hold(query)
        return self.replay.query_instant(query, at)


@pytest.fixture
def source() -> Iterator[GatedSource]:
    gated = GatedSource(ReplaySource.from_folder(DATA))
    yield gated
    gated.gate.set()


@pytest.fixture
def service(source: GatedSource) -> Iterator[Service]:
    settings = Settings(
        engine=EngineSettings(refresh_seconds=3600.0, fit_workers=1,
                              first_value_wait_seconds=20.0),
        grpc_port=0, http_port=0, host="127.0.0.1",
    )
    service = Service(settings, source=source, fit_pool=ThreadPoolExecutor(1))  # type: ignore[arg-type]
    service.start()
    yield service
    service.stop()


def _request(query: str) -> pb.GetMetricsRequest:
    ref = pb.ScaledObjectRef(
        namespace="shop", name=query[:10].replace("_", "-").strip("-"),
        scalerMetadata={"serverAddress": "http://replay.demo", "query": query,
                        "targetValue": "10", "model": "seasonal_naive"},
    )
    return pb.GetMetricsRequest(scaledObjectRef=ref)


def test_a_target_waiting_for_its_first_value_does_not_hold_up_others(
    service: Service, source: GatedSource
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = pb_grpc.ExternalScalerStub(channel)
        quick = stub.GetMetrics(_request(QUICK), timeout=20).metricValues[0].metricValueFloat
        assert quick > 0
        held = stub.GetMetrics.future(_request(HELD), timeout=30)
        assert source.asked.wait(10), "the held target's history was never asked for"
        answered = []
        for _ in range(20):
            began = time.monotonic()
            stub.GetMetrics(_request(QUICK), timeout=5)
            answered.append(time.monotonic() - began)
        assert not held.done(), "the held target answered before its history arrived"
        assert max(answered) < 1.0, f"calls for another target waited: {max(answered):.2f} s"
        source.gate.set()
        value = held.result(timeout=25).metricValues[0].metricValueFloat
        _, current = source.replay.query_instant(HELD)
        assert value >= current > 0  # reactive until its first fit: at least the current load


def test_a_graceful_stop_ends_an_open_stream(service: Service) -> None:
    ref = _request(QUICK).scaledObjectRef
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stream = pb_grpc.ExternalScalerStub(channel).StreamIsActive(ref, timeout=30)
        assert next(stream).result is True
        began = time.monotonic()
        service.stop()
        with pytest.raises(StopIteration):  # ended by the server with OK, not an error
            next(stream)
        assert time.monotonic() - began < 5.0


def test_targets_beyond_the_maximum_are_refused_with_resource_exhausted(
    source: GatedSource,
) -> None:
    settings = Settings(
        engine=EngineSettings(refresh_seconds=3600.0, fit_workers=1, max_targets=1),
        grpc_port=0, http_port=0, host="127.0.0.1",
    )
    service = Service(settings, source=source, fit_pool=ThreadPoolExecutor(1))  # type: ignore[arg-type]
    service.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            stub = pb_grpc.ExternalScalerStub(channel)
            first = _request(QUICK)
            assert stub.GetMetricSpec(first.scaledObjectRef, timeout=10).metricSpecs
            assert stub.GetMetrics(first, timeout=10).metricValues
            over = _request(HELD)
            # The spec is served from the metadata alone, so KEDA's fallback can count the
            # refusals that GetMetrics and IsActive give.
            assert stub.GetMetricSpec(over.scaledObjectRef, timeout=10).metricSpecs
            for error in refusals(stub, over.scaledObjectRef, over.metricName):
                assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "maxTargets" in (error.details() or "")
            assert stub.GetMetrics(first, timeout=10).metricValues  # the known one still is
            assert len(service.engine) == 1
    finally:
        service.stop()


def test_a_stop_ends_a_stream_still_waiting_for_its_first_value(
    service: Service, source: GatedSource
) -> None:
    ref = _request(HELD).scaledObjectRef  # its history is held back: the stream keeps waiting
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stream = pb_grpc.ExternalScalerStub(channel).StreamIsActive(ref, timeout=30)
        ended = ThreadPoolExecutor(1).submit(lambda: list(stream))
        assert source.asked.wait(10), "the held target's history was never asked for"
        assert not ended.done()
        began = time.monotonic()
        service.stop()
        assert ended.result(timeout=10) == []  # ended cleanly, with nothing to say yet
        assert time.monotonic() - began < 3.0  # not the 20 s first-value wait, nor the grace
