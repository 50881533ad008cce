"""The scaler bench's report: a table of every window and figure, a summary against the
goals, and the same figures as JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from accounting import MemoryPoint
from load import Window
from scaler_fleet import Fleet

GOAL_CALLS_PER_SECOND = 2000.0  # closed loop
# Open-loop p99 goals: KEDA's rate for 1,000 targets (0.3 calls/s each) against absolutes in
# ms; any other rate against multiples of the do-nothing servicer's p99 at that rate.
KEDA_RATE = 300.0
GOAL_RATES = (KEDA_RATE, GOAL_CALLS_PER_SECOND)
GOAL_P99_MS = {"steady": 5.0, "refits": 10.0}
GOAL_P99_OVER_FLOOR = {"steady": 1.25, "refits": 2.0}
GOAL_MEMORY_MB = 200.0
# For 1,000 targets of 14 days at 5 minutes; other fleets are printed without a verdict.
GOAL_TARGETS = 1000
GOAL_FIRST_FIT_SECONDS = 600.0
GOAL_REFIT_CPU_SECONDS = 398.0
FRONT = "service: gRPC front"  # the CPU party that answers the service's calls


@dataclass
class Run:
    """What one run measured, filled in as it goes."""

    args: argparse.Namespace
    fleet: Fleet | None = None  # once the history is there
    loads: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    windows: list[Window] = field(default_factory=list)  # every window, in order
    # The service's windows with no refits: the first round, then one before each floor
    # round past the first; and the floor's rounds.
    steady_rounds: list[list[Window]] = field(default_factory=list)
    refit_windows: list[Window] = field(default_factory=list)  # the service's, refits running
    floor_rounds: list[list[Window]] = field(default_factory=list)
    # idle first, then with the targets forecast, ..., after the refits and the load last
    memory: list[MemoryPoint] = field(default_factory=list)

    @property
    def idle(self) -> MemoryPoint:
        return self.memory[0]



def print_report(run: Run) -> None:
    args = run.args
    fleet, figures = run.fleet, run.figures
    assert fleet is not None
    print()
    print("=" * 100)
    print(f"forecaster scaler load bench: {fleet.targets} targets on {fleet.series} series, "
          f"model {args.model}, fit workers {args.fit_workers} at priority "
          f"{args.fit_priority}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"grpcio {grpc.__version__}")
    for label, values in run.loads.items():
        print(f"  load average {label:<36} {' '.join(f'{v:.2f}' for v in values)}")
    for note in run.notes:
        print(f"  note: {note}")
    print("-" * 100)
    print(f"GetMetrics load windows, {args.seconds:.0f} s each, from "
          f"{min(args.client_procs, args.clients)} processes: closed loop with "
          f"{args.clients} {args.client} callers, or open loop at the rate named")
    for window in run.windows:
        print(f"  {window.line()}")
    print(f"  (closed loop: mean latency = callers / throughput, Little's law: "
          f"{args.clients} callers at {GOAL_CALLS_PER_SECOND:,.0f}/s wait "
          f"{1000 * args.clients / GOAL_CALLS_PER_SECOND:.0f} ms on average; latency "
          f"goals are judged on the open-loop windows)")
    print("  CPU seconds per window by party (% of the machine; us per GetMetrics call):")
    rest = ["everything else on the machine", "idle"]
    parties = [*dict.fromkeys(p for w in run.windows for p in w.cpu if p not in rest), *rest]
    print("    " + f"{'':<36}" + "".join(f"{p[:18]:>20}" for p in parties))
    for window in run.windows:
        cells = []
        for party in parties:
            used = window.cpu.get(party, float("nan"))
            per_call = used / window.calls * 1e6 if window.calls else float("nan")
            cells.append(f"{used:5.1f} {100 * used / window.capacity:3.0f}% {per_call:5.0f}")
        print(f"    {window.label:<36}" + "".join(f"{c:>20}" for c in cells))
    print(f"  service background CPU with no requests (refreshes, engine loop): "
          f"{100 * figures['idle_service_cpu_share']:.1f} % of a core")
    print("-" * 100)
    print("memory (RSS of this process, which hosts the service):")
    for point in run.memory:
        print(f"  {point.line()}")
    print("  per target: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                       figures["per_target"].items()))
    print("in process, no gRPC (median CPU us per call of the calling thread):")
    for name, us in figures["micro_us"].items():
        print(f"  {us:10.1f}  {name}")
    print("=" * 100)
    print(f"SUMMARY: the goals, with the load generator on the same {os.cpu_count()} CPUs")
    for name, value, goal, ok in summary(run):
        goal_text = f"goal {goal}" if goal else ""
        print(f"  {name:<44} {value:>34}   {goal_text:<18} {ok}")
    print("=" * 100)


Row = tuple[str, str, str, str]


def summary(run: Run) -> list[Row]:
    """The goals' rows: measure, value, goal, verdict (blank where the run has no verdict)."""
    args, figures = run.args, run.figures
    steady = run.steady_rounds[0]
    rows: list[Row] = []
    for rate in args.rates:
        rows += _open_loop_rows(run, rate)
    closed = [w for w in (steady[0], run.refit_windows[0]) if not w.rate]
    lowest = min(w.throughput for w in closed)
    rows.append(("closed-loop throughput, steady / refits",
                 " / ".join(f"{w.throughput:,.0f}/s" for w in closed),
                 f">= {GOAL_CALLS_PER_SECOND:,.0f}/s", _verdict(lowest >= GOAL_CALLS_PER_SECOND)))
    errors: Counter[str] = Counter()
    for window in [*(w for r in run.steady_rounds for w in r), *run.refit_windows]:
        errors.update(window.errors)
    rows.append(("errors, the service's windows", f"{sum(errors.values())} {dict(errors) or ''}",
                 "0", _verdict(not errors)))
    targets = run.fleet.targets if run.fleet is not None else 0
    judged = targets == GOAL_TARGETS
    first = figures.get("first_fit_seconds")
    rows.append((f"first fit of {targets:,} targets, empty state",
                 "did not finish" if first is None else f"{first:.1f} s",
                 f"< {GOAL_FIRST_FIT_SECONDS:.0f} s",
                 _verdict(first is not None and first < GOAL_FIRST_FIT_SECONDS) if judged else ""))
    cpu = figures.get("first_fit_cpu", {})
    if cpu:
        rows.append(("  its CPU: fit workers / engine / front",
                     f"{cpu.get('fit workers', math.nan):.0f} / "
                     f"{cpu.get('service: engine (this process)', math.nan):.0f} / "
                     f"{cpu.get('service: gRPC front', math.nan):.0f} s", "", ""))
    refit_cpu = figures.get("refit_cpu_seconds")
    rows.append((f"fit workers' CPU, refit round of {targets:,}",
                 "skipped" if refit_cpu is None else f"{refit_cpu:.0f} s",
                 f"<= {GOAL_REFIT_CPU_SECONDS:.0f} s",
                 _verdict(refit_cpu <= GOAL_REFIT_CPU_SECONDS)
                 if judged and refit_cpu is not None else ""))
    idle = run.idle
    above = max(max(p.service_mb, p.peak_mb) for p in run.memory) - idle.service_mb
    rows.append(("memory above idle, most at any point (peak)", f"{above:.0f} MB",
                 f"<= {GOAL_MEMORY_MB:.0f} MB", _verdict(above <= GOAL_MEMORY_MB)))
    return rows


def _open_loop_rows(run: Run, rate: float) -> list[Row]:
    """p99 at `rate`, steady (the median of the service's rounds) and during refits, against
    an absolute at KEDA's rate and against the floor's median p99 at any other."""
    def at_rate(windows: list[Window]) -> list[Window]:
        return [w for w in windows if w.rate == rate]

    steady = [w for r in run.steady_rounds for w in at_rate(r)]
    refits = at_rate(run.refit_windows)
    floor = [w for r in run.floor_rounds for w in at_rate(r)]
    floor_p99 = statistics.median(w.ms(99) for w in floor) if floor else math.nan
    rows: list[Row] = []
    for phase, windows in (("steady", steady), ("refits", refits)):
        if not windows:
            continue
        p99 = statistics.median(w.ms(99) for w in windows)
        kept_up = all(w.throughput >= 0.98 * rate for w in windows)
        name = f"open loop {rate:,.0f}/s, {phase}, p99"
        each = ", ".join(f"{w.ms(99):.1f}" for w in windows)
        if rate == KEDA_RATE:
            goal = GOAL_P99_MS[phase]
            rows.append((name, f"{p99:.2f} ms ({each})", f"< {goal:g} ms",
                         _verdict(p99 < goal and kept_up)))
        else:
            most = GOAL_P99_OVER_FLOOR[phase]
            ratio = p99 / floor_p99
            rows.append((name, f"{p99:.2f} ms = {ratio:.2f} x floor", f"<= {most:g} x floor",
                         _verdict(ratio <= most and kept_up) if floor else ""))
            if phase == "steady":
                rows.append(("  the floor, the median of its rounds",
                             f"{floor_p99:.2f} ms ({', '.join(f'{w.ms(99):.1f}' for w in floor)})",
                             "", ""))
                front, floor_us = _cpu_us(windows, FRONT), _cpu_us(floor, "floor")
                rows.append(("  CPU per call, front / floor (medians)",
                             f"{statistics.median(front):.0f} / {statistics.median(floor_us):.0f}"
                             f" us ({', '.join(f'{u:.0f}' for u in front)} / "
                             f"{', '.join(f'{u:.0f}' for u in floor_us)})", "", ""))
    return rows


def _cpu_us(windows: list[Window], party: str) -> list[float]:
    """Each window's CPU µs per call of the party whose name starts with `party`."""
    return [1e6 * sum(v for k, v in w.cpu.items() if k.startswith(party)) / max(1, w.calls)
            for w in windows]


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def write_json(run: Run, path: Path) -> None:
    payload = {
        "args": vars(run.args), "loadavg": run.loads, "notes": run.notes,
        "figures": run.figures, "windows": [w.as_dict() for w in run.windows],
        "memory": [vars(p) for p in run.memory],
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"figures written to {path}")
