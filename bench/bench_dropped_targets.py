"""The engine process's memory across a burst of targets that are then dropped as idle.

    .venv/bin/python bench/bench_dropped_targets.py [--targets 2000] [--warm 20] [--idle 5m]
        [--model seasonal_naive] [--clients 8] [--settle 75] [--source DIR]

A real Prometheus (Debian's, backfilled by promtool) holds one series: 15 days of a daily
wave, a sample a minute, up to two hours ahead. `forecaster serve` runs as a process of its
own on 127.0.0.1 with `targetIdleTimeout: --idle`. Targets are registered as KEDA would
(IsActive over gRPC, one ScaledObject each, every one querying that series: 14 days at 5
minutes, 4,032 points each), asked about every 20 s until every one has its first fit, then
left alone; once /metrics says no target is left, the bench waits `--settle` seconds more.
A first round of `--warm` targets goes through this, so that what a process starts once
for its first targets (fit workers, refresh threads, the HTTP client's pool) is in place;
then the engine process's RSS (VmRSS) is read before, the `--targets` round runs, and RSS is
read after (and every 50 ms between, for the peak). The gRPC front process's RSS is printed
beside it, and the engine's CPU seconds with the load average. The goal: after is within 10%
of before.

`--source DIR` serves from another checkout (e.g. a worktree of an older commit), to measure
the same load before a change: its directory goes first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import requests
from prometheus_client.parser import text_string_to_metric_families

from accounting import children, cpu_seconds, loadavg, rss_mb
from forecaster.durations import parse_duration
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from repo import ROOT
from serving import RssSampler, start_serve, wait_answering
from tests.support.prometheus import (
    PrometheusServer,
    backfill,
    free_port,
    write_openmetrics,
)
from tests.support.waiting import poll

GOAL = 0.10
QUERY = 'sum(bench_requests{job="bench"})'
KEEP_ALIVE_SECONDS = 20.0


def metrics(base: str) -> dict[str, float]:
    """/metrics samples without labels, and the fits by outcome as fits_ok / fits_failed."""
    text = requests.get(f"{base}/metrics", timeout=30).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "forecaster_fits_total":
                found[f"fits_{sample.labels['outcome']}"] = sample.value
            elif not sample.labels:
                found[sample.name] = sample.value
    return found


def prometheus_series(root: Path) -> Path:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    index = pd.date_range(now - timedelta(days=15), now + timedelta(hours=2), freq="1min")
    minutes = np.arange(len(index))
    values = 100 + 50 * np.sin(2 * np.pi * minutes / 1440)
    write_openmetrics(pd.Series(values, index=index), "bench_requests", root / "bench.om",
                      {"job": "bench"})
    backfill([root / "bench.om"], root / "blocks")
    return root / "blocks"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, default=2000)
    parser.add_argument("--warm", type=int, default=20,
                        help="targets registered, fitted and dropped before the burst")
    parser.add_argument("--idle", default="5m", help="targetIdleTimeout")
    parser.add_argument("--model", default="seasonal_naive")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--settle", type=float, default=75.0,
                        help="seconds after the last drop before RSS is read again")
    parser.add_argument("--source", type=Path, default=ROOT)
    args = parser.parse_args()
    idle = parse_duration(args.idle, "--idle")

    with tempfile.TemporaryDirectory() as tmp, PrometheusServer(
        blocks_dir=prometheus_series(Path(tmp)), workdir=Path(tmp) / "prom"
    ) as prometheus:
        http, grpc_port = free_port(), free_port()
        config = Path(tmp) / "config.yaml"
        config.write_text(json.dumps({
            "host": "127.0.0.1", "httpPort": http, "grpcPort": grpc_port, "fitWorkers": 2,
            "targetIdleTimeout": f"{idle}s", "maxTargets": args.targets + 10,
            "prometheus": [{"url": prometheus.url}],
        }))
        server = start_serve(config, args.source)
        base = f"http://127.0.0.1:{http}"
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        try:
            wait_answering(server, f"{base}/readyz")
            (front,) = children(server.pid)
            stub = pb_grpc.ExternalScalerStub(channel)
            codes: dict[str, int] = {}

            def ask(ref: pb.ScaledObjectRef) -> None:
                try:
                    stub.IsActive(ref, timeout=30)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                codes[code] = codes.get(code, 0) + 1

            def burst(prefix: str, count: int) -> tuple[float, float, float]:
                """Register, fit and drop `count` targets: the seconds to register them, to
                fit them all, and from the last call until none is left."""
                refs = [pb.ScaledObjectRef(namespace="bench", name=f"{prefix}-{i}",
                                           scalerMetadata={
                    "serverAddress": prometheus.url, "query": QUERY, "targetValue": "10",
                    "model": args.model}) for i in range(count)]
                fits = metrics(base).get("fits_ok", 0)
                began = time.monotonic()
                with ThreadPoolExecutor(args.clients) as pool:
                    list(pool.map(ask, refs))
                    registered = time.monotonic() - began
                    while metrics(base).get("fits_ok", 0) < fits + count:
                        time.sleep(KEEP_ALIVE_SECONDS)  # KEDA polls every 30 s by default
                        list(pool.map(ask, refs))
                fitted = time.monotonic() - began
                nonlocal with_targets, front_with, cpu_with
                with_targets, front_with = rss_mb(server.pid), rss_mb(front)
                cpu_with = cpu_seconds(server.pid)
                last_ask = time.monotonic()
                poll(lambda: metrics(base).get("forecaster_targets", 1) == 0, idle + 600,
                     every=2)
                time.sleep(args.settle)
                return registered, fitted, time.monotonic() - last_ask - args.settle

            with_targets = front_with = cpu_with = 0.0
            if args.warm:
                burst("warm", args.warm)
            before, front_before = rss_mb(server.pid), rss_mb(front)
            cpu_before = cpu_seconds(server.pid)
            sampler = RssSampler(server.pid)
            sampler.start()
            codes.clear()
            registered, fitted, dropped = burst("app", args.targets)
            after, front_after = rss_mb(server.pid), rss_mb(front)
            cpu_after = cpu_seconds(server.pid)
            final = metrics(base)
            sampler.stop()
        finally:
            channel.close()
            server.terminate()
            server.wait(timeout=30)

    change = (after - before) / before
    print(f"source: {args.source}")
    print(f"{args.targets} targets (model {args.model}, 4,032 points each; {args.warm} before, "
          f"to warm up) registered in {registered:.0f} s, all fitted after {fitted:.0f} s "
          f"(calls: {codes}); dropped as idle "
          f"{dropped:.0f} s after the last call (targetIdleTimeout {args.idle}); fits ok "
          f"{final.get('fits_ok', 0):.0f}, failed {final.get('fits_failed', 0):.0f}")
    print(f"engine process RSS: before {before:.0f} MiB, with the targets {with_targets:.0f} "
          f"MiB, peak {sampler.peak:.0f} MiB, after {after:.0f} MiB ({change:+.1%}; goal "
          f"within {GOAL:.0%}), {args.settle:.0f} s after the last drop")
    print(f"engine process CPU: {cpu_with - cpu_before:.1f} s from before until every target "
          f"was fitted, {cpu_after - cpu_with:.1f} s from then until after; load average "
          f"{loadavg()}")
    print(f"gRPC front process RSS: before {front_before:.0f} MiB, with the targets "
          f"{front_with:.0f} MiB, after {front_after:.0f} MiB")
    return 0 if abs(change) <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
