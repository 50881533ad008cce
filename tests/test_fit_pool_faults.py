"""A fit worker killed under the live service: the fit is tried again and lands, the death is
counted in /metrics, and a pool that cannot be rebuilt fails /healthz; the engine's process
killed takes its workers with it. Real worker processes, real HTTP; the bundled trace is
replayed as the source."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import requests

from forecaster.config import ConfiguredTarget, EngineSettings, Settings
from forecaster.fitting import FitPool, spawn_workers
from forecaster.service import Service
from forecaster.sources.replay import ReplaySource
from forecaster.target import Target
from tests.support.processes import assert_child_ends_with_parent, ended
from tests.support.rest import assert_error
from tests.support.waiting import wait_for

ROOT = Path(__file__).parent.parent  # the child imports tests.support from here
DATA = ROOT / "data"
QUERY = "aws_elb_request_count_8c0756"
WEB = ConfiguredTarget(
    namespace="shop", name="web",
    metadata={"serverAddress": "http://replay.demo", "query": QUERY, "targetValue": "10",
              "model": "seasonal_naive"},
)


def _settings() -> Settings:
    return Settings(
        engine=EngineSettings(refresh_seconds=3600.0, refit_seconds=3600.0, fit_workers=1,
                              first_value_wait_seconds=20.0),
        targets=(WEB,), grpc_port=0, http_port=0, host="127.0.0.1",
    )



@contextlib.contextmanager
def started(fit_pool: FitPool) -> Iterator[tuple[Service, str]]:
    service = Service(_settings(), source=ReplaySource.from_folder(DATA), fit_pool=fit_pool)
    service.start()
    try:
        yield service, f"http://127.0.0.1:{service.http_port}"
    finally:
        service.stop()


def the_target(service: Service) -> Target:
    (target,) = service.engine.targets()
    return target


def kill_the_worker_in_flight(service: Service) -> int:
    """kill -9 the worker as soon as the first fit has spawned it (booting, or fitting)."""
    (pid,) = wait_for(service.engine.fits.pids, what="a fit worker", timeout=60)
    assert the_target(service).fits == 0 and the_target(service).fit_pending
    os.kill(pid, signal.SIGKILL)
    return pid


def metric(base: str, line_start: str) -> float:
    text = requests.get(f"{base}/metrics", timeout=10).text
    (line,) = [line for line in text.splitlines() if line.startswith(line_start + " ")]
    return float(line.split()[-1])


def status_of_target(base: str) -> dict[str, Any]:
    (status,) = requests.get(f"{base}/api/v1/targets", timeout=10).json()["targets"]
    return dict(status)


def test_a_worker_killed_in_a_fit_is_replaced_the_fit_lands_and_the_death_is_counted() -> None:
    with started(FitPool(1)) as (service, base):
        killed = kill_the_worker_in_flight(service)
        target = the_target(service)
        wait_for(lambda: target.fits == 1, what="the retried fit", timeout=60)
        assert target.fit_failures == 0 and target.snapshot.forecast is not None
        assert metric(base, "forecaster_fit_worker_deaths_total") == 1.0
        assert metric(base, 'forecaster_fits_total{outcome="ok"}') == 1.0
        assert metric(base, 'forecaster_fits_total{outcome="failed"}') == 0.0
        (replacement,) = service.engine.fits.pids()
        assert replacement != killed and ended(killed)

        service.engine.refit_now(target.target_id)  # later fits work on the new worker
        wait_for(lambda: target.fits == 2, what="a later fit", timeout=60)
        assert service.engine.fits.pids() == [replacement]
        assert requests.get(f"{base}/healthz", timeout=10).status_code == 200
        assert metric(base, "forecaster_fit_worker_deaths_total") == 1.0


class ReplacementsFail:
    """Builds real spawned workers once; every later build fails, as when the process is out
    of file descriptors or the pid limit is reached."""

    def __init__(self) -> None:
        self.builds = 0

    def __call__(self) -> Executor:
        self.builds += 1
        if self.builds > 1:
            raise OSError(24, "Too many open files")
        return spawn_workers(1)


def test_a_pool_that_cannot_be_rebuilt_fails_the_fit_with_its_cause_and_healthz() -> None:
    factory = ReplacementsFail()
    with started(FitPool(1, executor_factory=factory)) as (service, base):
        assert requests.get(f"{base}/healthz", timeout=10).status_code == 200
        killed = kill_the_worker_in_flight(service)
        target = the_target(service)
        wait_for(lambda: target.fit_failures == 1, what="the fit counted as failed", timeout=60)
        status = status_of_target(base)
        assert status["fits"]["failures"] == 1 and status["fits"]["count"] == 0
        error = status["lastError"]
        assert f"fit worker process {killed} was killed by signal 9 (SIGKILL)" in error
        assert "Too many open files" in error

        health = assert_error(requests.get(f"{base}/healthz", timeout=10), 503, "unavailable")
        assert health["message"].startswith("the fit pool cannot start worker processes")
        assert "Too many open files" in health["message"]
        assert metric(base, "forecaster_fit_worker_deaths_total") == 1.0
        assert metric(base, 'forecaster_fits_total{outcome="failed"}') == 1.0
        assert factory.builds == 2


ENGINE = """
import sys, threading
from pathlib import Path
from forecaster.config import EngineSettings
from forecaster.engine import Engine
from forecaster.fitting import FitPool
from forecaster.sources.replay import ReplaySource
from forecaster.spec import TriggerSpec
from tests.support.waiting import wait_for

engine = Engine(EngineSettings(refresh_seconds=3600, fit_workers=1), fit_pool=FitPool(1))
engine.start()
spec = TriggerSpec(server_address="http://replay.demo", query=sys.argv[2], target_value=10.0,
                   model="auto")
engine.ensure_target("shop/web/m", spec, ReplaySource.from_folder(Path(sys.argv[1])))
print(wait_for(engine.fits.pids, timeout=120, what="the fit worker")[0], flush=True)
threading.Event().wait()
"""


def test_killing_the_engines_process_ends_its_fit_worker() -> None:
    assert_child_ends_with_parent([sys.executable, "-c", ENGINE, str(DATA), QUERY],
                                  "the orphaned worker's exit", cwd=ROOT)
