"""The committed gRPC code matches keda/externalscaler.proto and KEDA's contract."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from forecaster.scaler.generated import externalscaler_pb2, externalscaler_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
GENERATED = Path("forecaster/scaler/generated")
GENERATED_FILES = ["externalscaler_pb2.py", "externalscaler_pb2.pyi", "externalscaler_pb2_grpc.py"]
PROTO = REPO_ROOT / "keda" / "externalscaler.proto"


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_root = tmp_path_factory.mktemp("proto")
    subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "gen_proto.sh"), str(out_root)],
        env={**os.environ, "PYTHON": sys.executable},
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out_root / GENERATED


@pytest.mark.parametrize("name", GENERATED_FILES)
def test_committed_code_is_what_the_script_generates(regenerated: Path, name: str) -> None:
    committed = (REPO_ROOT / GENERATED / name).read_bytes()
    assert (regenerated / name).read_bytes() == committed, (
        f"{GENERATED / name} is stale or hand-edited: run `make proto` and commit the result"
    )


def test_grpc_module_imports_messages_by_package_path() -> None:
    source = (REPO_ROOT / GENERATED / "externalscaler_pb2_grpc.py").read_text()
    assert "from forecaster.scaler.generated import externalscaler_pb2 as" in source


def test_service_has_exactly_the_rpcs_of_the_proto() -> None:
    declared = set(re.findall(r"^\s*rpc\s+(\w+)\s*\(", PROTO.read_text(), flags=re.MULTILINE))
    service = externalscaler_pb2.DESCRIPTOR.services_by_name["ExternalScaler"]
    assert set(service.methods_by_name) == declared
    assert declared == {
        "IsActive",
        "StreamIsActive",
        "GetMetricSpec",
        "GetMetrics",
        "StreamMetricSpec",
    }
    assert service.full_name == "externalscaler.ExternalScaler"
    for rpc in declared:
        assert callable(getattr(externalscaler_pb2_grpc.ExternalScalerServicer, rpc))


@pytest.mark.parametrize(
    ("message", "fields"),
    [
        ("ScaledObjectRef", {"name": 1, "namespace": 2, "scalerMetadata": 3}),
        ("IsActiveResponse", {"result": 1}),
        ("GetMetricSpecResponse", {"metricSpecs": 1}),
        ("MetricSpec", {"metricName": 1, "targetSize": 2, "targetSizeFloat": 3}),
        ("GetMetricsRequest", {"scaledObjectRef": 1, "metricName": 2}),
        ("GetMetricsResponse", {"metricValues": 1}),
        ("MetricValue", {"metricName": 1, "metricValue": 2, "metricValueFloat": 3}),
    ],
)
def test_messages_keep_kedas_field_names_and_numbers(message: str, fields: dict[str, int]) -> None:
    descriptor = externalscaler_pb2.DESCRIPTOR.message_types_by_name[message]
    assert {field.name: field.number for field in descriptor.fields} == fields


def test_metric_values_carry_floats() -> None:
    response = externalscaler_pb2.GetMetricsResponse(
        metricValues=[
            externalscaler_pb2.MetricValue(metricName="fc-x", metricValue=2, metricValueFloat=1.5)
        ]
    )
    decoded = externalscaler_pb2.GetMetricsResponse.FromString(response.SerializeToString())
    assert decoded.metricValues[0].metricValueFloat == 1.5
    spec = externalscaler_pb2.MetricSpec(metricName="fc-x", targetSize=3, targetSizeFloat=2.5)
    assert externalscaler_pb2.MetricSpec.FromString(spec.SerializeToString()).targetSizeFloat == 2.5
