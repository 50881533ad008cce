"""The OpenAPI document drives schemathesis against the real service over HTTP: no answer is a
500, every error (every 503 included) is the one JSON shape, and answers match the document.
The service has an apiToken and allows queries, and every call carries the token, so the
fuzzing reaches past the token check (which tests/test_api_security.py tests).

Bounded: a few examples per operation, no shrinking, derandomized, so the run is short and
repeatable (well under a minute on two busy cores).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from forecaster.api.openapi import openapi_document
from forecaster.config import ConfiguredTarget
from forecaster.service import Service
from tests.support.prometheus import PrometheusServer
from tests.support.rest import error_of, make_blocks, metadata
from tests.support.rest import settings as service_settings
from tests.support.waiting import wait_for

MAX_EXAMPLES = 12


@pytest.fixture(scope="module")
def fuzz_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    root = tmp_path_factory.mktemp("fuzz")
    with PrometheusServer(blocks_dir=make_blocks(root), workdir=root / "prom") as server:
        yield server


@pytest.fixture(scope="module")
def fuzz_service(fuzz_prometheus: PrometheusServer) -> Iterator[Service]:
    url = fuzz_prometheus.url
    web = ConfiguredTarget("shop", "web", metadata(url, model="seasonal_naive"))
    service = Service(service_settings(url, targets=(web,), api_token=TOKEN, allow_queries=True))
    service.start()
    try:
        wait_for(lambda: service.engine.get("shop/web/web-rps").snapshot.forecast is not None,
                 timeout=90)
        yield service
    finally:
        service.stop()


PROMETHEUS = "http://prometheus.placeholder:9090"  # swapped for the test server's url
TOKEN = "fuzz-t0ken"


def _aimed(document: dict[str, Any]) -> dict[str, Any]:
    """The document with examples that reach the live target and the configured server, so
    the fuzzing also covers the answers past validation, not only 400s and 404s."""
    live = {"namespace": "shop", "name": "web", "metric": "web-rps"}
    for item in document["paths"].values():
        for parameter in item.get("get", {}).get("parameters", []):
            if parameter["in"] == "path":
                # Only the live target: unknown ones (404) are tested in test_rest_api.py;
                # here the query parameters meet a target with a model behind it.
                parameter["schema"] = {"type": "string", "enum": [live[parameter["name"]]]}
                parameter["example"] = live[parameter["name"]]
    schemas = document["components"]["schemas"]
    schemas["QueryForecastRequest"]["example"] = {
        "serverAddress": PROMETHEUS, "query": 'sum(web_requests{job="web"})',
        "historyWindow": "2d", "model": "holt_winters", "horizon": 24, "quantiles": [0.5, 0.9],
    }
    schemas["SeriesForecastRequest"]["example"] = {
        "series": [{"timestamp": f"2024-05-01T00:{minute:02d}:00Z", "value": minute}
                   for minute in range(0, 60, 5)],
        "step": "5m", "model": "naive", "horizon": 3,
    }
    return document


def _schema() -> Any:
    config = schemathesis.Config()
    config.projects.override.phases.update(phases=["examples", "fuzzing"])
    config.projects.override.generation.update(
        modes=["positive", "negative"], max_examples=MAX_EXAMPLES, no_shrink=True,
        deterministic=True,
        with_security_parameters=False,
    )
    return schemathesis.openapi.from_dict(_aimed(openapi_document()), config=config)


def errors_are_one_json_shape(ctx: CheckContext, response: Any, case: Any) -> bool | None:
    """Every 4xx/5xx is {"error": {code, message, field}}; a 503 also carries Retry-After."""
    if response.status_code < 400:
        return None
    headers = {key: value[0] if isinstance(value, list) else value
               for key, value in response.headers.items()}
    fake = _Answer(response.status_code, headers, response.text)
    if error_of(fake) is None:  # type: ignore[arg-type]
        raise AssertionError(
            f"{response.status_code} is not the JSON error shape (with Retry-After on 503): "
            f"{headers!r} {response.text[:300]!r}"
        )
    return True


class _Answer:
    """The bits of a requests.Response that tests.support.rest.error_of reads."""

    def __init__(self, status: int, headers: dict[str, str], text: str) -> None:
        self.status_code = status
        self.headers = _Headers(headers)
        self.text = text


class _Headers(dict[str, str]):
    def __init__(self, headers: dict[str, str]) -> None:
        super().__init__({key.lower(): value for key, value in headers.items()})

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)


# Built from the static document at import; the service's port is only known in the test.
schema = _schema()


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_api_answers_within_the_document(
    case: Any, fuzz_service: Service, fuzz_prometheus: PrometheusServer
) -> None:
    if isinstance(case.body, dict) and case.body.get("serverAddress") == PROMETHEUS:
        case.body["serverAddress"] = fuzz_prometheus.url
    response = case.call(base_url=f"http://127.0.0.1:{fuzz_service.http_port}", timeout=60,
                         headers={"Authorization": f"Bearer {TOKEN}"}, allow_redirects=False)
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_headers_conformance,
            response_schema_conformance,
            negative_data_rejection,
            errors_are_one_json_shape,
        ],
    )
