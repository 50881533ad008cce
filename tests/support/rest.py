"""Shared pieces of the REST API tests: a real Prometheus over the bundled trace, settings for
a Service on port 0, and checks of the one JSON error shape."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import requests

from forecaster.config import ApiSettings, ConfiguredTarget, EngineSettings, Settings
from forecaster.sources.prometheus import PrometheusServerConfig
from tests.support.prometheus import backfill, held_each_minute, load_trace, write_openmetrics

TRACE = Path(__file__).parents[2] / "data" / "aws_elb_request_count_8c0756.csv"
STEP = 300
WEB_QUERY = 'sum(web_requests{job="web"})'
MULTI_QUERY = "multi_requests"
NAN_QUERY = 'sum(nan_requests{job="nan"})'
CLOSED_SERVER = "http://127.0.0.1:1"  # configured, but nothing listens there


def live_trace(now: datetime) -> pd.Series:
    """The bundled trace from 14 days ago to 2 hours ahead, held each minute."""
    return held_each_minute(load_trace(TRACE), now)


def make_blocks(root: Path) -> Path:
    """TSDB blocks for `web_requests` (one series), `multi_requests` (two) and `nan_requests`."""
    series = live_trace(datetime.now(UTC))
    files = [root / name for name in ("web.om", "multi_a.om", "multi_b.om", "nan.om")]
    write_openmetrics(series, "web_requests", files[0], {"job": "web"})
    write_openmetrics(series, "multi_requests", files[1], {"instance": "a"})
    write_openmetrics(series / 2, "multi_requests", files[2], {"instance": "b"})
    write_openmetrics(series * np.nan, "nan_requests", files[3], {"job": "nan"})
    backfill(files, root / "blocks")
    return root / "blocks"


def metadata(url: str, **changes: str) -> dict[str, str]:
    """Trigger metadata for the web series, with a fixed metric name so URLs are known."""
    base = {
        "serverAddress": url,
        "query": WEB_QUERY,
        "targetValue": "16.7",
        "model": "holt_winters",
        "startupSeconds": "300",
        "metricName": "web-rps",
    }
    base.update(changes)
    return base


def settings(
    url: str,
    *,
    targets: tuple[ConfiguredTarget, ...] = (),
    api_token: str | None = None,
    metrics_token: str | None = None,
    allow_queries: bool = False,
) -> Settings:
    return Settings(
        engine=EngineSettings(
            refresh_seconds=1.0,
            refit_seconds=3600.0,
            fit_workers=1,
            first_value_wait_seconds=2.0,
        ),
        servers=(
            PrometheusServerConfig(url=url, timeout_seconds=2.0, retries=1),
            PrometheusServerConfig(url=CLOSED_SERVER, timeout_seconds=1.0, retries=0),
        ),
        targets=targets,
        grpc_port=0,
        http_port=0,
        host="127.0.0.1",
        api_token=api_token,
        metrics_token=metrics_token,
        api=ApiSettings(allow_queries=allow_queries),
    )


def _no_constants(name: str) -> Any:
    raise AssertionError(f"the answer holds {name}, which is not JSON")


def strict_json(response: requests.Response) -> Any:
    """The body as JSON, refusing NaN/Infinity (Python's json would accept them)."""
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    return json.loads(response.text, parse_constant=_no_constants)


def error_of(response: requests.Response) -> dict[str, Any] | None:
    """The `error` object if `response` is in the one error shape, else None."""
    try:
        body = strict_json(response)
    except (AssertionError, KeyError, ValueError):
        return None
    if not isinstance(body, dict) or set(body) != {"error"}:
        return None
    error = body["error"]
    if not isinstance(error, dict) or set(error) != {"code", "message", "field"}:
        return None
    if not isinstance(error["code"], str) or not isinstance(error["message"], str):
        return None
    if error["field"] is not None and not isinstance(error["field"], str):
        return None
    if response.status_code == 503 and not response.headers.get("Retry-After", "").isdigit():
        return None
    return error


def assert_error(
    response: requests.Response, status: int, code: str, field: str | None = None
) -> dict[str, Any]:
    """The response is `status` in the one error shape, with `code` (and `field` if given)."""
    assert response.status_code == status, (response.status_code, response.text)
    error = error_of(response)
    assert error is not None, (response.headers, response.text)
    assert error["code"] == code, error
    if field is not None:
        assert error["field"] == field, error
    assert "Traceback" not in response.text
    return error
