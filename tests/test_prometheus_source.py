"""PrometheusSource against a real, backfilled Prometheus (header plumbing against a tiny fake)."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import logging
import math
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import requests
from prometheus_api_client import PrometheusConnect

from forecaster.errors import InvalidInputError, SourceError, SourceUnavailableError
from forecaster.sources.prometheus import (
    MAX_POINTS_PER_REQUEST,
    PrometheusServerConfig,
    PrometheusSource,
    RefusedPointsError,
)
from tests.support.prometheus import PrometheusServer, PrometheusServerError, write_openmetrics

SERIES_A = 'demo_requests{instance="a"}'
TOKEN = "tok-S3CRET-4f9a"
PASSWORD = "pw-S3CRET-77c1"


@pytest.fixture
def source(prometheus: PrometheusServer) -> Iterator[PrometheusSource]:
    with PrometheusSource(PrometheusServerConfig(url=prometheus.url)) as src:
        yield src


def _raw_range(url: str, query: str, start: int, end: int, step: int) -> pd.Series:
    """Reference: the plain HTTP API in small windows of at most 1,000 points."""
    stamps: list[float] = []
    values: list[float] = []
    for lo in range(start, end + 1, 1000 * step):
        hi = min(lo + 999 * step, end)
        answer = requests.get(
            f"{url}/api/v1/query_range",
            params={"query": query, "start": str(lo), "end": str(hi), "step": str(step)},
            timeout=10,
        ).json()
        assert answer["status"] == "success", answer
        for item in answer["data"]["result"]:
            stamps.extend(float(t) for t, _ in item["values"])
            values.extend(float(v) for _, v in item["values"])
    index = pd.to_datetime(np.asarray(stamps), unit="s", utc=True)
    return pd.Series(values, index=index, dtype="float64")


# --- against the real Prometheus -------------------------------------------------------------


def test_range_query_returns_the_backfilled_values(
    source: PrometheusSource, demo_trace: pd.Series
) -> None:
    got = source.query_range(
        SERIES_A, demo_trace.index[0].to_pydatetime(), demo_trace.index[-1].to_pydatetime(), 300
    )
    assert got.name == SERIES_A
    assert got.dtype == np.float64
    assert isinstance(got.index, pd.DatetimeIndex) and str(got.index.tz) == "UTC"
    assert got.index.is_monotonic_increasing and got.index.is_unique
    # Every trace point is there with its value; the few extra points fall in the trace's
    # 10-minute gaps, where Prometheus repeats the previous sample within its 5-minute lookback.
    assert demo_trace.index.isin(got.index).all()
    pd.testing.assert_series_equal(
        got.loc[demo_trace.index],
        demo_trace,
        check_names=False,
        check_index_type=False,
        check_freq=False,
    )
    expected_all = demo_trace.reindex(got.index, method="ffill")
    np.testing.assert_array_equal(got.to_numpy(), expected_all.to_numpy())


@pytest.mark.parametrize(
    ("points", "step"),
    [
        (1, 60),
        (MAX_POINTS_PER_REQUEST - 1, 60),
        (MAX_POINTS_PER_REQUEST, 60),
        (MAX_POINTS_PER_REQUEST + 1, 60),
        (14 * 24 * 60 + 1, 60),  # 14 days at 60 s: 20,161 points, two requests
        (2 * MAX_POINTS_PER_REQUEST + 1, 37),
    ],
)
def test_long_window_is_chunked_without_losing_or_repeating_a_point(
    source: PrometheusSource,
    prometheus: PrometheusServer,
    demo_trace: pd.Series,
    monkeypatch: pytest.MonkeyPatch,
    points: int,
    step: int,
) -> None:
    calls: list[dict[str, Any]] = []
    original = PrometheusConnect.custom_query_range

    def spy(client: PrometheusConnect, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(client, **kwargs)

    monkeypatch.setattr(PrometheusConnect, "custom_query_range", spy)
    end = int(demo_trace.index[-1].timestamp())
    start = end - (points - 1) * step

    got = source.query_range(
        SERIES_A, datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC), step
    )

    # The requests tile the grid: each within the limit, each starting one step after the last.
    assert len(calls) == math.ceil(points / MAX_POINTS_PER_REQUEST)
    bounds = [(int(c["start_time"].timestamp()), int(c["end_time"].timestamp())) for c in calls]
    assert bounds[0][0] == start and bounds[-1][1] == end
    for lo, hi in bounds:
        assert (hi - lo) // step + 1 <= MAX_POINTS_PER_REQUEST
        assert (hi - lo) % step == 0
    for (_, prev_hi), (lo, _) in itertools.pairwise(bounds):
        assert lo == prev_hi + step
    # Same points as the plain API in small windows, each exactly once, on the grid.
    reference = _raw_range(prometheus.url, SERIES_A, start, end, step)
    assert got.index.is_unique and got.index.is_monotonic_increasing
    assert ((pd.DatetimeIndex(got.index).as_unit("s").asi8 - start) % step == 0).all()
    np.testing.assert_array_equal(
        pd.DatetimeIndex(got.index).as_unit("ns").asi8,
        pd.DatetimeIndex(reference.index).as_unit("ns").asi8,
    )
    np.testing.assert_array_equal(got.to_numpy(), reference.to_numpy())
    np.testing.assert_array_equal(
        got.to_numpy(), demo_trace.reindex(got.index, method="ffill").to_numpy()
    )
    if points == 14 * 24 * 60 + 1:
        assert len(got) > MAX_POINTS_PER_REQUEST


def test_sum_aggregates_the_two_series(source: PrometheusSource, demo_trace: pd.Series) -> None:
    got = source.query_range(
        "sum(demo_requests)",
        demo_trace.index[0].to_pydatetime(),
        demo_trace.index[-1].to_pydatetime(),
        300,
    )
    np.testing.assert_allclose(got.loc[demo_trace.index].to_numpy(), 1.5 * demo_trace.to_numpy())


def test_instant_query_at_a_time(source: PrometheusSource, demo_trace: pd.Series) -> None:
    at = demo_trace.index[-3].to_pydatetime()
    stamp, value = source.query_instant("sum(demo_requests)", at)
    assert stamp == at
    assert value == pytest.approx(1.5 * demo_trace.iloc[-3])


def test_instant_query_defaults_to_the_servers_now_and_accepts_scalars(
    source: PrometheusSource,
) -> None:
    before = time.time()
    stamp, value = source.query_instant("time()")
    assert stamp.tzinfo is not None
    assert before - 5 <= value <= time.time() + 5
    assert stamp.timestamp() == pytest.approx(value)


@pytest.mark.parametrize("kind", ["range", "instant"])
def test_several_series_say_to_aggregate(
    source: PrometheusSource, demo_trace: pd.Series, kind: str
) -> None:
    with pytest.raises(SourceError) as caught:
        _ask(source, demo_trace, "demo_requests", kind)
    message = str(caught.value)
    assert "sum(" in message and "2 series" in message
    assert 'instance="a"' in message and 'instance="b"' in message
    assert caught.value.query == "demo_requests"


def test_series_that_change_between_chunks_are_several_series(
    source: PrometheusSource, demo_trace: pd.Series
) -> None:
    step = 60
    end = int(demo_trace.index[-1].timestamp())
    start = end - 14 * 24 * 3600
    switch = start + MAX_POINTS_PER_REQUEST * step  # the first point of the second request
    query = (
        f'(demo_requests{{instance="a"}} and on() (vector(time()) < {switch})) '
        f'or (demo_requests{{instance="b"}} and on() (vector(time()) >= {switch}))'
    )
    with pytest.raises(SourceError, match="2 series"):
        source.query_range(
            query, datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC), step
        )


@pytest.mark.parametrize("kind", ["range", "instant"])
def test_empty_result_names_the_query(
    source: PrometheusSource, demo_trace: pd.Series, kind: str
) -> None:
    query = 'demo_requests{instance="nope"}'
    with pytest.raises(SourceError, match="no data") as caught:
        _ask(source, demo_trace, query, kind)
    assert query in str(caught.value)
    assert caught.value.query == query


@pytest.mark.parametrize("kind", ["range", "instant"])
def test_syntax_error_carries_prometheus_message(
    source: PrometheusSource, demo_trace: pd.Series, kind: str
) -> None:
    with pytest.raises(SourceError, match="HTTP 400") as caught:
        _ask(source, demo_trace, "sum(demo_requests", kind)
    assert "parse error" in str(caught.value)
    assert not isinstance(caught.value, SourceUnavailableError)


class Refusals:
    """What a source reports of the points it refuses: (reason, count) per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, reason: str, count: int) -> None:
        self.calls.append((reason, count))


def _bad_points(trace: pd.Series) -> dict[str, tuple[str, str]]:
    """Queries over SERIES_A whose last 12 points are partly refused: reason and query."""
    middle = float(trace.iloc[-12:].median())  # some points above it, some below
    above = f"({SERIES_A} > bool {middle!r})"  # 1 above the median, 0 at or below it
    return {
        "negative": ("negative", f"{SERIES_A} - {middle!r}"),
        "inf": ("not_finite", f"{SERIES_A} / {above}"),
        "nan": ("not_finite", f"({SERIES_A} - {SERIES_A}) / {above}"),
    }


@pytest.mark.parametrize("kind", ["negative", "inf", "nan"])
def test_a_range_read_refuses_only_its_unusable_points(
    prometheus: PrometheusServer, demo_trace: pd.Series, kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    reason, query = _bad_points(demo_trace)[kind]
    start, end = demo_trace.index[-12], demo_trace.index[-1]
    raw = _raw_range(prometheus.url, query, int(start.timestamp()), int(end.timestamp()), 300)
    usable = np.isfinite(raw.to_numpy()) & (raw.to_numpy() >= 0)
    assert 0 < usable.sum() < raw.size, raw  # the query mixes good and bad points
    refused = Refusals()
    with caplog.at_level(logging.WARNING, logger="forecaster.sources.prometheus"), \
            PrometheusSource(PrometheusServerConfig(url=prometheus.url), refused=refused) as src:
        got = src.query_range(query, start.to_pydatetime(), end.to_pydatetime(), 300)
    # The good points, exactly; the bad ones left out as gaps, never clamped or filled.
    assert got.index.equals(raw.index[usable])
    np.testing.assert_array_equal(got.to_numpy(), raw.to_numpy()[usable])
    assert refused.calls == [(reason, int((~usable).sum()))]
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    first = raw.index[int(np.flatnonzero(~usable)[0])]
    message = record.getMessage()
    assert query[:40] in message and first.strftime("%Y-%m-%dT%H:%M:%S") in message
    shown = {"negative": "-", "inf": "+Inf", "nan": "NaN"}[kind]
    assert f"returned {shown}" in message, message


@pytest.mark.parametrize("kind", ["range", "instant"])
@pytest.mark.parametrize(
    ("query", "reason", "words"),
    [
        ("vector(0) - 13", "negative", ["-13", "negative", "clamp_min"]),
        ("vector(0) / 0", "not_finite", ["NaN", "non-finite"]),
        ("vector(1) / 0", "not_finite", ["+Inf", "non-finite"]),
    ],
)
def test_a_read_with_no_usable_point_is_refused_with_query_and_time(
    prometheus: PrometheusServer, demo_trace: pd.Series, query: str, reason: str,
    words: list[str], kind: str,
) -> None:
    refused = Refusals()
    with PrometheusSource(PrometheusServerConfig(url=prometheus.url), refused=refused) as src, \
            pytest.raises(RefusedPointsError) as caught:
        _ask(src, demo_trace, query, kind)
    message = str(caught.value)
    first = demo_trace.index[-12 if kind == "range" else -1]
    assert query in message and first.strftime("%Y-%m-%dT%H:%M:%S") in message
    for word in words:
        assert word in message
    start, end = int(demo_trace.index[-12].timestamp()), int(demo_trace.index[-1].timestamp())
    points = _raw_range(prometheus.url, query, start, end, 300).size if kind == "range" else 1
    assert refused.calls == [(reason, points)]


def _ask(source: PrometheusSource, trace: pd.Series, query: str, kind: str) -> object:
    if kind == "range":
        return source.query_range(
            query, trace.index[-12].to_pydatetime(), trace.index[-1].to_pydatetime(), 300
        )
    return source.query_instant(query, trace.index[-1].to_pydatetime())


def test_stopped_server_is_unavailable_quickly_and_recovers(
    prometheus_fresh: PrometheusServer, demo_trace: pd.Series
) -> None:
    config = PrometheusServerConfig(url=prometheus_fresh.url, timeout_seconds=2.0, retries=2)
    at = demo_trace.index[-1].to_pydatetime()
    with PrometheusSource(config) as source:
        assert source.query_instant(SERIES_A, at)[1] == demo_trace.iloc[-1]
        prometheus_fresh.stop()
        began = time.monotonic()
        with pytest.raises(SourceUnavailableError) as caught:
            source.query_instant(SERIES_A, at)
        elapsed = time.monotonic() - began
        # Bounded by attempts x timeout plus the backoff (0.25 s + 0.5 s).
        assert elapsed < 3 * 2.0 + 0.75 + 0.5
        assert caught.value.server == prometheus_fresh.url
        assert prometheus_fresh.url in str(caught.value)
        assert "3 attempt" in str(caught.value)
        prometheus_fresh.start()
        assert source.query_instant(SERIES_A, at)[1] == demo_trace.iloc[-1]


# --- header plumbing, retries and timeouts against a tiny fake API ----------------------------


@dataclass
class FakeApi:
    """Answers /api/v1/query[_range] from a script and records each request's headers."""

    url: str = ""
    answers: list[tuple[int, dict[str, Any] | bytes, float]] = field(default_factory=list)
    seen: list[dict[str, str]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    redirect: str | None = None  # answer 302 to this base URL instead

    def answer(
        self, status: int = 200, body: dict[str, Any] | bytes | None = None, delay: float = 0.0
    ) -> None:
        """Script the next answer: a dict is sent as JSON, bytes as they are (an HTML page)."""
        self.answers.append((status, body if body is not None else _vector(), delay))


def _vector() -> dict[str, Any]:
    return {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1700000000, "3"]}]},
    }


def _error(error_type: str, text: str) -> dict[str, Any]:
    return {"status": "error", "errorType": error_type, "error": text}


@pytest.fixture
def fake_api() -> Iterator[FakeApi]:
    api = FakeApi()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            api.seen.append(dict(self.headers.items()))
            api.paths.append(self.path)
            if api.redirect is not None:
                self.send_response(302)
                self.send_header("Location", api.redirect + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            index = min(len(api.seen), len(api.answers)) - 1
            status, body, delay = api.answers[index] if api.answers else (200, _vector(), 0.0)
            if delay:
                api.release.wait(delay)
            if isinstance(body, bytes):
                payload, content_type = body, "text/html"
            else:
                payload, content_type = json.dumps(body).encode(), "application/json"
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:
                pass  # the client gave up (timeout test)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            pass

    server = Server(("127.0.0.1", 0), Handler)
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield api
    finally:
        api.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_a_redirect_is_not_followed_so_credentials_and_headers_stay(fake_api: FakeApi) -> None:
    # The redirect names the same fake under another host name: a followed redirect would
    # show up as a second request.
    fake_api.redirect = fake_api.url.replace("127.0.0.1", "localhost") + "/elsewhere"
    config = PrometheusServerConfig(
        url=fake_api.url, bearer_token=TOKEN, headers={"X-Auth-Token": PASSWORD}, retries=2
    )
    with PrometheusSource(config) as source, pytest.raises(SourceError) as caught:
        source.query_instant("up")
    assert len(fake_api.seen) == 1, "the redirect was followed or retried"
    message = str(caught.value)
    assert "redirect" in message and "localhost" in message and "/elsewhere" in message
    assert TOKEN not in message and PASSWORD not in message


def test_bearer_token_and_extra_headers_are_sent(fake_api: FakeApi) -> None:
    config = PrometheusServerConfig(
        url=fake_api.url, bearer_token=TOKEN, headers={"X-Scope-OrgID": "team-a"}
    )
    with PrometheusSource(config) as source:
        assert source.query_instant("up") == (datetime.fromtimestamp(1700000000, UTC), 3.0)
    assert fake_api.seen[0]["Authorization"] == f"Bearer {TOKEN}"
    assert fake_api.seen[0]["X-Scope-OrgID"] == "team-a"
    assert "timeout=" in fake_api.paths[0]


def test_bearer_token_file_is_reread_at_each_request(fake_api: FakeApi, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    with PrometheusSource(
        PrometheusServerConfig(url=fake_api.url, bearer_token_file=str(token_file))
    ) as source:
        source.query_instant("up")
        token_file.write_text("rotated-token\n")
        source.query_instant("up")
    assert [h["Authorization"] for h in fake_api.seen] == [
        "Bearer first-token",
        "Bearer rotated-token",
    ]


def test_basic_auth_is_sent(fake_api: FakeApi) -> None:
    config = PrometheusServerConfig(url=fake_api.url, basic_auth=("scaler", PASSWORD))
    with PrometheusSource(config) as source:
        source.query_instant("up")
    expected = base64.b64encode(f"scaler:{PASSWORD}".encode()).decode()
    assert fake_api.seen[0]["Authorization"] == f"Basic {expected}"


def test_5xx_is_retried_then_succeeds(fake_api: FakeApi) -> None:
    fake_api.answer(503, _error("unavailable", "overloaded"))
    fake_api.answer(200)
    with PrometheusSource(PrometheusServerConfig(url=fake_api.url, retries=2)) as source:
        assert source.query_instant("up")[1] == 3.0
    assert len(fake_api.seen) == 2


def test_5xx_after_all_retries_is_unavailable(fake_api: FakeApi) -> None:
    fake_api.answer(503, _error("unavailable", "overloaded"))
    with (
        PrometheusSource(PrometheusServerConfig(url=fake_api.url, retries=2)) as source,
        pytest.raises(SourceUnavailableError, match="HTTP 503") as caught,
    ):
        source.query_instant("up")
    assert len(fake_api.seen) == 3
    assert caught.value.server == fake_api.url


def test_4xx_is_not_retried(fake_api: FakeApi) -> None:
    fake_api.answer(422, _error("execution", "query processing would load too many samples"))
    with (
        PrometheusSource(PrometheusServerConfig(url=fake_api.url, retries=2)) as source,
        pytest.raises(SourceError, match="too many samples"),
    ):
        source.query_instant("up")
    assert len(fake_api.seen) == 1


_BAD_GATEWAY = b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n</html>\r\n"


@pytest.mark.parametrize("kind", ["range", "instant"])
@pytest.mark.parametrize(
    ("status", "body", "shown"),
    [
        (
            422,
            _error("execution", "query processing would load too many samples"),
            "execution: query processing would load too many samples",
        ),
        (400, {"status": "error", "error": "bad_data"}, "error: bad_data"),
        (400, {"status": "error"}, """'{"status": "error"}'"""),
        (403, b"<html><body>Forbidden</body></html>", "'<html><body>Forbidden</body></html>'"),
        (404, b"404 page not found\n", "'404 page not found\\n'"),
        (400, b"\xff\xfe not UTF-8", "'\ufffd\ufffd not UTF-8'"),
        (413, b"x" * 300, "'" + "x" * 97 + "..." + "x" * 98 + "'"),
        (204, b"", "''"),
    ],
)
def test_a_refusal_says_the_status_and_prometheus_error_or_the_body(
    fake_api: FakeApi, kind: str, status: int, body: dict[str, Any] | bytes, shown: str
) -> None:
    fake_api.answer(status, body)
    with (
        PrometheusSource(PrometheusServerConfig(url=fake_api.url, retries=2)) as source,
        pytest.raises(SourceError) as caught,
    ):
        if kind == "range":
            source.query_range("up", datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC), 60)
        else:
            source.query_instant("up")
    assert str(caught.value) == (
        f"Prometheus at {fake_api.url} rejected query 'up' (HTTP {status}): {shown}"
    )
    assert not isinstance(caught.value, SourceUnavailableError)
    assert caught.value.query == "up"
    assert len(fake_api.seen) == 1


@pytest.mark.parametrize(
    ("status", "body", "shown"),
    [
        (503, _error("unavailable", "overloaded"), "unavailable: overloaded"),
        (502, _BAD_GATEWAY, repr(_BAD_GATEWAY.decode())),
    ],
)
def test_5xx_says_the_status_and_error_or_body_in_the_log_and_when_giving_up(
    fake_api: FakeApi,
    caplog: pytest.LogCaptureFixture,
    status: int,
    body: dict[str, Any] | bytes,
    shown: str,
) -> None:
    fake_api.answer(status, body)
    with (
        PrometheusSource(PrometheusServerConfig(url=fake_api.url, retries=1)) as source,
        pytest.raises(SourceUnavailableError) as caught,
    ):
        source.query_instant("up")
    assert str(caught.value) == (
        f"Prometheus at {fake_api.url} is unavailable after 2 attempt(s) (timeout 10.0 s each): "
        f"HTTP {status}: {shown}"
    )
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"Prometheus at {fake_api.url} failed (attempt 1 of 2, retrying in 0.25 s): "
        f"HTTP {status}: {shown}"
    ]
    assert len(fake_api.seen) == 2


def test_timeout_is_bounded_by_attempts(fake_api: FakeApi) -> None:
    fake_api.answer(200, delay=5.0)
    config = PrometheusServerConfig(url=fake_api.url, timeout_seconds=0.2, retries=1)
    began = time.monotonic()
    with (
        PrometheusSource(config) as source,
        pytest.raises(SourceUnavailableError, match=r"no answer within 0\.2 s"),
    ):
        source.query_instant("up")
    assert time.monotonic() - began < 2 * 0.2 + 0.25 + 0.75
    assert len(fake_api.seen) == 2


def test_not_a_prometheus_api_is_a_source_error(fake_api: FakeApi) -> None:
    fake_api.answer(200, {"hello": "world"})
    with (
        PrometheusSource(PrometheusServerConfig(url=fake_api.url)) as source,
        pytest.raises(SourceError, match="path prefix"),
    ):
        source.query_instant("up")


def test_a_reply_over_max_reply_bytes_is_refused_at_once(fake_api: FakeApi) -> None:
    fake_api.answer(200, {**_vector(), "padding": "x" * 40_000})
    config = PrometheusServerConfig(url=fake_api.url, max_reply_bytes=16 * 1024, retries=2)
    with PrometheusSource(config) as source, pytest.raises(SourceError) as caught:
        source.query_instant("up")
    assert "more than 16,384 bytes" in str(caught.value) and "maxReplyBytes" in str(caught.value)
    assert not isinstance(caught.value, SourceUnavailableError)
    assert len(fake_api.seen) == 1  # not retried: the same query would answer the same


def test_an_endless_reply_is_refused_while_it_streams() -> None:
    sent = [0]
    stop = threading.Event()

    class Endless(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # no Content-Length: the body ends when the server closes

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            chunk = b'{"status": "success", "data": {"result": [' + b" " * 65_000
            with contextlib.suppress(OSError):
                while not stop.is_set() and sent[0] < 1_000_000_000:
                    self.wfile.write(chunk)
                    sent[0] += len(chunk)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        config = PrometheusServerConfig(url=f"http://127.0.0.1:{server.server_address[1]}",
                                        max_reply_bytes=1024 * 1024, retries=0)
        with PrometheusSource(config) as source, pytest.raises(SourceError, match="maxReplyBytes"):
            source.query_instant("up")
        assert sent[0] < 64 * 1024 * 1024  # stopped near the cap, not at the end of a gigabyte
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- secrets ----------------------------------------------------------------------------------


def _everything_said(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc)


def test_secrets_never_appear_in_errors_logs_or_reprs(
    fake_api: FakeApi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    said: list[str] = []
    configs = [
        PrometheusServerConfig(url=fake_api.url, bearer_token=TOKEN, retries=1),
        PrometheusServerConfig(url=fake_api.url, basic_auth=("scaler", PASSWORD), retries=1),
        PrometheusServerConfig(
            url=fake_api.url, headers={"Authorization": f"Bearer {TOKEN}"}, retries=1
        ),
    ]
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    configs.append(
        PrometheusServerConfig(url=fake_api.url, bearer_token_file=str(token_file), retries=1)
    )
    fake_api.answer(401, _error("unauthorized", "bad credentials"))
    fake_api.answer(503, _error("unavailable", "down"))
    for config in configs:
        said.append(repr(config) + str(config))
        with PrometheusSource(config) as source:
            said.append(repr(source))
            for _ in range(2):  # a 401, then 503s until the retries run out
                with pytest.raises((SourceError, SourceUnavailableError)) as caught:
                    source.query_range(
                        "up", datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC), 60
                    )
                said.append(_everything_said(caught.value))
        fake_api.seen.clear()
    # Unreachable server, and a token file that went missing.
    unreachable = PrometheusServerConfig(url="http://127.0.0.1:9", bearer_token=TOKEN, retries=1)
    with PrometheusSource(unreachable) as source:
        with pytest.raises(SourceUnavailableError) as caught_down:
            source.query_instant("up")
        said.append(_everything_said(caught_down.value))
    token_file.unlink()
    with PrometheusSource(configs[3]) as source:
        with pytest.raises(InvalidInputError, match="bearer_token_file") as caught_file:
            source.query_instant("up")
        said.append(_everything_said(caught_file.value))
    said.append(caplog.text)
    said.extend(str(record.args) for record in caplog.records)

    everything = "\n".join(said)
    assert "Prometheus at" in everything and "401" in everything  # the errors were produced
    assert TOKEN not in everything
    assert PASSWORD not in everything
    assert base64.b64encode(f"scaler:{PASSWORD}".encode()).decode() not in everything


def test_repr_masks_secrets_but_keeps_the_useful_parts() -> None:
    config = PrometheusServerConfig(
        url="https://mimir.example/prometheus/",
        basic_auth=("scaler", PASSWORD),
        headers={"X-Scope-OrgID": "team-a", "X-Api-Key": TOKEN},
    )
    text = repr(config)
    assert PASSWORD not in text and TOKEN not in text
    assert "scaler" in text and "team-a" in text and "https://mimir.example/prometheus" in text


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"url": "prometheus:9090"}, "url"),
        ({"url": f"http://scaler:{PASSWORD}@prometheus:9090"}, "url"),
        ({"url": "http://p:9090", "bearer_token": TOKEN, "basic_auth": ("u", PASSWORD)}, None),
        ({"url": "http://p:9090", "bearer_token": "  "}, "bearer_token"),
        (
            {"url": "http://p:9090", "bearer_token": TOKEN, "headers": {"authorization": "x"}},
            "headers",
        ),
        ({"url": "http://p:9090", "timeout_seconds": 0}, "timeout_seconds"),
        ({"url": "http://p:9090", "retries": -1}, "retries"),
        ({"url": "http://p:9090", "ca_file": "/ca.pem", "insecure_skip_verify": True}, None),
    ],
)
def test_config_refuses_bad_settings(kwargs: dict[str, Any], field_name: str | None) -> None:
    with pytest.raises(InvalidInputError) as caught:
        PrometheusServerConfig(**kwargs)
    if field_name is not None:
        assert caught.value.field == field_name
    assert PASSWORD not in str(caught.value) and TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("start", "end", "step", "field_name"),
    [
        (datetime(2024, 1, 1), datetime(2024, 1, 2, tzinfo=UTC), 60, "start"),
        (datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 2), 60, "end"),
        (datetime(2024, 1, 2, tzinfo=UTC), datetime(2024, 1, 1, tzinfo=UTC), 60, "end"),
        (datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC), 0, "step_seconds"),
    ],
)
def test_range_arguments_are_checked_before_any_request(
    start: datetime, end: datetime, step: int, field_name: str
) -> None:
    with (
        PrometheusSource(PrometheusServerConfig(url="http://127.0.0.1:9")) as source,
        pytest.raises(InvalidInputError) as caught,
    ):
        source.query_range("up", start, end, step)
    assert caught.value.field == field_name


# --- the test helper itself -------------------------------------------------------------------


def test_missing_binaries_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(PrometheusServerError, match="make test"):
        PrometheusServer([])


def test_openmetrics_writer_refuses_unordered_timestamps(tmp_path: Path) -> None:
    index = pd.DatetimeIndex(["2024-01-01T00:05Z", "2024-01-01T00:00Z"])
    with pytest.raises(ValueError, match="strictly increasing"):
        write_openmetrics(pd.Series([1.0, 2.0], index=index), "m", tmp_path / "m.om")


def test_openmetrics_writer_output(tmp_path: Path) -> None:
    index = pd.DatetimeIndex(["2024-01-01T00:00Z", "2024-01-01T00:00:01.5Z"])
    path = tmp_path / "m.om"
    write_openmetrics(pd.Series([1.0, math.nan], index=index), "m", path, {"b": 'x"y', "a": "1"})
    assert path.read_text().splitlines() == [
        "# TYPE m gauge",
        'm{a="1",b="x\\"y"} 1.0 1704067200',
        'm{a="1",b="x\\"y"} NaN 1704067201.500',
        "# EOF",
    ]
