"""Arbitrary trigger metadata over real gRPC: every answer is OK or a status KEDA can act on,
never UNKNOWN or INTERNAL (a Python exception's text), and never the UNAVAILABLE that an
unexpected error (a bug) gets."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forecaster.config import EngineSettings, Settings
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.service import Service
from forecaster.sources.replay import ReplaySource
from forecaster.spec import METADATA_KEYS

DATA = Path(__file__).parent.parent / "data"
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
VALID = {"serverAddress": "http://replay.demo", "query": "nasa_http_1995_requests_per_minute",
         "targetValue": "10", "model": "naive"}

texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "0", "-1", "1e400", "nan", "inf", "9.3e18", "0.0005", "1e16",
                     "5m", "0s", "999999999999w", "21601", "Mars/Olympus", "auto", "naive",
                     "2026-11-20T10:00Z/2026-11-20T11:00Z", "x" * 9000]),
)
keys = st.sampled_from([*METADATA_KEYS, *(f"{key}FromEnv" for key in METADATA_KEYS), "other"])


@pytest.fixture(scope="module")
def stub() -> Iterator[pb_grpc.ExternalScalerStub]:
    config = Settings(
        engine=EngineSettings(refresh_seconds=3600.0, fit_workers=1, max_targets=20,
                              first_value_wait_seconds=0.5),
        grpc_port=0, http_port=0, host="127.0.0.1",
    )
    service = Service(config, source=ReplaySource.from_folder(DATA),
                      fit_pool=ThreadPoolExecutor(1))
    service.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            yield pb_grpc.ExternalScalerStub(channel)
    finally:
        service.stop()


def _status(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    changes=st.dictionaries(keys, texts, max_size=4),
    drop=st.sets(st.sampled_from(sorted(VALID)), max_size=2),
    namespace=st.sampled_from(["shop", "", "Shop", "a\nb", "s" * 70]),
    name=st.sampled_from(["web", "", "web.v2", "<b>", "w" * 260]),
)
def test_arbitrary_metadata_gets_only_statuses_keda_can_act_on(
    stub: pb_grpc.ExternalScalerStub,
    changes: dict[str, str],
    drop: set[str],
    namespace: str,
    name: str,
) -> None:
    metadata = {k: v for k, v in VALID.items() if k not in drop} | changes
    ref = pb.ScaledObjectRef(namespace=namespace, name=name, scalerMetadata=metadata)
    request = pb.GetMetricsRequest(scaledObjectRef=ref, metricName="")
    for call in (lambda: stub.GetMetricSpec(ref, timeout=5),
                 lambda: stub.GetMetrics(request, timeout=3),
                 lambda: stub.IsActive(ref, timeout=3)):
        code, details = _status(call)
        assert code in ALLOWED, metadata
        assert not details.startswith("unexpected error"), (details, metadata)
