"""Load benchmark of the REST API: concurrent clients on GET .../forecast of registered targets.

    .venv/bin/python bench/bench_rest.py [--targets 10] [--clients 8] [--seconds 15]
        [--model seasonal_naive] [--scenarios published,long,decision]

The real service (`forecaster.service.Service`, 127.0.0.1, ports 0) runs in this process over
a real Prometheus (Debian's, backfilled by promtool with `bench_requests{target="0".."N-1"}`,
each a scaled copy of data/aws_elb_request_count_8c0756.csv running from 14 days ago to 2 hours
ahead). The targets are listed in the config, so they are fitted at start-up.

The clients run in processes of their own (one requests.Session each, keep-alive), round-robin
over the targets, for --seconds per scenario:

- `published`: GET .../forecast with the defaults, served from the published snapshot;
- `long`: GET .../forecast?horizon=288&quantiles=0.5,0.9 (a day ahead), predicted from a copy
  of the model once per target and snapshot, then served from the cache; past the 2 slots
  for such predictions the answer is 503 (counted);
- `decision`: GET .../decision, the HPA arithmetic on the served value.

Per scenario: requests per second, latency p50/p99/max (ms) of the 200s, and the statuses.
The load generator shares the machine: the load average is printed with the figures.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import argparse  # noqa: E402
import logging  # noqa: E402
import multiprocessing  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import requests  # noqa: E402

from repo import ROOT  # noqa: E402
from tests.support.waiting import poll  # noqa: E402

TRACE = ROOT / "data" / "aws_elb_request_count_8c0756.csv"
METRIC = "bench_requests"
SCENARIOS = {
    "published": ("/forecast", {}),
    "long": ("/forecast", {"horizon": "288", "quantiles": "0.5,0.9"}),
    "decision": ("/decision", {}),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_history(targets: int, path: Path) -> None:
    """`bench_requests{target="i"}`: the trace times (1 + i / targets), 14 days back to 2 hours
    ahead, a sample a minute (so instant queries always find one)."""
    from tests.support.prometheus import load_trace

    grid = load_trace(TRACE).resample("5min").mean().ffill().bfill()
    end = pd.Timestamp(datetime.now(UTC)).floor("5min") + pd.Timedelta(hours=2)
    grid.index = grid.index - grid.index[-1] + end
    minutes = pd.date_range(grid.index[0], end + pd.Timedelta(minutes=4), freq="1min")
    values = grid.reindex(minutes, method="ffill").to_numpy(dtype=float)
    stamps = (minutes.as_unit("ns").asi8 // 1_000_000_000).tolist()
    with path.open("w", encoding="utf-8") as out:
        out.write(f"# TYPE {METRIC} gauge\n")
        for i in range(targets):
            scaled = np.round(values * (1 + i / targets), 3).tolist()
            prefix = f'{METRIC}{{target="{i}"}}'
            out.write("".join(f"{prefix} {v!r} {t}\n"
                              for t, v in zip(stamps, scaled, strict=True)))
        out.write("# EOF\n")


def client(args: tuple[str, list[str], dict[str, str], float, int]) -> tuple[list[float], dict]:
    """One client process: round-robin GETs for `seconds`; latencies (ms) of 200s, statuses."""
    base, paths, params, seconds, offset = args
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    with requests.Session() as session:
        deadline = time.perf_counter() + seconds
        i = offset
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            response = session.get(f"{base}{paths[i % len(paths)]}", params=params, timeout=60)
            elapsed = (time.perf_counter() - began) * 1000
            statuses[response.status_code] += 1
            if response.status_code == 200:
                latencies.append(elapsed)
            i += 1
    return latencies, dict(statuses)


def run_scenario(
    pool: Any, base: str, ids: list[str], name: str, clients: int, seconds: float
) -> dict[str, Any]:
    suffix, params = SCENARIOS[name]
    paths = [f"/api/v1/targets/{tid}{suffix}" for tid in ids]
    began = time.perf_counter()
    results = pool.map(client, [(base, paths, params, seconds, k) for k in range(clients)])
    wall = time.perf_counter() - began
    latencies = np.concatenate([np.asarray(r[0]) for r in results]) if results else np.empty(0)
    statuses: Counter[int] = Counter()
    for _, counted in results:
        statuses.update(counted)
    total = sum(statuses.values())
    return {
        "scenario": name,
        "requests": total,
        "rps": total / seconds,
        "p50": float(np.percentile(latencies, 50)) if latencies.size else float("nan"),
        "p99": float(np.percentile(latencies, 99)) if latencies.size else float("nan"),
        "max": float(latencies.max()) if latencies.size else float("nan"),
        "statuses": dict(sorted(statuses.items())),
        "wall": wall,
        "load": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--model", default="seasonal_naive")
    parser.add_argument("--scenarios", default="published,long,decision")
    args = parser.parse_args(argv)
    # waitress warns each time a request waits for a thread: that is the load we make.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")

    from forecaster.config import ConfiguredTarget, EngineSettings, Settings
    from forecaster.service import Service
    from forecaster.sources.prometheus import PrometheusServerConfig
    from tests.support.prometheus import PrometheusServer, backfill

    with tempfile.TemporaryDirectory(prefix="bench-rest-") as tmp:
        root = Path(tmp)
        log(f"backfilling {args.targets} series into Prometheus")
        write_history(args.targets, root / "bench.om")
        backfill([root / "bench.om"], root / "blocks")
        with PrometheusServer(blocks_dir=root / "blocks", workdir=root / "prom") as prometheus:
            configured = tuple(
                ConfiguredTarget("bench", f"t{i}", {
                    "serverAddress": prometheus.url,
                    "query": f'sum({METRIC}{{target="{i}"}})',
                    "targetValue": "16.7",
                    "model": args.model,
                    "metricName": "rps",
                })
                for i in range(args.targets)
            )
            settings = Settings(
                engine=EngineSettings(fit_workers=1),
                servers=(PrometheusServerConfig(url=prometheus.url),),
                targets=configured,
                grpc_port=0,
                http_port=0,
                host="127.0.0.1",
            )
            service = Service(settings)
            service.start()
            try:
                ids = [f"bench/t{i}/rps" for i in range(args.targets)]
                began = time.perf_counter()
                if not poll(lambda: all(service.engine.get(tid).snapshot.forecast
                                        is not None for tid in ids), 300, every=0.2):
                    raise SystemExit("targets not fitted within 300 s")
                log(f"{args.targets} targets fitted ({args.model}) in "
                    f"{time.perf_counter() - began:.1f} s")
                base = f"http://127.0.0.1:{service.http_port}"
                context = multiprocessing.get_context("spawn")
                with context.Pool(args.clients) as pool:
                    pool.map(time.sleep, [0.0] * args.clients)  # processes up before timing
                    log("warm-up: 3 s of each scenario, not counted")
                    for name in scenarios:
                        run_scenario(pool, base, ids, name, args.clients, 3.0)
                    rows = []
                    for name in scenarios:
                        log(f"scenario {name}: {args.clients} clients for {args.seconds:g} s")
                        rows.append(run_scenario(pool, base, ids, name, args.clients,
                                                 args.seconds))
            finally:
                service.stop()
    print()
    print(f"{'scenario':<10} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8} {'load':>5}  statuses")
    for row in rows:
        print(f"{row['scenario']:<10} {row['requests']:>9} {row['rps']:>8.0f} {row['p50']:>8.2f} "
              f"{row['p99']:>8.2f} {row['max']:>8.1f} {row['load']:>5.1f}  {row['statuses']}")
    print(f"\n{os.cpu_count()} CPUs; clients run on the same machine; waitress with 8 threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
