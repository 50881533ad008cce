"""History from Prometheus (or Thanos / Mimir / any PromQL HTTP API), one series per query.

Built on `prometheus-api-client`; HTTP errors and `requests`' exceptions stop here and leave as
`SourceError` (the server answered, but not with one clean series) or `SourceUnavailableError`
(it could not be reached after the retries). Credentials never reach a message, repr or log line.
"""

from __future__ import annotations

import json
import logging
import math
import re
import reprlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from types import MappingProxyType, TracebackType
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pandas as pd
import requests
from prometheus_api_client import PrometheusConnect
from requests.auth import AuthBase, HTTPBasicAuth
from urllib3.util.retry import Retry

from forecaster.errors import InvalidInputError, SourceError, SourceUnavailableError
from forecaster.sources import quoted_query

__all__ = [
    "DEFAULT_MAX_CONCURRENT_QUERIES",
    "MAX_CONCURRENT_QUERIES_LIMIT",
    "MAX_POINTS_PER_REQUEST",
    "REFUSED_POINT_REASONS",
    "PrometheusServerConfig",
    "PrometheusSource",
    "RefusedPointsError",
]

_LOG = logging.getLogger(__name__)

# Prometheus refuses a range query whose (end - start) / step exceeds 11,000.
MAX_POINTS_PER_REQUEST = 11_000

_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_MAX_REPLY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_CONCURRENT_QUERIES = 4
MAX_CONCURRENT_QUERIES_LIMIT = 64
_READ_CHUNK_BYTES = 64 * 1024
_BACKOFF_SECONDS = 0.25
_BACKOFF_CAP_SECONDS = 2.0
_SENSITIVE_HEADER = re.compile(r"auth|token|secret|key|cookie|password|credential", re.IGNORECASE)
_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\"()]+")

_short = reprlib.Repr()
_short.maxstring = 200
_short.maxother = 200
_short.maxlist = 5
_short.maxdict = 8


@dataclass(frozen=True)
class PrometheusServerConfig:
    """Where a Prometheus-compatible API lives and how to authenticate to it.

    At most one of `bearer_token`, `bearer_token_file` and `basic_auth` may be set; a token
    file is re-read at every request, so a rotated (e.g. projected service-account) token works::

        PrometheusServerConfig(
            url="https://mimir.example/prometheus",
            bearer_token_file="/var/run/secrets/tokens/prometheus",
            headers={"X-Scope-OrgID": "team-a"},
        )
    """

    url: str
    bearer_token: str | None = None
    bearer_token_file: str | None = None
    basic_auth: tuple[str, str] | None = None
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    ca_file: str | None = None
    insecure_skip_verify: bool = False
    timeout_seconds: float = 10.0
    retries: int = 2
    # A reply larger than this is refused while it arrives: one runaway query must not take
    # the engine's memory (a 60 MB reply peaked at 682 MiB once parsed).
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES
    # Refreshes of this server's targets in flight at once: a hung server holds up only its
    # own targets, never another server's.
    max_concurrent_queries: int = DEFAULT_MAX_CONCURRENT_QUERIES

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidInputError("url", f"must be an http(s) URL with a host, got {self.url!r}")
        if parts.username is not None or parts.password is not None:
            # Said without echoing the URL: it holds the credentials.
            raise InvalidInputError("url", "must not embed credentials; use basic_auth instead")
        if parts.query or parts.fragment:
            raise InvalidInputError("url", f"must not have a query or fragment, got {self.url!r}")
        object.__setattr__(self, "url", self.url.rstrip("/"))
        given = [
            name
            for name in ("bearer_token", "bearer_token_file", "basic_auth")
            if getattr(self, name) is not None
        ]
        if len(given) > 1:
            raise InvalidInputError(given[1], f"set only one of {', '.join(given)}")
        if self.bearer_token is not None and not self.bearer_token.strip():
            raise InvalidInputError("bearer_token", "must not be empty")
        if self.basic_auth is not None and (
            len(self.basic_auth) != 2 or not all(isinstance(p, str) for p in self.basic_auth)
        ):
            raise InvalidInputError("basic_auth", "must be a (username, password) pair of strings")
        headers = dict(self.headers)
        for name, value in headers.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise InvalidInputError("headers", f"names and values must be strings: {name!r}")
            if given and name.lower() == "authorization":
                raise InvalidInputError("headers", f"Authorization conflicts with {given[0]}")
        object.__setattr__(self, "headers", MappingProxyType(headers))
        if self.ca_file is not None and self.insecure_skip_verify:
            raise InvalidInputError("insecure_skip_verify", "conflicts with ca_file; set one")
        if not (isinstance(self.timeout_seconds, int | float) and self.timeout_seconds > 0):
            raise InvalidInputError(
                "timeout_seconds", f"must be a positive number, got {self.timeout_seconds!r}"
            )
        if not isinstance(self.retries, int) or self.retries < 0:
            raise InvalidInputError("retries", f"must be an integer >= 0, got {self.retries!r}")
        if not isinstance(self.max_reply_bytes, int) or self.max_reply_bytes < 1024:
            raise InvalidInputError(
                "max_reply_bytes", f"must be an integer >= 1024, got {self.max_reply_bytes!r}"
            )
        concurrent = self.max_concurrent_queries
        if (isinstance(concurrent, bool) or not isinstance(concurrent, int)
                or not 1 <= concurrent <= MAX_CONCURRENT_QUERIES_LIMIT):
            raise InvalidInputError(
                "max_concurrent_queries",
                f"must be an integer from 1 to {MAX_CONCURRENT_QUERIES_LIMIT}, got {concurrent!r}",
            )

    def __repr__(self) -> str:
        # Secrets are masked, never shown: this repr ends up in logs and error reports.
        headers = {
            name: "***" if _SENSITIVE_HEADER.search(name) else value
            for name, value in self.headers.items()
        }
        basic = None if self.basic_auth is None else (self.basic_auth[0], "***")
        token = None if self.bearer_token is None else "***"
        return (
            f"PrometheusServerConfig(url={self.url!r}, bearer_token={token!r}, "
            f"bearer_token_file={self.bearer_token_file!r}, basic_auth={basic!r}, "
            f"headers={headers!r}, ca_file={self.ca_file!r}, "
            f"insecure_skip_verify={self.insecure_skip_verify!r}, "
            f"timeout_seconds={self.timeout_seconds!r}, retries={self.retries!r}, "
            f"max_reply_bytes={self.max_reply_bytes!r}, "
            f"max_concurrent_queries={self.max_concurrent_queries!r})"
        )


class _BearerAuth(AuthBase):
    """Sets `Authorization: Bearer`, reading the token file at each request (rotation)."""

    def __init__(self, token: str | None, token_file: str | None) -> None:
        self._token = token
        self._token_file = token_file

    def __repr__(self) -> str:
        return f"_BearerAuth(token_file={self._token_file!r})"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        token = self._token
        if self._token_file is not None:
            try:
                with open(self._token_file, encoding="utf-8") as handle:
                    token = handle.read().strip()
            except OSError as exc:
                raise InvalidInputError(
                    "bearer_token_file", f"cannot read {self._token_file!r}: {exc.strerror}"
                ) from exc
            if not token:
                raise InvalidInputError("bearer_token_file", f"{self._token_file!r} is empty")
        request.headers["Authorization"] = f"Bearer {token}"
        return request


def _auth(server: PrometheusServerConfig) -> AuthBase | None:
    if server.basic_auth is not None:
        return HTTPBasicAuth(*server.basic_auth)
    if server.bearer_token is not None or server.bearer_token_file is not None:
        return _BearerAuth(server.bearer_token, server.bearer_token_file)
    return None


def _utc(value: datetime, name: str) -> datetime:
    if not isinstance(value, datetime):
        raise InvalidInputError(name, f"must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInputError(name, f"must be timezone-aware (UTC), got naive {value!r}")
    return value.astimezone(UTC)


def _label_set(metric: Mapping[str, str]) -> str:
    name = metric.get("__name__", "")
    labels = ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items()) if k != "__name__")
    return f"{name}{{{labels}}}"


def _transport_reason(exc: requests.RequestException) -> str:
    # requests' messages hold host, path and PromQL, never headers or auth; keep the root cause.
    errno = _ERRNO.search(str(exc))
    detail = errno.group(0) if errno else _short.repr(str(exc))
    return f"{type(exc).__name__}: {detail}"


def _redirect_target(exc: requests.TooManyRedirects) -> str:
    """Where a redirect pointed: scheme, host and path only (a query string may hold secrets)."""
    location = exc.response.headers.get("Location", "") if exc.response is not None else ""
    if not location:
        return "?"
    parts = urlsplit(location)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return repr(urlunsplit((parts.scheme, host, parts.path, "", "")))


def _format_number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _check_query(query: str) -> str:
    if not isinstance(query, str) or not query.strip():
        raise InvalidInputError(
            "query", f"must be a non-empty PromQL string, got {quoted_query(query)}"
        )
    return query


REFUSED_POINT_REASONS = ("negative", "not_finite")


class RefusedPointsError(SourceError):
    """A read whose every point was refused (negative, NaN or Inf): nothing usable is left."""


def _numbers(query: str, values: list[str]) -> np.ndarray:
    try:
        return np.asarray(values, dtype="float64")
    except (TypeError, ValueError) as exc:
        raise SourceError(
            f"query {quoted_query(query)} returned a non-numeric value: {_short.repr(values)}",
            query=query,
        ) from exc


def _refusals(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The positions of the NaN or infinite values, and of the negative ones."""
    not_finite = ~np.isfinite(array)
    return not_finite, ~not_finite & (array < 0)


def _why(query: str, value: float, stamp: float, count: int, reason: str) -> str:
    """One refused value explained: the query, the value, its time and what to change."""
    if reason == "not_finite":
        return (f"query {quoted_query(query)} returned {_format_number(value)} at {_iso(stamp)} "
                f"({count} non-finite value(s) in all); a scaler must not act on NaN or Inf: "
                f"guard the query, e.g. divide with a non-zero denominator")
    return (f"query {quoted_query(query)} returned {_format_number(value)} at {_iso(stamp)} "
            f"({count} negative value(s) in all); a load cannot be negative: check the query, "
            f"or clamp it with clamp_min(..., 0)")


class _Refused(Exception):
    """A non-200 answer, raised while its status and body are in hand: the client's own
    exception has them only as text."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


class _TooLarge(Exception):
    """A reply over the server's max_reply_bytes, refused before the rest of it was read."""

    def __init__(self, size: int) -> None:
        super().__init__(f"over {size} bytes")
        self.size = size


def _refuse_non_200(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
    """Session response hook that turns a non-200 answer into `_Refused` before the client sees
    it; a redirect passes, for requests to refuse as TooManyRedirects (`max_redirects = 0`)."""
    if response.status_code != 200 and not response.is_redirect:
        raise _Refused(response.status_code, response.content)
    return response


def _read_at_most(limit: int) -> Callable[..., requests.Response]:
    """A session response hook that reads the body itself, in chunks, and raises `_TooLarge`
    as soon as it passes `limit` bytes (decompressed): requests would otherwise hold the whole
    body, however large, before the client parses it. Hooks run before requests reads the
    body, so it is still unread here."""

    def read(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        declared = response.headers.get("Content-Length", "")
        if declared.isdecimal() and int(declared) > limit:
            response.close()
            raise _TooLarge(int(declared))
        body = bytearray()
        for chunk in response.iter_content(_READ_CHUNK_BYTES):
            body += chunk
            if len(body) > limit:
                response.close()
                raise _TooLarge(len(body))
        # requests' own place for a body it has read: the client's response.json() uses it.
        response._content = bytes(body)
        return response

    return read


def _prometheus_message(body: bytes) -> str:
    """Prometheus's own `error` text from a refusal's body, else the body itself, shortened."""
    text = body.decode("utf-8", "replace")
    try:
        payload = json.loads(text)
    except ValueError:
        return _short.repr(text)
    if isinstance(payload, dict) and "error" in payload:
        return f"{payload.get('errorType', 'error')}: {payload['error']}"
    return _short.repr(text)


class PrometheusSource:
    """Reads one series per PromQL query, over as many requests as the 11,000-point limit needs.

    The query must return exactly one series (aggregate with `sum(...)` or `sum by (...)`).
    A negative, NaN or infinite value is refused, because a scaler must not act on it: in a
    range read, that point alone (logged, counted through `refused`, and left out as a missing
    point would be); when no point is left, or in an instant read, RefusedPointsError::

        with PrometheusSource(PrometheusServerConfig(url="http://prometheus:9090")) as source:
            history = source.query_range(
                'sum(rate(http_requests_total{job="api"}[5m]))', start, end, step_seconds=60
            )
    """

    def __init__(
        self, server: PrometheusServerConfig, *,
        refused: Callable[[str, int], None] | None = None,
    ) -> None:
        self.server = server
        self.refused = refused or (lambda reason, count: None)  # told of each read's refusals
        session = requests.Session()
        if server.ca_file is not None:
            session.verify = server.ca_file
        elif server.insecure_skip_verify:
            session.verify = False
        # A redirect would carry the configured headers (X-Scope-OrgID, a token header) to
        # wherever it points: not followed; the error names the target to configure instead.
        session.max_redirects = 0
        session.hooks["response"].append(_refuse_non_200)  # status and body for _call
        session.hooks["response"].append(_read_at_most(server.max_reply_bytes))
        # No transport-level retries: attempts, backoff and error mapping are ours (_call).
        self._client = PrometheusConnect(
            url=server.url,
            headers=dict(server.headers),
            retry=Retry(0, read=False),  # requests' own default: read timeouts stay Timeouts
            auth=_auth(server),
            session=session,
            timeout=server.timeout_seconds,
        )

    def __repr__(self) -> str:
        return f"PrometheusSource(server={self.server!r})"

    def close(self) -> None:
        """Release the HTTP connection pool."""
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def query_range(
        self, query: str, start: datetime, end: datetime, step_seconds: int
    ) -> pd.Series:
        """Evaluate `query` at start, start + step, ... <= end; one float64 series, UTC index.

        `start` is rounded up to a whole second (Prometheus's grid); the window is split into
        requests of at most 11,000 points on that same grid, so no point is lost or repeated.
        """
        query = _check_query(query)
        if isinstance(step_seconds, bool) or not isinstance(step_seconds, int) or step_seconds < 1:
            raise InvalidInputError(
                "step_seconds", f"must be an integer >= 1, got {step_seconds!r}"
            )
        first = math.ceil(_utc(start, "start").timestamp())
        last_allowed = _utc(end, "end").timestamp()
        if last_allowed < first:
            raise InvalidInputError(
                "end", f"must be at or after start rounded up to a second ({start!r}), got {end!r}"
            )
        points = int((last_allowed - first) // step_seconds) + 1
        chunk = MAX_POINTS_PER_REQUEST * step_seconds
        _LOG.debug(
            "query_range %r on %s: %d points of %d s in %d request(s)",
            query,
            self.server.url,
            points,
            step_seconds,
            math.ceil(points / MAX_POINTS_PER_REQUEST),
        )
        series_seen: dict[str, Mapping[str, str]] = {}
        stamps: list[float] = []
        values: list[str] = []
        for chunk_start in range(first, first + points * step_seconds, chunk):
            chunk_end = min(chunk_start + chunk - step_seconds, first + (points - 1) * step_seconds)
            result = self._call(
                query,
                partial(
                    self._client.custom_query_range,
                    query=query,
                    start_time=datetime.fromtimestamp(chunk_start, UTC),
                    end_time=datetime.fromtimestamp(chunk_end, UTC),
                    step=str(step_seconds),
                    params={"timeout": f"{self.server.timeout_seconds:g}"},
                ),
            )
            for item in self._as_series_list(query, result):
                series_seen.setdefault(_label_set(item.get("metric", {})), item.get("metric", {}))
                for stamp, value in item.get("values", []):
                    stamps.append(float(stamp))
                    values.append(value)
        self._one_series(query, list(series_seen.values()))
        # Prometheus timestamps are seconds with millisecond precision; go through integer ms
        # so that float rounding never moves a point off the grid.
        millis = np.round(np.asarray(stamps, dtype="float64") * 1000.0).astype("int64")
        index = pd.DatetimeIndex(
            pd.to_datetime(millis, unit="ms", utc=True), name="timestamp"
        ).as_unit("ns")
        array = _numbers(query, values)
        series = pd.Series(array, index=index, name=query)
        if not (series.index.is_monotonic_increasing and series.index.is_unique):
            raise SourceError(
                f"Prometheus at {self.server.url} returned timestamps out of order or repeated "
                f"for query {quoted_query(query)}",
                query=query,
            )
        not_finite, negative = _refusals(array)
        bad = not_finite | negative
        if not bad.any():
            return series
        # A rate below zero or a NaN is a broken point, never a load to plan for: it is left
        # out, as a point Prometheus did not have would be, and the good ones are kept.
        first = int(np.flatnonzero(bad)[0])
        reason = "not_finite" if not_finite[first] else "negative"
        counts = {"not_finite": int(not_finite.sum()), "negative": int(negative.sum())}
        for name, count in counts.items():
            if count:
                self.refused(name, count)
        why = _why(query, float(array[first]), stamps[first], counts[reason], reason)
        if bad.all():  # nothing usable: an error, like a read with no data, for the caller
            raise RefusedPointsError(why, query=query)
        _LOG.warning("%s; %d point(s) of %d refused and left out", why, int(bad.sum()),
                     array.size)
        return series[~bad]

    def query_instant(self, query: str, at: datetime | None = None) -> tuple[datetime, float]:
        """Evaluate `query` once (at `at`, or the server's now): its timestamp and value."""
        query = _check_query(query)
        params = {"timeout": f"{self.server.timeout_seconds:g}"}
        if at is not None:
            params["time"] = f"{_utc(at, 'at').timestamp():.3f}"
        result = self._call(query, partial(self._client.custom_query, query=query, params=params))
        if (
            isinstance(result, list) and len(result) == 2 and not isinstance(result[0], dict)
        ):  # a scalar (or string) result is [time, "value"], not a list of series
            stamp, value = result
        else:
            items = self._as_series_list(query, result)
            self._one_series(query, [item.get("metric", {}) for item in items])
            try:
                stamp, value = items[0]["value"]
            except (KeyError, TypeError, ValueError) as exc:
                raise SourceError(
                    f"Prometheus at {self.server.url} answered query {quoted_query(query)} with a "
                    f"{'range' if 'values' in items[0] else 'malformed'} result, not an instant "
                    f"vector: {_short.repr(items[0])}",
                    query=query,
                ) from exc
        number = float(_numbers(query, [value])[0])
        not_finite, negative = _refusals(np.asarray([number]))
        if not_finite[0] or negative[0]:  # the current value: nothing to plan on without it
            reason = "not_finite" if not_finite[0] else "negative"
            self.refused(reason, 1)
            raise RefusedPointsError(_why(query, number, float(stamp), 1, reason), query=query)
        return datetime.fromtimestamp(float(stamp), UTC), number

    def _call(self, query: str, request: Callable[[], Any]) -> Any:
        """One API call, retried on transport errors and 5xx; errors mapped to ours."""
        attempts = self.server.retries + 1
        reason = ""
        for attempt in range(1, attempts + 1):
            try:
                return request()
            except _Refused as exc:
                message = _prometheus_message(exc.body)
                if exc.status not in _RETRYABLE_STATUS:
                    raise SourceError(
                        f"Prometheus at {self.server.url} rejected query {quoted_query(query)} "
                        f"(HTTP {exc.status}): {message}",
                        query=query,
                    ) from exc
                reason = f"HTTP {exc.status}: {message}"
                last_exc: Exception = exc
            except _TooLarge as exc:
                raise SourceError(
                    f"Prometheus at {self.server.url} answered query {quoted_query(query)} with "
                    f"more than {self.server.max_reply_bytes:,} bytes (the server's "
                    f"maxReplyBytes); aggregate the query to one series, or raise maxReplyBytes",
                    query=query,
                ) from exc
            except requests.Timeout as exc:
                reason = f"no answer within {self.server.timeout_seconds} s"
                last_exc = exc
            except requests.TooManyRedirects as exc:
                raise SourceError(
                    f"Prometheus at {self.server.url} answered query {quoted_query(query)} with a "
                    f"redirect to {_redirect_target(exc)}; redirects are not followed, so that "
                    f"credentials and headers stay with the configured server: configure the "
                    f"URL it redirects to",
                    query=query,
                ) from exc
            except requests.JSONDecodeError as exc:
                raise SourceError(
                    f"{self.server.url} did not answer query {quoted_query(query)} like a "
                    f"Prometheus API (a 200 without JSON); check the URL and its path prefix",
                    query=query,
                ) from exc
            except requests.RequestException as exc:
                reason = _transport_reason(exc)
                last_exc = exc
            except (KeyError, TypeError) as exc:
                raise SourceError(
                    f"{self.server.url} answered query {quoted_query(query)} without data.result; "
                    f"check the URL and its path prefix",
                    query=query,
                ) from exc
            if attempt < attempts:
                delay = min(_BACKOFF_SECONDS * 2 ** (attempt - 1), _BACKOFF_CAP_SECONDS)
                _LOG.warning(
                    "Prometheus at %s failed (attempt %d of %d, retrying in %.2f s): %s",
                    self.server.url,
                    attempt,
                    attempts,
                    delay,
                    reason,
                )
                time.sleep(delay)
        raise SourceUnavailableError(
            f"Prometheus at {self.server.url} is unavailable after {attempts} attempt(s) "
            f"(timeout {self.server.timeout_seconds} s each): {reason}",
            server=self.server.url,
        ) from last_exc

    def _as_series_list(self, query: str, result: Any) -> list[dict[str, Any]]:
        if not isinstance(result, list) or not all(isinstance(item, dict) for item in result):
            raise SourceError(
                f"Prometheus at {self.server.url} answered query {quoted_query(query)} with an "
                f"unexpected result: {_short.repr(result)}",
                query=query,
            )
        return result

    def _one_series(self, query: str, metrics: list[Mapping[str, str]]) -> None:
        if not metrics:
            raise SourceError(
                f"query {quoted_query(query)} returned no data from Prometheus at "
                f"{self.server.url}: check the metric name and label matchers, and that the "
                f"window holds samples",
                query=query,
            )
        if len(metrics) > 1:
            labels = _short.repr([_label_set(m) for m in metrics])
            raise SourceError(
                f"query {quoted_query(query)} returned {len(metrics)} series, expected one: "
                f"aggregate it, e.g. sum(...) or sum by (...) with a matcher; series: {labels}",
                query=query,
            )
