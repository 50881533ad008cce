"""The gRPC server: the external scaler, the standard health service, optional (mutual) TLS."""

from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from forecaster.config import TlsSettings
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.scaler.servicer import ExternalScaler

SERVICE_NAME = "externalscaler.ExternalScaler"
DEFAULT_WORKERS = 64  # each open StreamIsActive holds one; unary calls need the rest


def create_server(
    address: str,
    servicer: ExternalScaler,
    *,
    tls: TlsSettings | None = None,
    max_workers: int = DEFAULT_WORKERS,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Build (not start) a server bound to `address` ("host:port", port 0 picks a free one).

    Returns the server, the bound port and the health servicer (to flip to NOT_SERVING on
    shutdown). With `tls.client_ca_file`, clients must present a certificate it signed, as
    KEDA does with a TriggerAuthentication's tlsClientCert.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=[("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_ExternalScalerServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        credentials = grpc.ssl_server_credentials(
            [(Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes())],
            root_certificates=(
                Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
            ),
            require_client_auth=tls.client_ca_file is not None,
        )
        port = server.add_secure_port(address, credentials)
    return server, port, health_servicer


def stop_gracefully(
    server: grpc.Server, servicer: ExternalScaler, health_servicer: health.HealthServicer,
    grace_seconds: float = 5.0,
) -> None:
    """Report NOT_SERVING, end open streams, and let in-flight calls finish."""
    health_servicer.enter_graceful_shutdown()
    servicer.stopping.set()
    server.stop(grace_seconds).wait()
