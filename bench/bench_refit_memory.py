"""What refit rounds leave in the engine's memory, in process, the engine's threads apart.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/bench_refit_memory.py \
        [--targets 300] [--rounds 3] [--bins 12] [--arenas N] [--one-thread]

The process runs as `forecaster serve` runs the engine: on the C allocator (it executes itself
again with PYTHONMALLOC=malloc unless that is set) with glibc's arenas and mmap threshold fixed
(`forecaster.fitting.limit_malloc_arenas`; --arenas overrides the arena count). `--targets`
targets (`auto`, 14 days of the bundled AWS trace at 5 minutes) adopt a fitted model and
publish a forecast; then each refit round feeds every target `--bins` new points and lands a
refit in each, as the engine does: the request (the previous model pickled) built in one
thread, the fit unpickled, caught up and adopted in another, the points folded in by a third
(the engine's fit-sender, fit-result and refresh threads; `--one-thread` does all in one).
Every target gets the same fit, so sizes repeat exactly: the service's fits differ, and leave
more holes than this. After the targets and after each round it prints, in MiB above the
start: the RSS, the RSS after malloc_trim, glibc's blocks in use (mallinfo2), and the free
bytes glibc holds in its heap, which trimming cannot hand back when live blocks pin their
pages: fragmentation.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import pickle
import resource
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from repo import ROOT  # noqa: E402

TRACE = ROOT / "data" / "aws_elb_request_count_8c0756.csv"
STEP = 300
POINTS = 14 * 288
MIB = 2**20
M_ARENA_MAX = -8  # from <malloc.h>
T = TypeVar("T")


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


class Meter:
    """RSS and glibc's heap figures, above those at `start`."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.mallinfo2.restype = MallInfo2
        self.rss0 = self.used0 = 0

    def used(self) -> tuple[int, int]:
        """glibc's bytes in use (heap and mmapped blocks) and free bytes in its heap."""
        info = self.libc.mallinfo2()
        return info.uordblks + info.hblkhd, info.fordblks

    def start(self) -> None:
        from forecaster.fitting import release_free_memory

        gc.collect()
        release_free_memory()
        self.rss0 = rss_bytes()
        self.used0 = self.used()[0]

    def line(self, label: str) -> None:
        from forecaster.fitting import release_free_memory

        gc.collect()
        rss = rss_bytes()
        release_free_memory()
        trimmed = rss_bytes()
        used, free = self.used()
        print(f"{label:<24} {(rss - self.rss0) / MIB:>8.1f} {(trimmed - self.rss0) / MIB:>8.1f} "
              f"{(used - self.used0) / MIB:>8.1f} {free / MIB:>8.1f}", flush=True)


def main(allocator: str | None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--targets", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bins", type=int, default=12, help="points folded in before a round")
    parser.add_argument("--arenas", type=int, default=None,
                        help="glibc's arenas (default: the serving process's)")
    parser.add_argument("--one-thread", action="store_true",
                        help="send, land and refresh in one thread")
    args = parser.parse_args()
    if args.targets < 1 or args.rounds < 0 or args.bins < 1:
        parser.error("--targets and --bins must be positive, --rounds not negative")

    from forecaster.fitting import MALLOC_ARENAS, fit_job, limit_malloc_arenas

    arenas = MALLOC_ARENAS if args.arenas is None else args.arenas
    limit_malloc_arenas(arenas)  # before any thread starts

    from forecaster.config import EngineSettings
    from forecaster.series import read_csv, to_grid
    from forecaster.spec import TriggerSpec
    from forecaster.target import Target, freshness_limit

    grid = to_grid(read_csv(Path(TRACE)), pd.Timedelta(seconds=STEP)).filled.to_numpy()
    history = pd.Series(grid[:POINTS], index=pd.date_range(
        "2026-01-05", periods=POINTS, freq=f"{STEP}s", tz="UTC"))
    # later points: the trace again from its start, as the scaler bench's fleet wraps it
    count = 1 + args.bins * (args.rounds + 2)
    later = pd.Series(np.resize(grid, count), index=pd.date_range(
        history.index[-1] + pd.Timedelta(seconds=STEP), periods=count, freq=f"{STEP}s"))
    spec = TriggerSpec(server_address="http://bench:9090", query="bench",
                       target_value=float(np.nanmean(history)) / 3, model="auto",
                       step_seconds=STEP, history_window_seconds=POINTS * STEP,
                       startup_seconds=300, outage_horizon_seconds=1800)
    freshness = freshness_limit(EngineSettings(), spec)
    start_now = history.index[-1].timestamp() + STEP
    fed = 0

    def current(t: float) -> tuple[float, float]:
        return t, float(later.iloc[max(0, fed - 1)]) if fed else float(history.iloc[-1])

    def target(i: int, first: bytes) -> Target:
        made = Target(f"bench/web-{i}/fc", spec, source=None)  # type: ignore[arg-type]
        with made.lock:
            made.fold_in(history, current(start_now), freshness)
            model = pickle.loads(first).model
            made.catch_up(model)
            made.adopt(model, start_now, freshness)
        return made

    def feed(targets: list[Target], bins: int) -> float:
        nonlocal fed
        for _ in range(bins):
            chunk = later.iloc[fed:fed + 1]
            fed += 1
            now = chunk.index[-1].timestamp() + STEP
            for each in targets:
                with each.lock:
                    each.fold_in(chunk, current(now), freshness)
        return now

    def request(each: Target) -> bytes:
        with each.lock:
            return pickle.dumps(each.fit_request())

    def land(each: Target, refit: bytes, now: float) -> None:
        model = pickle.loads(refit).model
        with each.lock:
            each.catch_up(model)
            each.adopt(model, now, freshness)

    print(f"{args.targets} targets (auto, 14 days at 5 minutes), {args.rounds} refit rounds "
          f"{args.bins} points apart; PYTHONMALLOC={allocator}, "
          f"{arenas} malloc arena(s), "
          f"{'one thread' if args.one_thread else 'sender, lander and refresher threads'}")
    # One target unmeasured: the fits it makes, and what the process builds once.
    scout = Target("bench/scout/fc", spec, source=None)  # type: ignore[arg-type]
    with scout.lock:
        scout.fold_in(history, current(start_now), freshness)
        first = pickle.dumps(fit_job(scout.fit_request()))
    scout = target(-1, first)
    feed([scout], args.bins)
    refit = pickle.dumps(fit_job(pickle.loads(request(scout))))
    land(scout, refit, feed([scout], 1))
    fed = 0
    del scout

    sender = ThreadPoolExecutor(1, thread_name_prefix="sender")
    lander = ThreadPoolExecutor(1, thread_name_prefix="lander")

    def on(pool: ThreadPoolExecutor, call: Callable[..., T], *rest: Any) -> T:
        return call(*rest) if args.one_thread else pool.submit(call, *rest).result()

    meter = Meter()
    meter.start()
    print(f"{'MiB above the start':<24} {'RSS':>8} {'trimmed':>8} {'in use':>8} "
          f"{'free':>8}")
    targets = [on(lander, target, i, first) for i in range(args.targets)]
    meter.line("targets forecast")
    for round_ in range(1, args.rounds + 1):
        now = feed(targets, args.bins)
        for each in targets:
            on(sender, request, each)
            on(lander, land, each, refit, now)
        meter.line(f"after refit round {round_}")
    sender.shutdown()
    lander.shutdown()
    return 0


if __name__ == "__main__":
    from forecaster.fitting import use_system_allocator

    use_system_allocator()
    # re-executed on the C allocator, the variable is taken out again; set by hand, it stays
    sys.exit(main(os.environ.get("PYTHONMALLOC", "malloc")))
