"""The scaler's front process: started, supplied and stopped by the engine's process, and
gone with it. The bundled traces are replayed as the source; calls go over real gRPC."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from forecaster.config import EngineSettings, Settings
from forecaster.errors import InvalidInputError
from forecaster.scaler.bridge import front_command
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.scaler.messages import (
    ANSWERS,
    READY,
    RESOLVE,
    RESOLVED,
    SERVE,
    START,
    Answer,
    Failure,
    FrontSettings,
    Trigger,
)
from forecaster.service import Service
from forecaster.sources.replay import ReplaySource
from tests.support.waiting import wait_for

DATA = Path(__file__).parent.parent / "data"
QUERY = "aws_elb_request_count_8c0756"


def _settings(grpc_port: int = 0) -> Settings:
    return Settings(
        engine=EngineSettings(refresh_seconds=3600.0, fit_workers=1,
                              first_value_wait_seconds=20.0),
        grpc_port=grpc_port, http_port=0, host="127.0.0.1",
    )


@contextlib.contextmanager
def _started(**kwargs: float) -> Iterator[Service]:
    service = Service(_settings(), source=ReplaySource.from_folder(DATA),
                      fit_pool=ThreadPoolExecutor(1), **kwargs)
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def service() -> Iterator[Service]:
    with _started() as service:
        yield service


@pytest.fixture
def quick_to_worry() -> Iterator[Service]:
    """A service whose /healthz calls the front stuck after 2 s of silence (10 s by default)."""
    with _started(front_silence_seconds=2.0) as service:
        yield service


def _request(target_value: str = "10") -> pb.GetMetricsRequest:
    ref = pb.ScaledObjectRef(
        namespace="shop", name="web",
        scalerMetadata={"serverAddress": "http://replay.demo", "query": QUERY,
                        "targetValue": target_value, "model": "seasonal_naive"},
    )
    return pb.GetMetricsRequest(scaledObjectRef=ref)


@contextlib.contextmanager
def _bare_front(
    settings: FrontSettings, log: Path | None = None
) -> Iterator[tuple[Connection, int]]:
    """A front process started as the service starts it, with the test as its engine; its
    log (standard error) goes to `log` when given."""
    ours, theirs = socket.socketpair()
    with theirs, contextlib.ExitStack() as files:
        stderr = files.enter_context(log.open("wb")) if log is not None else None
        front = subprocess.Popen(
            [sys.executable, "-c", front_command(theirs.fileno())],
            pass_fds=(theirs.fileno(),), stderr=stderr,
        )
    connection = Connection(ours.detach())
    try:
        connection.send((START, settings))
        assert connection.poll(30)
        tag, port = connection.recv()
        assert tag == READY
        connection.send((SERVE,))
        wait_for(lambda: _serving(port), timeout=10, every=0.1, what="the front serving")
        yield connection, port
        connection.close()  # as when the engine's process is killed
        assert front.wait(10) == 0
    finally:
        if front.poll() is None:
            front.kill()
            front.wait()


def _serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_front_holds_no_model_or_data_library(service: Service) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        assert pb_grpc.ExternalScalerStub(channel).GetMetrics(_request(), timeout=20)
    maps = Path(f"/proc/{service.scaler.pid}/maps").read_text()
    for library in ("/numpy/", "/pandas/", "/sklearn/", "/statsmodels/", "/scipy/"):
        assert library not in maps, f"the front process loaded {library.strip('/')}"
    assert "/grpc/" in maps  # the check sees the libraries it loads


def test_ctrl_c_to_the_process_group_is_left_to_the_engines_process(service: Service) -> None:
    os.kill(service.scaler.pid, signal.SIGINT)
    os.kill(service.scaler.pid, signal.SIGTERM)
    assert not service.stopped.wait(0.5), "the service stopped: its front took the signals"
    assert _serving(service.grpc_port)


def test_the_service_stops_and_fails_when_the_front_dies(service: Service) -> None:
    os.kill(service.scaler.pid, signal.SIGKILL)
    assert service.stopped.wait(10), "the service did not notice its scaler front died"
    assert service.failed  # run_until_signalled then exits 1, so that the pod restarts


def test_healthz_fails_while_the_front_is_stuck_and_recovers_with_it(
    quick_to_worry: Service,
) -> None:
    service = quick_to_worry
    url = f"http://127.0.0.1:{service.http_port}/healthz"
    assert requests.get(url, timeout=5).json() == {"status": "ok"}

    def failing() -> tuple[requests.Response] | None:  # a tuple: a 503 reply is falsy
        reply = requests.get(url, timeout=5)
        return (reply,) if reply.status_code == 503 else None

    os.kill(service.scaler.pid, signal.SIGSTOP)  # alive, socket open, answering nothing
    try:  # failing within a second past the silence limit (2 s)
        (stuck,) = wait_for(failing, timeout=3.0, every=0.1, what="/healthz failing")
        assert stuck.status_code == 503
        assert "front process has not reported for" in stuck.json()["error"]["message"]
    finally:
        os.kill(service.scaler.pid, signal.SIGCONT)
    wait_for(lambda: requests.get(url, timeout=5).status_code == 200, timeout=10, every=0.2,
             what="/healthz recovering with the front")
    assert not service.stopped.is_set()


def test_healthz_names_a_front_that_exited(service: Service) -> None:
    service.scaler.stop(0)  # the front gone, HTTP still serving (as during a crash's exit)
    reply = requests.get(f"http://127.0.0.1:{service.http_port}/healthz", timeout=5)
    assert reply.status_code == 503
    assert "front process exited" in reply.json()["error"]["message"]


def test_the_front_stops_when_the_engines_process_goes() -> None:
    # _bare_front closes the socket as a killed engine would, and checks the front exits 0
    with _bare_front(FrontSettings("127.0.0.1:0", first_value_wait_seconds=1.0)) as (_, port):
        assert _serving(port)


def test_a_silent_engine_is_unavailable_rather_than_its_last_answers_served() -> None:
    settings = FrontSettings("127.0.0.1:0", first_value_wait_seconds=1.0,
                             engine_silence_seconds=1.0)
    with _bare_front(settings) as (connection, port):
        beating = threading.Event()
        beating.set()

        def engine() -> None:  # answers the one trigger, then beats while `beating` is set
            with contextlib.suppress(EOFError, OSError):
                while True:
                    if connection.poll(0.2):
                        message = connection.recv()
                        if message[0] == RESOLVE:
                            connection.send((RESOLVED, message[1],
                                             Trigger("shop/web/fc-0", "fc-0", 10.0),
                                             Answer(True, 7.0, True)))
                    if beating.is_set():
                        connection.send((ANSWERS, {}))

        threading.Thread(target=engine, daemon=True).start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ExternalScalerStub(channel)
            request = _request()
            assert stub.GetMetrics(request, timeout=5).metricValues[0].metricValueFloat == 7.0
            time.sleep(1.5)  # longer than the silence limit, with heartbeats
            assert stub.GetMetrics(request, timeout=5).metricValues[0].metricValueFloat == 7.0
            beating.clear()
            with pytest.raises(grpc.RpcError) as caught:  # GetMetrics raises once refused
                wait_for(lambda: stub.GetMetrics(request, timeout=5) is None, timeout=1.5,
                         what="the silent engine's answers refused")
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "has not been heard from" in (caught.value.details() or "")


def test_an_edited_then_reverted_trigger_is_served_as_reverted(service: Service) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = pb_grpc.ExternalScalerStub(channel)
        for value in (10.0, 20.0, 10.0):  # the same target id: metricName hashes the query
            request = _request(f"{value:g}")
            (spec,) = stub.GetMetricSpec(request.scaledObjectRef, timeout=10).metricSpecs
            assert spec.targetSizeFloat == value
            stub.GetMetrics(request, timeout=10)  # KEDA's order: GetMetrics resolves the target
            engine_spec = service.engine.get(f"shop/web/{spec.metricName}").spec
            assert engine_spec.target_value == value


def test_a_taken_grpc_port_is_a_clear_error_at_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InvalidInputError) as caught:
            Service(_settings(grpc_port=port), source=ReplaySource.from_folder(DATA),
                    fit_pool=ThreadPoolExecutor(1))
    assert caught.value.field == "grpcPort"
    assert caught.value.reason.startswith(
        f"cannot serve gRPC on 127.0.0.1:{port}: Address already in use")


# -- what KEDA gets around errors: the spec from the metadata alone, answers within deadlines --

def _quiet_engine(connection: Connection, answer: Answer | None) -> threading.Event:
    """Play the engine's process: beat every 0.2 s; resolve each trigger with `answer`, or,
    with None, never resolve anything. Returns the event that stops it."""
    stop = threading.Event()

    def run() -> None:
        with contextlib.suppress(EOFError, OSError):
            while not stop.is_set():
                if connection.poll(0.2):
                    message = connection.recv()
                    if message[0] == RESOLVE and answer is not None:
                        connection.send((RESOLVED, message[1],
                                         Trigger("shop/web/fc-0", "fc-0", 10.0), answer))
                connection.send((ANSWERS, {}))

    threading.Thread(target=run, daemon=True).start()
    return stop


def test_the_metric_spec_is_served_while_the_engine_cannot_resolve_the_trigger() -> None:
    settings = FrontSettings("127.0.0.1:0", first_value_wait_seconds=20.0)
    with _bare_front(settings) as (connection, port):
        stop = _quiet_engine(connection, None)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ExternalScalerStub(channel)
            request = _request("12.5")
            (spec,) = stub.GetMetricSpec(request.scaledObjectRef, timeout=3).metricSpecs
            assert (spec.targetSizeFloat, spec.targetSize) == (12.5, 13)
            assert spec.metricName.startswith("fc-")
            began = time.monotonic()
            for call in (lambda: stub.GetMetrics(request, timeout=3),
                         lambda: stub.IsActive(request.scaledObjectRef, timeout=3)):
                with pytest.raises(grpc.RpcError) as caught:
                    call()
                # within the call's 3 s deadline, with the reason, so KEDA's fallback counts it
                assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
                assert "did not answer" in (caught.value.details() or "")
            assert time.monotonic() - began < 6.0
        stop.set()


def test_a_first_value_wait_ends_within_the_calls_deadline() -> None:
    # The engine resolves the trigger, but the target has no first value yet; the front would
    # wait up to 20 s for it, and KEDA's HPA read gives the call 3 s.
    settings = FrontSettings("127.0.0.1:0", first_value_wait_seconds=20.0)
    waiting = Answer(False, failure=Failure("UNAVAILABLE", "no data yet for target shop/web"))
    with _bare_front(settings) as (connection, port):
        stop = _quiet_engine(connection, waiting)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ExternalScalerStub(channel)
            began = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetMetrics(_request(), timeout=3)
            assert time.monotonic() - began < 3.0
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "no data yet" in (caught.value.details() or "")
        stop.set()


def test_a_metric_name_with_keda_2_5s_trigger_index_is_accepted() -> None:
    settings = FrontSettings("127.0.0.1:0", first_value_wait_seconds=1.0)
    with _bare_front(settings) as (connection, port):
        stop = _quiet_engine(connection, Answer(True, 7.0, True))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ExternalScalerStub(channel)
            request = _request()
            name = stub.GetMetricSpec(request.scaledObjectRef, timeout=5).metricSpecs[0].metricName
            for sent in (name, f"s1-{name}", f"s12-{name}"):
                request.metricName = sent
                assert stub.GetMetrics(request, timeout=5).metricValues[0].metricValueFloat == 7.0
            request.metricName = f"s1-{name}x"
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetMetrics(request, timeout=5)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "metricName" in (caught.value.details() or "")
        stop.set()


def test_stream_metric_spec_is_unimplemented_without_a_traceback(tmp_path: Path) -> None:
    log = tmp_path / "front.log"
    settings = FrontSettings("127.0.0.1:0", first_value_wait_seconds=1.0)
    with (_bare_front(settings, log) as (_, port),
          grpc.insecure_channel(f"127.0.0.1:{port}") as channel):
        stub = pb_grpc.ExternalScalerStub(channel)
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as caught:
                next(stub.StreamMetricSpec(_request().scaledObjectRef, timeout=5))
            assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
            assert "GetMetricSpec" in (caught.value.details() or "")
        assert _serving(port)  # a call after them: their log lines are written by now
        text = log.read_text()  # before the test, as the engine, goes and the front says so
    assert "Traceback" not in text and "ERROR" not in text, text


def test_a_query_from_the_workloads_environment_is_read_as_the_query(service: Service) -> None:
    request = _request()
    metadata = request.scaledObjectRef.scalerMetadata
    metadata["queryFromEnv"] = metadata.pop("query")  # as KEDA sends a resolved queryFromEnv
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = pb_grpc.ExternalScalerStub(channel)
        name = stub.GetMetricSpec(request.scaledObjectRef, timeout=10).metricSpecs[0].metricName
        assert name == stub.GetMetricSpec(_request().scaledObjectRef, timeout=10) \
            .metricSpecs[0].metricName  # the same metric as with `query`
        request.metricName = name
        assert stub.GetMetrics(request, timeout=20).metricValues[0].metricValueFloat > 0
        assert service.engine.get(f"shop/web/{name}").spec.query == QUERY
        metadata["query"] = QUERY  # both: which one is meant?
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetMetrics(request, timeout=10)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = caught.value.details() or ""
        assert "queryFromEnv" in details and "'query'" in details


def test_triggers_that_differ_in_a_setting_never_share_a_target(service: Service) -> None:
    early, late = _request(), _request()
    late.scaledObjectRef.scalerMetadata["startupSeconds"] = "900"
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = pb_grpc.ExternalScalerStub(channel)
        names = []
        for request in (early, late, early, late):
            name = stub.GetMetricSpec(request.scaledObjectRef, timeout=10).metricSpecs[0]
            request.metricName = name.metricName
            stub.GetMetrics(request, timeout=20)
            names.append(name.metricName)
    assert names[0] != names[1] and names[:2] == names[2:]
    specs = {name: service.engine.get(f"shop/web/{name}").spec for name in names[:2]}
    assert [specs[n].startup_seconds for n in names[:2]] == [300, 900]
    assert len(service.engine) == 2


def test_a_load_beyond_int64_is_capped_in_the_integer_field_only() -> None:
    settings = FrontSettings("127.0.0.1:0", first_value_wait_seconds=1.0)
    with _bare_front(settings) as (connection, port):
        stop = _quiet_engine(connection, Answer(True, 1e20, True))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            (value,) = pb_grpc.ExternalScalerStub(channel).GetMetrics(_request(), timeout=5) \
                .metricValues
            assert (value.metricValue, value.metricValueFloat) == (2**63 - 1, 1e20)
        stop.set()


def _reordered(ref: pb.ScaledObjectRef) -> bytes:
    """`ref` on the wire with its metadata entries in another order than this client sends
    them, as Go's client may (its map order is random): protobuf merges concatenated
    messages."""
    head = pb.ScaledObjectRef(namespace=ref.namespace, name=ref.name).SerializeToString()
    for reverse in (False, True):  # of two opposite orders, at most one is the client's
        entries = [pb.ScaledObjectRef(scalerMetadata={key: ref.scalerMetadata[key]})
                   for key in sorted(ref.scalerMetadata, reverse=reverse)]
        wire = head + b"".join(entry.SerializeToString() for entry in entries)
        if wire != ref.SerializeToString():
            return wire
    raise AssertionError("a ref with one metadata entry has one order")


def test_known_triggers_are_served_from_the_latest_answer_in_any_metadata_order() -> None:
    settings = FrontSettings("127.0.0.1:0", first_value_wait_seconds=5.0)
    trigger = Trigger("shop/web/fc-0", "fc-0", 10.0)
    with _bare_front(settings) as (connection, port):
        resolves: list[tuple[object, ...]] = []
        pushes: list[Answer] = []
        stop = threading.Event()

        def engine() -> None:  # resolves every trigger, beats, and sends what `pushes` holds
            with contextlib.suppress(EOFError, OSError):
                while not stop.is_set():
                    if connection.poll(0.1):
                        message = connection.recv()
                        if message[0] == RESOLVE:
                            resolves.append(message)
                            connection.send((RESOLVED, message[1], trigger,
                                             Answer(True, 7.0, True)))
                    connection.send((ANSWERS, {trigger.target_id: pushes.pop()} if pushes
                                     else {}))

        threading.Thread(target=engine, daemon=True).start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ExternalScalerStub(channel)
            request = _request()
            assert stub.GetMetrics(request, timeout=5).metricValues[0].metricValueFloat == 7.0
            is_active = channel.unary_unary(
                "/externalscaler.ExternalScaler/IsActive", request_serializer=None,
                response_deserializer=pb.IsActiveResponse.FromString,
            )
            wire = _reordered(request.scaledObjectRef)
            assert is_active(wire, timeout=5).result is True
            assert stub.GetMetrics(request, timeout=5).metricValues[0].metricValue == 7
            assert len(resolves) == 1  # the reordered ref is the same trigger, known
            pushes.append(Answer(True, 9.5, False))
            wait_for(lambda: stub.GetMetrics(request, timeout=5).metricValues[0]
                     .metricValueFloat == 9.5, timeout=5, what="the pushed answer served")
            (value,) = stub.GetMetrics(request, timeout=5).metricValues
            (spec,) = stub.GetMetricSpec(request.scaledObjectRef, timeout=5).metricSpecs
            assert (value.metricName, value.metricValue) == (spec.metricName, 10)
            assert is_active(wire, timeout=5).result is False
            pushes.append(Answer(False, failure=Failure("UNAVAILABLE", "no data for shop/web")))
            with pytest.raises(grpc.RpcError) as caught:
                wait_for(lambda: stub.GetMetrics(request, timeout=5) is None, timeout=5,
                         what="the failed answer refused")
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            assert caught.value.details() == "no data for shop/web"
        stop.set()
