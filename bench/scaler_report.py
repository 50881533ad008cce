"""The scaler bench's report: a table of every window and figure, a summary against the
goals, and the same figures as JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from accounting import MemoryPoint
from load import Window
from scaler_fleet import Fleet

GOAL_CALLS_PER_SECOND = 2000.0
GOAL_P99_MS = 5.0
GOAL_MEMORY_MB = 200.0


@dataclass
class Run:
    """What one run measured, filled in as it goes."""

    args: argparse.Namespace
    fleet: Fleet | None = None  # once the history is there
    loads: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    windows: list[Window] = field(default_factory=list)  # every window, in order
    steady: list[Window] = field(default_factory=list)  # the service's, no refits
    refit_windows: list[Window] = field(default_factory=list)  # the service's, refits running
    floor_windows: list[Window] = field(default_factory=list)  # the floor's first round
    # idle first, then with the targets forecast, ..., after the refits and the load last
    memory: list[MemoryPoint] = field(default_factory=list)

    @property
    def idle(self) -> MemoryPoint:
        return self.memory[0]

    @property
    def loaded(self) -> MemoryPoint:
        return self.memory[1]

    @property
    def after_load(self) -> MemoryPoint:
        return self.memory[-1]


def print_report(run: Run) -> None:
    args = run.args
    closed, opened = run.refit_windows[0], run.refit_windows[-1]
    fleet, idle, figures = run.fleet, run.idle, run.figures
    assert fleet is not None
    above = run.loaded.service_mb - idle.service_mb
    above_after = run.after_load.service_mb - idle.service_mb
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
    parties = list(run.windows[0].cpu)
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
    print("SUMMARY (goals: load generator on the same machine; GetMetrics during refits)")

    def seconds(value: float | None, skipped: bool = False) -> str:
        if skipped:
            return "skipped"
        return "did not finish" if value is None else f"{value:.1f} s"

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    kept_up = not opened.rate or opened.throughput >= 0.98 * opened.rate
    judged = [*run.steady, *run.refit_windows]
    errors: Counter[str] = Counter()
    for window in judged:
        errors.update(window.errors)
    steady, steady_open = run.steady[0], run.steady[-1]
    rate = f", offered {opened.rate:,.0f}/s" if opened.rate else ""
    rows = [
        ("GetMetrics/s during refits (closed loop)", f"{closed.throughput:,.0f}/s",
         f">= {GOAL_CALLS_PER_SECOND:,.0f}/s",
         verdict(closed.throughput >= GOAL_CALLS_PER_SECOND)),
        (f"GetMetrics p99 during refits{rate}", f"{opened.ms(99):.2f} ms",
         f"< {GOAL_P99_MS:.0f} ms", verdict(opened.ms(99) < GOAL_P99_MS and kept_up)),
        ("  answered OK", f"{opened.throughput:,.0f}/s", "", ""),
        ("  closed loop: p50 / p99", f"{closed.ms(50):.2f} / {closed.ms(99):.2f} ms", "", ""),
        ("steady state (no refits), closed loop", f"{steady.throughput:,.0f}/s, p99 "
         f"{steady.ms(99):.2f} ms", "", ""),
        (f"  open loop{rate}", f"{steady_open.throughput:,.0f}/s OK, p99 "
         f"{steady_open.ms(99):.2f} ms", "", ""),
        ("GetMetrics errors (these windows)", f"{sum(errors.values())} {dict(errors) or ''}",
         "0", verdict(not errors)),
        (f"memory above idle, {fleet.targets} targets", f"{above:.0f} MB",
         f"< {GOAL_MEMORY_MB:.0f} MB", verdict(above < GOAL_MEMORY_MB)),
        ("  after refits and load", f"{above_after:.0f} MB", f"< {GOAL_MEMORY_MB:.0f} MB",
         verdict(above_after < GOAL_MEMORY_MB)),
        (f"first fit, {fleet.targets} targets (load + fit)",
         seconds(figures.get("first_fit_seconds")), "", ""),
        (f"refit of {fleet.targets} targets, no load",
         seconds(figures.get("second_refit_seconds"), args.skip_refit_round), "", ""),
        ("  fit workers' CPU for it",
         seconds(figures.get("refit_cpu_seconds"), args.skip_refit_round), "", ""),
        (f"refit of {fleet.targets} targets, under load",
         seconds(figures.get("refit_under_load_seconds")), "", ""),
    ]
    if run.floor_windows:
        floor, floor_open = run.floor_windows[0], run.floor_windows[-1]
        rows[6:6] = [
            (f"{floor.label}, closed loop", f"{floor.throughput:,.0f}/s, p99 "
             f"{floor.ms(99):.2f} ms", "", ""),
            (f"  open loop{rate}", f"{floor_open.throughput:,.0f}/s OK, p99 "
             f"{floor_open.ms(99):.2f} ms", "", ""),
        ]
    for name, value, goal, ok in rows:
        goal_text = f"goal {goal}" if goal else ""
        print(f"  {name:<44} {value:>30}   {goal_text:<16} {ok}")
    print("=" * 100)


def write_json(run: Run, path: Path) -> None:
    payload = {
        "args": vars(run.args), "loadavg": run.loads, "notes": run.notes,
        "figures": run.figures, "windows": [w.as_dict() for w in run.windows],
        "memory": [vars(p) for p in run.memory],
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"figures written to {path}")
