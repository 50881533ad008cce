"""An unexpected error (a bug, not one of forecaster's own errors) in the scaler, on either
side of it, as KEDA calls it over real gRPC: GetMetrics, IsActive and StreamIsActive answer
UNAVAILABLE, so KEDA's fallback applies, with a message that names what was being done and
not the exception's text; the traceback goes to the ERROR log; the calls are counted apart
per method, so /metrics tells a bug from an outage; and a healthy trigger keeps answering OK."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Hashable, Iterator, Mapping
from typing import Any

import grpc
import pytest

from forecaster.errors import NotFittedError, NotReadyError, SourceUnavailableError
from forecaster.scaler.board import Board
from forecaster.scaler.bridge import failure_for
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.scaler.messages import (
    ANSWERS,
    REPORT,
    RESOLVE,
    RESOLVED,
    Answer,
    Failure,
    FrontSettings,
    Trigger,
)
from forecaster.scaler.server import ScalerServer
from forecaster.scaler.servicer import ExternalScaler
from forecaster.target import Target
from forecaster.targets import TargetResolver
from tests.support import live
from tests.support.live import Live, scrape
from tests.support.prometheus import PrometheusServer
from tests.support.scaler import refusals
from tests.support.waiting import wait_for

BUG = "a bug's own words, /var/lib/forecaster/secret"  # must never reach a caller
BUGGY = "buggy"  # the ScaledObject whose trigger meets the bug
UNARY = ("GetMetrics", "IsActive")
METHODS = (*UNARY, "StreamIsActive")
UNEXPECTED = "forecaster_scaler_unexpected_errors_total"
REQUESTS = "forecaster_requests_total"


def _message(doing: str) -> str:
    return f"unexpected error {doing}; see the forecaster logs"


def _keda_calls(
    stub: pb_grpc.ExternalScalerStub, ref: pb.ScaledObjectRef
) -> dict[str, grpc.RpcError]:
    """KEDA's calls about one trigger, each of which must fail: GetMetricSpec (which must
    not), GetMetrics, IsActive, then StreamIsActive's first read. Their errors by method."""
    metric = stub.GetMetricSpec(ref, timeout=10).metricSpecs[0].metricName
    errors = dict(zip(UNARY, refusals(stub, ref, metric), strict=True))
    with pytest.raises(grpc.RpcError) as caught:
        next(stub.StreamIsActive(ref, timeout=10))
    errors["StreamIsActive"] = caught.value
    return errors


def _unexpected(errors: dict[str, grpc.RpcError], message: str | dict[str, str]) -> None:
    """Each call UNAVAILABLE with the generic message, none of the exception's text."""
    for method, error in errors.items():
        expected = message if isinstance(message, str) else message[method]
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAVAILABLE, expected), method
        assert BUG not in error.details()


def _logged(caplog: pytest.LogCaptureFixture, message: str) -> None:
    """An ERROR record that says `message` and carries the bug's traceback."""
    assert any(r.levelno == logging.ERROR and r.getMessage() == message and r.exc_info
               and str(r.exc_info[1]) == BUG for r in caplog.records), caplog.records


# -- the engine's side: resolving a trigger meets a bug, in the real service ---------------------


class BuggyResolver(TargetResolver):
    """The service's resolver, which fails as a bug would on the triggers of BUGGY."""

    def resolve(self, namespace: str, name: str, metadata: Mapping[str, str]) -> Target:
        if name == BUGGY:
            raise RuntimeError(BUG)
        return super().resolve(namespace, name, metadata)


@pytest.fixture(scope="module")
def service(prometheus_now: PrometheusServer) -> Iterator[Live]:
    """The real service with a healthy trigger on a real Prometheus, and BuggyResolver."""
    with live.live_service(prometheus_now, resolver=BuggyResolver) as started:
        yield started


def _count(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    found = [s.value for s in samples.get(name, []) if labels.items() <= s.labels.items()]
    return sum(found)


def test_a_bug_resolving_a_trigger_is_unavailable_counted_and_spares_the_healthy_one(
    service: Live, caplog: pytest.LogCaptureFixture
) -> None:
    before = scrape(service)
    assert {s.labels["method"] for s in before[UNEXPECTED]} >= set(METHODS)  # there from start
    ref = pb.ScaledObjectRef(namespace="shop", name=BUGGY,
                             scalerMetadata=dict(service.ref().scalerMetadata))
    with caplog.at_level(logging.ERROR):
        errors = _keda_calls(service.stub, ref)
    _unexpected(errors, _message("resolving a scaler trigger"))
    _logged(caplog, "unexpected error resolving a scaler trigger")

    healthy = service.ref()
    metric = service.target.spec.effective_metric_name
    answer = service.stub.GetMetrics(
        pb.GetMetricsRequest(scaledObjectRef=healthy, metricName=metric), timeout=10)
    assert answer.metricValues[0].metricValueFloat > 0
    service.stub.IsActive(healthy, timeout=10)  # OK, or it raises

    # The front reports its counts every half second: scrape until they are in.
    def counted() -> dict[str, list[Any]] | None:
        samples = scrape(service)
        moved = all(_count(samples, UNEXPECTED, method=m) == _count(before, UNEXPECTED, method=m)
                    + 1 for m in METHODS)
        return samples if moved else None

    after = wait_for(counted, timeout=10, every=0.1, what="the unexpected errors on /metrics")
    assert _count(after, UNEXPECTED, method="GetMetricSpec") == _count(
        before, UNEXPECTED, method="GetMetricSpec")
    for method in METHODS:  # counted among the calls too, with the code they got
        assert _count(after, REQUESTS, interface="grpc", method=method, code="UNAVAILABLE") \
            == _count(before, REQUESTS, interface="grpc", method=method, code="UNAVAILABLE") + 1


@pytest.mark.parametrize(("error", "code", "unexpected"), [
    (RuntimeError(BUG), "UNAVAILABLE", True),
    (KeyError(BUG), "UNAVAILABLE", True),
    (NotFittedError(BUG), "UNAVAILABLE", True),  # ours, but nothing a scaler call should meet
    (NotReadyError(BUG, retry_after_seconds=1.0), "UNAVAILABLE", False),
    (SourceUnavailableError(BUG), "UNAVAILABLE", False),
])
def test_only_an_error_of_our_own_is_told_to_the_caller(
    error: Exception, code: str, unexpected: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        failure = failure_for(error, "reading a target's forecast")
    if unexpected:
        assert failure == Failure(code, _message("reading a target's forecast"), unexpected=True)
        assert caplog.records[-1].exc_info is not None
        assert caplog.records[-1].exc_info[1] is error
    else:
        assert failure == Failure(code, str(error))
        assert not caplog.records


# -- the front's side: a bug in the front itself, and one the engine's side reports --------------


class BuggyBoard(Board):
    """The front's board, whose trigger look-up fails as a bug would for BUGGY's refs."""

    async def trigger(
        self, namespace: str, name: str, metadata: Mapping[str, str], *,
        key: Hashable | None = None, timeout: float | None = None,
    ) -> Trigger:
        if name == BUGGY:
            raise RuntimeError(BUG)
        return await super().trigger(namespace, name, metadata, key=key, timeout=timeout)


class EngineSide:
    """The engine's process as the front sees it (Kubernetes-free, but not a real engine):
    each ref's trigger resolved to the answer named for it, a heartbeat with each report, and
    the reports kept for the test."""

    def __init__(self, answers: dict[str, Answer]) -> None:
        self.answers = answers
        self.board: Board | None = None
        self.calls: Counter[tuple[str, str]] = Counter()
        self.unexpected: Counter[str] = Counter()
        self.lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        """On the front's loop, as the board sends; replies are handed to the loop."""
        assert self.board is not None
        loop = asyncio.get_running_loop()
        if message[0] == RESOLVE:
            _, request, namespace, name, _ = message
            trigger = Trigger(f"{namespace}/{name}/m", "m", 10.0)
            loop.call_soon(self.board.receive, (RESOLVED, request, trigger, self.answers[name]))
        elif message[0] == REPORT:
            with self.lock:
                self.calls.update(message[2])
                self.unexpected.update(message[3])
            loop.call_soon(self.board.receive, (ANSWERS, {}))  # the engine's sign of life

    def reported(self) -> tuple[Counter[tuple[str, str]], Counter[str]]:
        with self.lock:
            return Counter(self.calls), Counter(self.unexpected)


@pytest.fixture
def front() -> Iterator[tuple[pb_grpc.ExternalScalerStub, EngineSide]]:
    """The real servicer and gRPC server, on BuggyBoard and EngineSide, and a real client."""
    engine = EngineSide({
        "web": Answer(True, 3.5, True),
        # what the engine's side answers when reading a target's forecast meets a bug
        "broken": Answer(True, failure=failure_for(RuntimeError(BUG),
                                                   "reading a target's forecast")),
    })
    board = engine.board = BuggyBoard(engine.send)
    server = ScalerServer(FrontSettings("127.0.0.1:0", 5.0), ExternalScaler(
        board, first_value_wait_seconds=5.0, stream_check_seconds=0.1))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield pb_grpc.ExternalScalerStub(channel), engine
    finally:
        server.stop(0)


def _ref(name: str) -> pb.ScaledObjectRef:
    return pb.ScaledObjectRef(namespace="shop", name=name, scalerMetadata={
        "serverAddress": "http://prometheus:9090", "query": "sum(rate(x[1m]))",
        "targetValue": "10"})


def test_a_bug_in_the_front_is_unavailable_counted_and_spares_the_healthy_trigger(
    front: tuple[pb_grpc.ExternalScalerStub, EngineSide], caplog: pytest.LogCaptureFixture
) -> None:
    stub, engine = front
    with caplog.at_level(logging.ERROR):
        errors = _keda_calls(stub, _ref(BUGGY))
    _unexpected(errors, {method: _message(f"in {method}") for method in METHODS})
    for method in METHODS:
        _logged(caplog, f"unexpected error in {method}")

    answer = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=_ref("web")), timeout=10)
    assert answer.metricValues[0].metricValueFloat == 3.5
    assert stub.IsActive(_ref("web"), timeout=10).result is True
    unexpected = wait_for(lambda: engine.reported()[1] if sum(engine.reported()[1].values())
                          >= len(METHODS) else None, timeout=10, what="the front's report")
    assert unexpected == Counter(dict.fromkeys(METHODS, 1))
    calls = engine.reported()[0]
    assert {m: calls[m, "UNAVAILABLE"] for m in METHODS} == dict.fromkeys(METHODS, 1)
    assert calls["GetMetrics", "OK"] == 1 and calls["IsActive", "OK"] == 1


def test_a_bug_the_engine_side_reports_ends_a_stream_and_is_counted_in_the_front(
    front: tuple[pb_grpc.ExternalScalerStub, EngineSide],
) -> None:
    stub, engine = front
    # An open stream keeps polling through an outage's UNAVAILABLE; a bug ends it at once.
    _unexpected(_keda_calls(stub, _ref("broken")), _message("reading a target's forecast"))
    unexpected = wait_for(lambda: engine.reported()[1] if sum(engine.reported()[1].values())
                          >= len(METHODS) else None, timeout=10, what="the front's report")
    assert unexpected == Counter(dict.fromkeys(METHODS, 1))
    answer = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=_ref("web")), timeout=10)
    assert answer.metricValues[0].metricValueFloat == 3.5
