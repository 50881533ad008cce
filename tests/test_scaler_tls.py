"""The gRPC scaler over TLS and mutual TLS, with certificates made by openssl, called the way
KEDA calls it with a TriggerAuthentication's caCert / tlsClientCert / tlsClientKey."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pandas as pd
import pytest

from forecaster.config import load_settings
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.service import Service

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

# KEDA dials the scalerAddress host; the certificate names it. gRPC checks names, not the IP.
TARGET_NAME = (("grpc.ssl_target_name_override", "localhost"),)
REF = pb.ScaledObjectRef(
    namespace="shop",
    name="web",
    scalerMetadata={
        "serverAddress": "http://prometheus.monitoring:9090",
        "query": "sum(rate(http_requests_total[2m]))",
        "targetValue": "50",
        "scalerAddress": "forecaster.autoscaling:50051",
        "enableTLS": "true",
    },
)


class ConstantSource:
    """A history source that needs no server: the TLS layer is what is under test here."""

    def query_range(
        self, query: str, start: datetime, end: datetime, step_seconds: int
    ) -> pd.Series:
        index = pd.date_range(start, end, freq=pd.Timedelta(seconds=step_seconds))
        return pd.Series(10.0, index=index)

    def query_instant(self, query: str, at: datetime | None = None) -> tuple[datetime, float]:
        return at or datetime.now(UTC), 10.0


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _key_and_csr(name: str, subject: str, cwd: Path) -> None:
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=cwd,
    )


def _sign(name: str, ca: str, extensions: str, cwd: Path) -> None:
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        cwd=cwd,
    )


def _ca(name: str, cwd: Path) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.crt; server.crt/key for localhost and 127.0.0.1; client.crt/key signed by the CA;
    rogue.crt/key, a client signed by another CA (other-ca.crt)."""
    cwd = tmp_path_factory.mktemp("pki")
    _ca("ca", cwd)
    _ca("other-ca", cwd)
    _key_and_csr("server", "/CN=forecaster", cwd)
    _sign(
        "server", "ca",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        cwd,
    )
    client_extensions = (
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=clientAuth\n"
    )
    _key_and_csr("client", "/CN=keda-operator", cwd)
    _sign("client", "ca", client_extensions, cwd)
    _key_and_csr("rogue", "/CN=keda-operator", cwd)
    _sign("rogue", "other-ca", client_extensions, cwd)
    return cwd


def _service(pki: Path, client_ca: bool) -> Iterator[Service]:
    tls = {"certFile": str(pki / "server.crt"), "keyFile": str(pki / "server.key")}
    if client_ca:
        tls["clientCAFile"] = str(pki / "ca.crt")
    settings = load_settings(env={}, overrides={
        "tls": tls, "grpcPort": 0, "httpPort": 0, "host": "127.0.0.1", "refreshInterval": "60s",
    })
    assert settings.tls is not None and (settings.tls.client_ca_file is not None) == client_ca
    service = Service(settings, source=ConstantSource(), fit_pool=ThreadPoolExecutor(1))
    service.start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def tls_service(pki: Path) -> Iterator[Service]:
    yield from _service(pki, client_ca=False)


@pytest.fixture(scope="module")
def mtls_service(pki: Path) -> Iterator[Service]:
    yield from _service(pki, client_ca=True)


def _credentials(
    pki: Path, root: str = "ca", client: str | None = None
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(pki / f"{root}.crt").read_bytes(),
        private_key=(pki / f"{client}.key").read_bytes() if client else None,
        certificate_chain=(pki / f"{client}.crt").read_bytes() if client else None,
    )


def _metric_spec(channel: grpc.Channel) -> pb.GetMetricSpecResponse:
    return pb_grpc.ExternalScalerStub(channel).GetMetricSpec(REF, timeout=10)


def _refused(channel: grpc.Channel) -> grpc.RpcError:
    with channel, pytest.raises(grpc.RpcError) as caught:
        _metric_spec(channel)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    return caught.value


def _address(service: Service) -> str:
    return f"127.0.0.1:{service.grpc_port}"


def test_a_client_trusting_the_ca_is_served_over_tls(tls_service: Service, pki: Path) -> None:
    with grpc.secure_channel(_address(tls_service), _credentials(pki), TARGET_NAME) as channel:
        (spec,) = _metric_spec(channel).metricSpecs
    assert spec.targetSizeFloat == 50.0
    assert spec.metricName.startswith("fc-")


def test_the_certificate_also_names_the_ip_address(tls_service: Service, pki: Path) -> None:
    with grpc.secure_channel(_address(tls_service), _credentials(pki)) as channel:
        assert _metric_spec(channel).metricSpecs


def test_a_plaintext_client_is_refused_by_a_tls_server(tls_service: Service) -> None:
    _refused(grpc.insecure_channel(_address(tls_service)))


def test_a_client_not_trusting_the_ca_refuses_the_server(tls_service: Service, pki: Path) -> None:
    _refused(grpc.secure_channel(_address(tls_service), _credentials(pki, root="other-ca"),
                                 TARGET_NAME))


def test_mutual_tls_serves_a_client_with_a_certificate_the_ca_signed(
    mtls_service: Service, pki: Path
) -> None:
    credentials = _credentials(pki, client="client")
    with grpc.secure_channel(_address(mtls_service), credentials, TARGET_NAME) as channel:
        (spec,) = _metric_spec(channel).metricSpecs
    assert spec.targetSizeFloat == 50.0


@pytest.mark.parametrize("client", [None, "rogue"], ids=["no-certificate", "other-ca"])
def test_mutual_tls_refuses_a_client_without_a_certificate_the_ca_signed(
    mtls_service: Service, pki: Path, client: str | None
) -> None:
    credentials = _credentials(pki, client=client)
    _refused(grpc.secure_channel(_address(mtls_service), credentials, TARGET_NAME))


def test_mutual_tls_refuses_a_plaintext_client(mtls_service: Service) -> None:
    _refused(grpc.insecure_channel(_address(mtls_service)))
