"""The scaler bench's targets: scaled, shifted copies of one trace, from Prometheus or memory."""

from __future__ import annotations

import math
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forecaster.scaler.generated import externalscaler_pb2 as pb
from repo import ROOT

TRACE = ROOT / "data" / "aws_elb_request_count_8c0756.csv"
METRIC = "bench_requests"
STEP = 300
FINE = 60  # resolution of the recent and future samples
HISTORY_SECONDS = 14 * 86_400
FUTURE_SECONDS = 3 * 3600
REPLAY_ADDRESS = "http://replay.invalid:9090"
FALLBACK_SERIES = (100, 10)  # distinct series to try when the backfill of all fails


@dataclass(frozen=True)
class Fleet:
    """`targets` targets over `series` distinct series (scaled, shifted copies of one trace);
    target i reads series i % series, times 1 + i // series."""

    base: np.ndarray  # the trace on its 5-minute grid
    targets: int
    series: int

    @classmethod
    def from_trace(cls, targets: int, series: int) -> Fleet:
        from tests.support.prometheus import load_trace

        grid = load_trace(TRACE).resample(f"{STEP}s").mean().ffill().bfill()
        return cls(grid.to_numpy(dtype=float), targets, min(series, targets))

    def query(self, i: int) -> str:
        selector = f'sum({METRIC}{{target="{i % self.series}"}})'
        factor = 1 + i // self.series
        return selector if factor == 1 else f"{selector} * {factor}"

    def series_values(self, j: int, stamps: np.ndarray) -> np.ndarray:
        """Series j at epoch seconds `stamps`: the 5-minute value holding each stamp."""
        offset = (j * 7 * 12) % self.base.size  # seven hours further along per series
        scale = 0.5 + j / self.series
        return np.round(self.base[(stamps // STEP + offset) % self.base.size] * scale, 3)

    def target_values(self, i: int, stamps: np.ndarray) -> np.ndarray:
        return self.series_values(i % self.series, stamps) * (1 + i // self.series)

    def refs(self, address: str, model: str) -> list[pb.ScaledObjectRef]:
        """Each target's trigger, as KEDA sends it."""
        return [
            pb.ScaledObjectRef(
                namespace="bench",
                name=f"web-{i}",
                scalerMetadata={
                    "scalerAddress": "forecaster.autoscaling:50051",  # KEDA's own key
                    "serverAddress": address,
                    "query": self.query(i),
                    "targetValue": "16.7",
                    "model": model,
                    "step": "5m",
                    "historyWindow": "14d",
                },
            )
            for i in range(self.targets)
        ]


def sample_times(now: float) -> np.ndarray:
    """14 days and an hour at 5 minutes, then each minute from 10 minutes ago to 3 h ahead."""
    aligned = int(now // STEP * STEP)
    switch = aligned - 2 * STEP
    coarse = np.arange(aligned - HISTORY_SECONDS - 3600, switch, STEP, dtype=np.int64)
    fine = np.arange(switch, aligned + FUTURE_SECONDS + 1, FINE, dtype=np.int64)
    return np.concatenate([coarse, fine])


def write_fleet_openmetrics(fleet: Fleet, stamps: np.ndarray, path: Path) -> int:
    """Every series in one OpenMetrics gauge family; returns the number of samples."""
    times = stamps.tolist()
    with path.open("w", encoding="utf-8") as out:
        out.write(f"# TYPE {METRIC} gauge\n")
        for j in range(fleet.series):
            prefix = f'{METRIC}{{target="{j}"}}'
            values = fleet.series_values(j, stamps).tolist()
            out.write("".join(f"{prefix} {v!r} {t}\n" for t, v in zip(times, values, strict=True)))
        out.write("# EOF\n")
    return fleet.series * len(times)


class ReplaySource:
    """The fleet's numbers from memory, with Prometheus's range and instant semantics."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.by_query = {fleet.query(i): i for i in range(fleet.targets)}

    def query_range(
        self, query: str, start: datetime, end: datetime, step_seconds: int
    ) -> pd.Series:
        stamps = np.arange(
            math.ceil(start.timestamp()), int(end.timestamp()) + 1, step_seconds, dtype=np.int64
        )
        values = self.fleet.target_values(self.by_query[query], stamps)
        index = pd.DatetimeIndex(pd.to_datetime(stamps, unit="s", utc=True)).as_unit("ns")
        return pd.Series(values, index=index, name=query)

    def query_instant(self, query: str, at: datetime | None = None) -> tuple[datetime, float]:
        at = at or datetime.now(UTC)
        stamp = np.array([int(at.timestamp())], dtype=np.int64)
        return at, float(self.fleet.target_values(self.by_query[query], stamp)[0])


@dataclass
class History:
    """Where the fleet's history is: a started Prometheus, or a source to inject."""

    fleet: Fleet
    address: str  # the triggers' serverAddress
    source: ReplaySource | None = None  # None: the service queries Prometheus
    prometheus: Any = None  # tests.support.prometheus.PrometheusServer
    notes: list[str] = field(default_factory=list)
    backfill: dict[str, float] | None = None

    def close(self) -> None:
        if self.prometheus is not None:
            self.prometheus.close()


def in_memory(targets: int, series: int) -> History:
    fleet = Fleet.from_trace(targets, series)
    return History(fleet, REPLAY_ADDRESS, ReplaySource(fleet),
                   notes=[f"history from memory (--no-prometheus), {fleet.series} series"])


def backfilled(
    workdir: Path, targets: int, series: int | None, timeout: float,
    log: Callable[[str], None],
) -> History:
    """A Prometheus backfilled with the fleet by promtool, started; with fewer distinct series
    (FALLBACK_SERIES) when the backfill of `series` (default one per target) fails or takes
    longer than `timeout` s."""
    from tests.support.prometheus import PrometheusServer, PrometheusServerError, backfill

    prometheus = PrometheusServer(workdir=workdir / "prometheus")
    stamps = sample_times(time.time())
    tries = [series or targets]
    if series is None:
        tries += [n for n in FALLBACK_SERIES if n < tries[0]]
    notes: list[str] = []
    for count in tries:
        fleet = Fleet.from_trace(targets, count)
        path = workdir / f"{METRIC}.om"
        began = time.perf_counter()
        samples = write_fleet_openmetrics(fleet, stamps, path)
        log(f"wrote {samples:,} samples of {fleet.series} series "
            f"({path.stat().st_size / 2**20:.0f} MB) in {time.perf_counter() - began:.1f} s")
        began = time.perf_counter()
        try:
            run_with_timeout(partial(backfill, [path], prometheus.data_dir), timeout)
        except (PrometheusServerError, subprocess.TimeoutExpired, TimeoutError) as exc:
            took = time.perf_counter() - began
            log(f"backfill of {fleet.series} series failed after {took:.0f} s: {str(exc)[:300]}")
            notes.append(f"backfill of {fleet.series} series failed or was too slow "
                         f"({took:.0f} s); fell back to fewer series")
            shutil.rmtree(prometheus.data_dir, ignore_errors=True)
            continue
        finally:
            path.unlink(missing_ok=True)
        took = time.perf_counter() - began
        log(f"promtool backfilled {fleet.series} series in {took:.1f} s")
        notes.append(f"Prometheus {prometheus_version()}: {fleet.series} distinct series, "
                     f"{samples:,} samples, promtool backfill {took:.0f} s")
        if fleet.series < fleet.targets:
            notes.append(f"{fleet.targets} targets share {fleet.series} series; their queries "
                         "differ by a constant factor (`sum(...) * k`)")
        prometheus.start()
        log(f"Prometheus ready at {prometheus.url}")
        return History(fleet, prometheus.url, None, prometheus, notes,
                       {"series": fleet.series, "samples": samples, "seconds": took})
    prometheus.close()
    raise SystemExit("could not backfill Prometheus at all; try --no-prometheus")


def prometheus_version() -> str:
    done = subprocess.run(["prometheus", "--version"], capture_output=True, check=False,
                          timeout=10)
    words = (done.stdout + done.stderr).decode().split()
    return words[2] if len(words) > 2 else "?"


def run_with_timeout(work: Callable[[], None], timeout: float) -> None:
    """Run `work` in a thread; TimeoutError if it is not done in `timeout` seconds (the
    promtool helper has its own 120 s limit per file; this bounds the whole backfill)."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"backfill still running after {timeout:.0f} s")
    if failure:
        raise failure[0]
