"""The engine process's memory while its Prometheus answers replies far too large.

    .venv/bin/python bench/bench_large_reply.py [--reply-mb 60] [--triggers 4] [--seconds 30]
        [--max-reply-bytes N] [--refresh 5s] [--mb-per-second 0] [--settle 5] [--source DIR]

A misbehaving Prometheus (tests.support.faulty: a thread of this process on 127.0.0.1) answers
every query with a 200 and a valid success body of `--reply-mb` MB, one series per pod as an
unaggregated query returns, streamed in 64 KiB chunks without a Content-Length (at
`--mb-per-second` when set). `forecaster serve` runs as a process of its own with that server
as its one listed `prometheus:` server (`maxReplyBytes: --max-reply-bytes` when given, else
the default of 16 MiB) and `refreshInterval: --refresh`. `--triggers` ScaledObjects are
registered as KEDA does (GetMetricSpec, then GetMetrics and IsActive), and asked again every
second for `--seconds`. The engine process's RSS (VmRSS) is read before (started and idle),
every 50 ms while the calls run (the peak; the kernel's VmHWM beside it, at the end and as it
was before), and after: the server then answers empty results, and `--settle` seconds after
every large reply has ended and each trigger has had an empty one. Printed beside: the calls'
gRPC statuses with the first and last message of each, and how much of each large reply the
server wrote before the service hung up (or the reply ended).
The goal: after within 10% of before. With `--max-reply-bytes` above the reply's size, the
peak is what the cap saves.

`--source DIR` serves from another checkout (e.g. a worktree of an older commit), to measure
the same load before a change: its directory goes first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc

from accounting import children, loadavg, rss_mb
from forecaster.durations import parse_duration
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from repo import ROOT
from serving import RssSampler, start_serve, wait_answering
from tests.support.faulty import EMPTY, LARGE, FaultyPrometheus
from tests.support.prometheus import free_port
from tests.support.waiting import poll

GOAL = 0.10
MB = 1_000_000
ASK_EVERY_SECONDS = 1.0
MESSAGE_CHARS = 400


class Caller:
    """KEDA's calls for each trigger: the statuses by method, and the first and last message
    of each status."""

    def __init__(self, stub: pb_grpc.ExternalScalerStub) -> None:
        self.stub = stub
        self.statuses: Counter[tuple[str, str]] = Counter()
        self.messages: dict[str, list[str]] = {}

    def call(self, method: str, request: object) -> object | None:
        try:
            answer = getattr(self.stub, method)(request, timeout=30)
        except grpc.RpcError as exc:
            code = exc.code().name
            said = self.messages.setdefault(code, [])
            said[1:] = [exc.details() or ""]
            if said[0] == said[-1]:
                del said[1:]
            self.statuses[method, code] += 1
            return None
        self.statuses[method, "OK"] += 1
        return answer

    def ask(self, ref: pb.ScaledObjectRef, metric: str) -> None:
        self.call("GetMetrics", pb.GetMetricsRequest(scaledObjectRef=ref, metricName=metric))
        self.call("IsActive", ref)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reply-mb", type=float, default=60.0)
    parser.add_argument("--triggers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-reply-bytes", type=int, default=None,
                        help="the server's maxReplyBytes (default: the service's, 16 MiB)")
    parser.add_argument("--refresh", default="5s", help="refreshInterval")
    parser.add_argument("--mb-per-second", type=float, default=0.0,
                        help="the server's pace (0: as fast as it can)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds after the last large reply before RSS is read again")
    parser.add_argument("--source", type=Path, default=ROOT)
    args = parser.parse_args()
    refresh = parse_duration(args.refresh, "--refresh")
    load_before = loadavg()

    with tempfile.TemporaryDirectory() as tmp, FaultyPrometheus(
        reply_bytes=int(args.reply_mb * MB), bytes_per_second=args.mb_per_second * MB
    ) as faulty:
        reply_bytes = sum(len(c) for c in faulty.body(matrix=False))  # made before the clock
        listed: dict[str, object] = {"url": faulty.url}
        if args.max_reply_bytes is not None:
            listed["maxReplyBytes"] = args.max_reply_bytes
        http, grpc_port = free_port(), free_port()
        config = Path(tmp) / "config.yaml"
        config.write_text(json.dumps({
            "host": "127.0.0.1", "httpPort": http, "grpcPort": grpc_port, "fitWorkers": 1,
            "refreshInterval": f"{refresh}s", "prometheus": [listed],
        }))
        server = start_serve(config, args.source)
        base = f"http://127.0.0.1:{http}"
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        try:
            wait_answering(server, f"{base}/readyz")
            time.sleep(2)  # settled before the first reading
            (front,) = children(server.pid)
            before, front_before = rss_mb(server.pid), rss_mb(front)
            hwm_before = rss_mb(server.pid, "VmHWM")  # the start-up's own peak
            sampler = RssSampler(server.pid)
            sampler.start()
            caller = Caller(pb_grpc.ExternalScalerStub(channel))
            refs = [pb.ScaledObjectRef(namespace="bench", name=f"app-{i}", scalerMetadata={
                "serverAddress": faulty.url, "targetValue": "10", "model": "seasonal_naive",
                "query": f'rate(http_requests_total{{job="app-{i}"}}[5m])'})
                for i in range(args.triggers)]
            metrics = []
            for ref in refs:
                spec = caller.call("GetMetricSpec", ref)
                metrics.append(spec.metricSpecs[0].metricName if spec is not None else "")
            began = time.monotonic()
            while time.monotonic() - began < args.seconds:
                asked = time.monotonic()
                for ref, metric in zip(refs, metrics, strict=True):
                    caller.ask(ref, metric)
                time.sleep(max(0.0, ASK_EVERY_SECONDS - (time.monotonic() - asked)))
            # Quiet: empty answers from now on; once every large reply has ended and each
            # trigger has been answered empty, the engine holds nothing of the large ones.
            faulty.default = EMPTY
            switched = time.monotonic()
            queries = {ref.scalerMetadata["query"] for ref in refs}

            def quiet() -> bool:
                empty = {r.query for r in faulty.answered(EMPTY) if r.began >= switched}
                return faulty.in_flight() == 0 and queries <= empty

            if not poll(quiet, refresh * 3 + 60, every=0.2):
                raise SystemExit("the large replies did not end, or a trigger was not asked "
                                 "again, within three refresh intervals and a minute")
            time.sleep(args.settle)
            after, front_after = rss_mb(server.pid), rss_mb(front)
            hwm = rss_mb(server.pid, "VmHWM")
            sampler.stop()
        finally:
            channel.close()
            server.terminate()
            server.wait(timeout=30)
        large = faulty.answered(LARGE)

    change = (after - before) / before
    cap = (f"maxReplyBytes {args.max_reply_bytes:,}" if args.max_reply_bytes is not None
           else "maxReplyBytes at its default (16 MiB)")
    print(f"source: {args.source}; load average {load_before} before, {loadavg()} after")
    print(f"{args.triggers} triggers on a server answering {reply_bytes / MB:.1f} MB replies "
          f"({cap}; refreshInterval {args.refresh}; "
          f"{'as fast as it can' if not args.mb_per_second else f'{args.mb_per_second} MB/s'}),"
          f" asked every {ASK_EVERY_SECONDS:g} s for {args.seconds:g} s")
    statuses = ", ".join(f"{method} {code}: {n}" for (method, code), n
                         in sorted(caller.statuses.items()))
    print(f"gRPC statuses: {statuses}")
    for code, said in sorted(caller.messages.items()):
        for which, message in zip(("first", "last"), said, strict=False):
            print(f"  {code}, {which}: {message[:MESSAGE_CHARS]}")
    if large:
        written = [r.written / MB for r in large]
        print(f"large replies: {len(large)}, {sum(r.hung_up for r in large)} hung up on by the "
              f"service; MB written of each before it hung up or the reply ended: min "
              f"{min(written):.1f}, median {statistics.median(written):.1f}, max "
              f"{max(written):.1f} (of {reply_bytes / MB:.1f})")
    print(f"engine process RSS: before {before:.0f} MiB, peak {sampler.peak:.0f} MiB (VmHWM "
          f"{hwm:.0f}; {hwm_before:.0f} before), after {after:.0f} MiB ({change:+.1%}; goal "
          f"within {GOAL:.0%}), {args.settle:g} s after the last large reply")
    print(f"gRPC front process RSS: before {front_before:.0f} MiB, after {front_after:.0f} MiB")
    failed = {code for _, code in caller.statuses} & {"UNKNOWN", "INTERNAL"}
    return 0 if abs(change) <= GOAL and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
