"""`forecaster serve` as a process of its own, for the benches that measure it from outside."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import requests

from accounting import rss_mb
from tests.support.waiting import poll


def start_serve(config: Path, source: Path) -> subprocess.Popen[bytes]:
    """`forecaster serve --config CONFIG` from the checkout `source`, with its math libraries
    on one thread each, as the service's own pods run it."""
    env = {**os.environ, "PYTHONPATH": str(source.resolve()),
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "forecaster.cli", "serve", "--config", str(config),
         "--log-level", "WARNING"],
        cwd=source, env=env,
    )


def wait_answering(server: subprocess.Popen[bytes], url: str, timeout: float = 60.0) -> None:
    """Until the probe at `url` answers 200; SystemExit if the service exits first or does
    not answer within `timeout` seconds."""

    def answering() -> bool:
        if server.poll() is not None:
            raise SystemExit(f"the service exited before {url} answered")
        try:
            return requests.get(url, timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    if not poll(answering, timeout, every=0.2):
        raise SystemExit(f"{url} did not answer 200 within {timeout:.0f} s")


class RssSampler(threading.Thread):
    """A process's RSS every 50 ms, and its peak: what a bench reads between its readings."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0.0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid))

    def stop(self) -> None:
        self.stopping.set()
        self.join()
