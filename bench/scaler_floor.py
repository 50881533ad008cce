"""The framework's floor: a do-nothing ExternalScaler on grpc.aio and uvloop, like the front.

Run as a script it prints its port and serves until killed; `FloorServer` starts it so.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc

from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc


class DoNothingScaler(pb_grpc.ExternalScalerServicer):
    """Answers GetMetrics with a constant: what the gRPC framework alone costs."""

    def __init__(self) -> None:
        self.response = pb.GetMetricsResponse(
            metricValues=[pb.MetricValue(metricName="fc-0", metricValue=1, metricValueFloat=1.0)]
        )

    async def GetMetrics(self, request: Any, context: Any) -> pb.GetMetricsResponse:
        return self.response


class FloorServer:
    """The do-nothing servicer in a process of its own, as the service's front is."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())], stdout=subprocess.PIPE
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


def serve() -> None:
    """Print the port, serve until killed."""
    from forecaster.scaler.server import new_event_loop

    async def run() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_ExternalScalerServicer_to_server(DoNothingScaler(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()

    new_event_loop().run_until_complete(run())


if __name__ == "__main__":
    serve()
