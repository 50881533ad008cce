"""The README's first steps, as written: `forecaster serve --demo` (what `make run` starts) as a
real process, every `curl` the README shows over real HTTP, and its `grpcurl` request through
a real gRPC client in KEDA's order. A renamed route, a changed metric name or a demo that no
longer serves fails here before a newcomer meets it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests

from forecaster.models.selection import DEFAULT_CANDIDATES
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from tests.support.prometheus import free_port
from tests.support.waiting import wait_for

README = Path(__file__).parent.parent / "README.md"
HTTP_PORT, GRPC_PORT = 8080, 50051  # the README's, replaced by free ones in the test
FIRST_FIT_SECONDS = 120.0  # the README promises about 15 s; a loaded machine is slower


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _curl_paths() -> list[str]:
    """The path of every `curl ... localhost:8080/...` in the README."""
    paths = re.findall(rf"curl [^\n]*localhost:{HTTP_PORT}(/\S*)", _readme())
    assert paths, "the README shows no curl against the demo"
    return paths


def _grpcurl_request() -> tuple[str, dict[str, Any]]:
    """The method and the JSON body of the README's grpcurl example."""
    found = re.search(
        r"grpcurl .*?-d '(?P<body>.*?)'.*?localhost:(?P<port>\d+) (?P<method>\S+)",
        _readme(), re.DOTALL,
    )
    assert found, "the README shows no grpcurl request"
    assert int(found["port"]) == GRPC_PORT
    body = json.loads(found["body"])
    return found["method"], body


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """`forecaster serve --demo` on free ports, ready: (HTTP base URL, gRPC address)."""
    http_port, grpc_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("demo") / "serve.log"
    script = Path(sys.executable).parent / "forecaster"
    with log.open("wb") as out, subprocess.Popen(
        [str(script), "serve", "--demo", "--host", "127.0.0.1",
         "--http-port", str(http_port), "--grpc-port", str(grpc_port)],
        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
             "MKL_NUM_THREADS": "1"},
    ) as process:
        base = f"http://127.0.0.1:{http_port}"

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"serve --demo exited: {log.read_text()}")
            try:
                return requests.get(f"{base}/readyz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        try:
            wait_for(ready, timeout=60, what="the demo to be ready")
            yield base, f"127.0.0.1:{grpc_port}"
        finally:
            process.terminate()
            process.wait(30)


def _forecasting(base: str) -> bool:
    targets = requests.get(f"{base}/api/v1/targets", timeout=5).json()["targets"]
    return bool(targets) and all(t["mode"] == "forecast" for t in targets)


def test_every_curl_in_the_readme_answers(demo: tuple[str, str]) -> None:
    base, _ = demo
    wait_for(lambda: _forecasting(base), timeout=FIRST_FIT_SECONDS,
             what="every demo target to forecast")
    for path in _curl_paths():
        response = requests.get(base + path, timeout=30)
        assert response.status_code == 200, (path, response.text[:300])
        assert response.content, path
        if path.startswith("/api/"):
            kind = response.headers["Content-Type"]
            assert kind.startswith("image/png" if path.endswith(".png") else
                                   "application/json"), (path, kind)


def test_each_demo_target_names_the_model_auto_chose(demo: tuple[str, str]) -> None:
    """The demo's targets ask for `auto`; the API, the page and /metrics say what serves."""
    base, _ = demo
    wait_for(lambda: _forecasting(base), timeout=FIRST_FIT_SECONDS,
             what="every demo target to forecast")
    targets = requests.get(f"{base}/api/v1/targets", timeout=5).json()["targets"]
    metrics = requests.get(f"{base}/metrics", timeout=5).text
    page = requests.get(f"{base}/", timeout=30).text
    for target in targets:
        assert target["requestedModel"] == "auto"
        assert target["model"] in DEFAULT_CANDIDATES, target["model"]
        path = f"{target['namespace']}/{target['name']}/{target['metric']}"
        forecast = requests.get(f"{base}/api/v1/targets/{path}/forecast", timeout=30).json()
        assert forecast["model"] == target["model"]
        assert (f'model="{target["model"]}"' in metrics
                and 'requested_model="auto"' in metrics)
    assert "asked: auto" in page


def test_the_readme_grpc_request_gets_keda_its_metric(demo: tuple[str, str]) -> None:
    _, address = demo
    method, body = _grpcurl_request()
    assert method == "externalscaler.ExternalScaler/GetMetricSpec"
    ref = pb.ScaledObjectRef(
        name=str(body["name"]), namespace=str(body["namespace"]),
        scalerMetadata={str(k): str(v) for k, v in body["scalerMetadata"].items()},
    )
    with grpc.insecure_channel(address) as channel:
        scaler = pb_grpc.ExternalScalerStub(channel)
        spec = scaler.GetMetricSpec(ref, timeout=3).metricSpecs[0]
        # The README's REST paths name the same target by this metric name.
        assert f"/{ref.namespace}/{ref.name}/{spec.metricName}/" in "".join(_curl_paths())
        assert spec.targetSizeFloat == float(ref.scalerMetadata["targetValue"])
        request = pb.GetMetricsRequest(scaledObjectRef=ref, metricName=spec.metricName)
        metrics = scaler.GetMetrics(request, timeout=30).metricValues[0]
        assert metrics.metricName == spec.metricName
        assert metrics.metricValueFloat > 0
        assert scaler.IsActive(ref, timeout=3).result
