"""Every HTTP error leaves in one JSON shape; our exceptions map to statuses here, and only here.

    {"error": {"code": "invalid_argument", "message": "horizon: must be ...", "field": "horizon"}}

| raised                                   | status | code                |
| ---------------------------------------- | ------ | ------------------- |
| InvalidInputError                        | 400    | invalid_argument    |
| (missing or wrong bearer token)          | 401    | unauthenticated     |
| PermissionDenied (a feature the config turns off) | 403 | permission_denied |
| UnknownTargetError, an unknown route     | 404    | not_found           |
| a known route with another method        | 405    | method_not_allowed  |
| a body over MAX_CONTENT_LENGTH, too many points | 413 | payload_too_large |
| UnsupportedMediaType (a body not sent as JSON) | 415 | unsupported_media_type |
| InsufficientHistoryError, SourceError, other ForecasterError | 422 | unprocessable |
| NotReadyError, SourceUnavailableError, busy | 503 | unavailable (with Retry-After) |
| NotFittedError (a bug here), anything else | 500  | internal (logged; no details leave) |

SourceError is 422, not 502: Prometheus answered, and what it said (several series, none, NaN)
is about the query the caller gave; the caller has to change the query. An unreachable
Prometheus (SourceUnavailableError) is 503: retrying later may help.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, ClassVar

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from forecaster.errors import (
    ForecasterError,
    InvalidInputError,
    NotFittedError,
    NotReadyError,
    SourceError,
    SourceUnavailableError,
    UnknownTargetError,
)

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER_SECONDS = 30

_HTTP_CODES = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    500: "internal",
    503: "unavailable",
}


class ApiError(Exception):
    """An error the HTTP layer raises itself (size limits, busy, auth), with its status."""

    status = 400
    code = "invalid_argument"
    headers: ClassVar[Mapping[str, str]] = {}

    def __init__(
        self, message: str, *, field: str | None = None, retry_after: float | None = None
    ) -> None:
        self.message = message
        self.field = field
        self.retry_after = retry_after
        super().__init__(message)


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class NotFound(ApiError):
    status, code = 404, "not_found"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class Unprocessable(ApiError):
    """Well-formed input that cannot be used (e.g. a series no model can be fitted to)."""

    status, code = 422, "unprocessable"


class Busy(ApiError):
    """Every slot for bounded work is taken; retry after `retry_after` seconds."""

    status, code = 503, "unavailable"


class PermissionDenied(ApiError):
    """The caller may be who it says, but the config does not allow this (e.g. queries)."""

    status, code = 403, "permission_denied"


class Unauthenticated(ApiError):
    status, code = 401, "unauthenticated"
    headers: ClassVar[Mapping[str, str]] = {"WWW-Authenticate": 'Bearer realm="forecaster"'}


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    field: str | None = None,
    retry_after: float | None = None,
) -> Response:
    """The one error shape; a 503 always carries Retry-After."""
    response = jsonify(
        error={"code": code or _HTTP_CODES.get(status, "error"), "message": message,
               "field": field}
    )
    response.status_code = status
    if status == 503 and retry_after is None:
        retry_after = DEFAULT_RETRY_AFTER_SECONDS
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return response


def describe(exc: ForecasterError) -> tuple[int, str | None, float | None]:
    """Status, field and Retry-After seconds for one of our errors."""
    if isinstance(exc, InvalidInputError):
        return 400, exc.field, None
    if isinstance(exc, UnknownTargetError):
        return 404, None, None
    if isinstance(exc, NotReadyError):
        return 503, None, exc.retry_after_seconds
    if isinstance(exc, SourceUnavailableError):
        return 503, None, DEFAULT_RETRY_AFTER_SECONDS
    if isinstance(exc, SourceError):
        return 422, "query", None
    if isinstance(exc, NotFittedError):  # routes only predict from fitted models: a bug
        return 500, None, None
    # InsufficientHistoryError, and any other refusal of well-formed input.
    return 422, None, None


def _internal(exc: Exception) -> Response:
    log.error("unexpected error answering an HTTP request", exc_info=exc)
    return error_response(500, "internal error; see the forecaster logs")


def register_error_handlers(app: Flask) -> None:
    """Route every error of `app` (ours, Flask's, unexpected ones) to `error_response`."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        response = error_response(
            exc.status, exc.message, code=exc.code, field=exc.field, retry_after=exc.retry_after
        )
        response.headers.update(exc.headers)
        return response

    @app.errorhandler(ForecasterError)
    def _forecaster_error(exc: ForecasterError) -> Response:
        status, field, retry_after = describe(exc)
        if status == 500:
            return _internal(exc)
        return error_response(status, str(exc), field=field, retry_after=retry_after)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        if exc.code is None or exc.code < 400:  # redirects (e.g. a trailing slash) stay as they are
            return exc
        methods = getattr(exc, "valid_methods", None) or []
        message = {
            404: "no such route; see /openapi.json for the API",
            405: f"{request.method} is not allowed on {request.path}; it takes "
                 f"{', '.join(methods)}",
            413: "the request body is too large",
        }.get(exc.code, exc.description or exc.name)
        response = error_response(exc.code, message, field="body" if exc.code == 413 else None)
        if exc.code == 405 and methods:
            response.headers["Allow"] = ", ".join(methods)
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        return _internal(exc)
