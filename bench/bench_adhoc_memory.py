"""The serving process's memory across large ad-hoc forecasts (POST /api/v1/forecast).

    .venv/bin/python bench/bench_adhoc_memory.py [--forecasts 20] [--points 20000]
        [--clients 2] [--models auto,ensemble,gbm_quantile,mstl,holt_winters_damped]
        [--source DIR]

Runs `forecaster serve` (no Prometheus, no targets) as a process of its own on 127.0.0.1, and
samples its RSS (VmRSS) every 50 ms: before (started and idle), the peak while `--forecasts`
forecasts of `--points` inline 5-minute points run (`--clients` at a time, models in turn,
horizon 2016 steps, five quantiles), and after (the last answer in, 3 s later). The worker
processes' RSS (children of the service, other than the gRPC front) is printed at its peak.
The goal: after is within 10% of before.

`--source DIR` serves from another checkout (e.g. a worktree of an older commit), to measure
the same load before a change: its directory goes first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import requests

from accounting import children, rss_mb
from repo import ROOT
from serving import start_serve, wait_answering
from tests.support.prometheus import free_port

GOAL = 0.10
HORIZON = 2016
QUANTILES = [0.1, 0.5, 0.9, 0.95, 0.99]


def body(points: int, model: str, seed: int) -> bytes:
    steps = np.arange(points)
    noise = np.random.default_rng(seed).normal(0, 5, points)
    values = np.clip(100 + 50 * np.sin(2 * np.pi * steps / 288) + noise, 0, None)
    stamps = pd.date_range("2024-01-01", periods=points, freq="5min", tz="UTC")
    series = [{"timestamp": t.strftime("%Y-%m-%dT%H:%M:%SZ"), "value": round(float(v), 3)}
              for t, v in zip(stamps, values, strict=True)]
    return json.dumps({"series": series, "model": model, "horizon": HORIZON,
                       "quantiles": QUANTILES}).encode()


class Sampler(threading.Thread):
    """RSS of the service and the sum of its workers' every 50 ms; the peaks."""

    def __init__(self, pid: int, front: set[int]) -> None:
        super().__init__(daemon=True)
        self.pid, self.front = pid, front
        self.peak = self.workers_peak = 0.0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid))
            workers = [p for p in children(self.pid) if p not in self.front]
            self.workers_peak = max(self.workers_peak, sum(rss_mb(p) for p in workers))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forecasts", type=int, default=20)
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--models", default="auto,ensemble,gbm_quantile,mstl,holt_winters_damped")
    parser.add_argument("--source", type=Path, default=ROOT)
    args = parser.parse_args()
    models = args.models.split(",")
    bodies = [body(args.points, models[i % len(models)], i) for i in range(args.forecasts)]

    http, grpc = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(json.dumps({"host": "127.0.0.1", "httpPort": http, "grpcPort": grpc,
                                      "fitWorkers": 1}))
        server = start_serve(config, args.source)
        base = f"http://127.0.0.1:{http}"
        try:
            wait_answering(server, f"{base}/healthz")
            time.sleep(2)  # settled before the first reading
            before = rss_mb(server.pid)
            sampler = Sampler(server.pid, set(children(server.pid)))
            sampler.start()
            statuses: Counter[int] = Counter()
            seconds: list[float] = []
            trail: list[float] = []

            def post(data: bytes) -> None:
                while True:
                    began = time.perf_counter()
                    answer = requests.post(f"{base}/api/v1/forecast", data=data, timeout=600,
                                           headers={"Content-Type": "application/json"})
                    statuses[answer.status_code] += 1
                    if answer.status_code != 503:
                        seconds.append(time.perf_counter() - began)
                        trail.append(rss_mb(server.pid))
                        return
                    time.sleep(float(answer.headers.get("Retry-After", "1")))

            began = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(post, bodies))
            wall = time.perf_counter() - began
            time.sleep(3)
            after = rss_mb(server.pid)
            sampler.stopping.set()
            sampler.join()
        finally:
            server.terminate()
            server.wait(timeout=30)

    change = (after - before) / before
    print(f"source: {args.source}")
    print(f"{args.forecasts} forecasts of {args.points} points (models {', '.join(models)}; "
          f"horizon {HORIZON}; {args.clients} at a time) in {wall:.1f} s; per forecast "
          f"median {np.median(seconds):.1f} s, max {max(seconds):.1f} s; statuses "
          f"{dict(sorted(statuses.items()))}")
    print(f"serving process RSS: before {before:.0f} MiB, peak {sampler.peak:.0f} MiB, "
          f"after {after:.0f} MiB ({change:+.1%}; goal within {GOAL:.0%})")
    print("serving process RSS after each answer (MiB): "
          + " ".join(f"{mib:.0f}" for mib in trail))
    print(f"ad-hoc worker processes: peak {sampler.workers_peak:.0f} MiB together")
    return 0 if abs(change) <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
