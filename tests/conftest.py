"""Fixtures shared across test modules: a real Prometheus holding the bundled AWS ELB trace,
ending now.

The trace is written twice as `demo_requests`: `{job="demo", instance="a"}` with the trace's
values and `{job="demo", instance="b"}` with half of them, so `demo_requests` alone is a
multi-series answer and `sum(demo_requests)` is 1.5 times the trace.

`prometheus_now` and `live` are module-scoped: each module that asks gets its own started
service (tests.support.live).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from tests.support import live
from tests.support.prometheus import (
    PrometheusServer,
    backfill,
    load_trace,
    shift_to_end_at,
    write_openmetrics,
)

TRACE_PATH = Path(__file__).parent.parent / "data" / "aws_elb_request_count_8c0756.csv"
METRIC = "demo_requests"
LABELS_A = {"job": "demo", "instance": "a"}
LABELS_B = {"job": "demo", "instance": "b"}


@pytest.fixture(scope="session")
def demo_trace() -> pd.Series:
    """The trace (instance "a"), shifted so that its last point is now, floored to the minute."""
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    return shift_to_end_at(load_trace(TRACE_PATH), end)


@pytest.fixture(scope="session")
def demo_blocks(demo_trace: pd.Series, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TSDB blocks for both series, made once; servers copy them instead of rerunning promtool."""
    root = tmp_path_factory.mktemp("demo-blocks")
    files = [root / "a.om", root / "b.om"]
    write_openmetrics(demo_trace, METRIC, files[0], LABELS_A)
    write_openmetrics(demo_trace / 2.0, METRIC, files[1], LABELS_B)
    blocks = root / "blocks"
    backfill(files, blocks)
    return blocks


@pytest.fixture(scope="session")
def prometheus(
    demo_blocks: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    """One shared server for the session; tests must not stop it (use `prometheus_fresh`)."""
    server = PrometheusServer(blocks_dir=demo_blocks, workdir=tmp_path_factory.mktemp("prom"))
    with server:
        yield server


@pytest.fixture
def prometheus_fresh(demo_blocks: Path, tmp_path: Path) -> Iterator[PrometheusServer]:
    """A server of the test's own, with the same history, that the test may stop and restart."""
    server = PrometheusServer(blocks_dir=demo_blocks, workdir=tmp_path / "prom")
    with server:
        yield server


@pytest.fixture(scope="module")
def prometheus_now(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """The trace up to two hours ahead (see tests.support.live): a module's own server."""
    with live.prometheus_now(tmp_path_factory.mktemp("telemetry-prom")) as server:
        yield server


@pytest.fixture(scope="module", name="live")
def live_fixture(prometheus_now: PrometheusServer) -> Iterator[live.Live]:
    """A module's own started service with one forecast target (see tests.support.live)."""
    with live.live_service(prometheus_now) as started:
        yield started
