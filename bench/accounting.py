"""Who used the machine in a window: memory, CPU seconds by party, GC pauses, py-spy profiles.

On a shared machine a window's figures mean little without what every party used beside it.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forecaster.fitting import release_free_memory

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

log = logging.getLogger("bench").info


def rss_mb(pid: int | str = "self", field: str = "VmRSS") -> float:
    """Resident set size in MB from /proc/PID/status; `field` VmHWM: the peak so far."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def children(pid: int) -> list[int]:
    """The child processes of every thread of `pid` (a process spawned from a thread is that
    thread's child)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time of a process (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, summed over cores (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def fit_worker_pids(service: Any) -> list[int]:
    """The service's fit worker processes (spawned on the first fit)."""
    return list(service.engine.fits.pids())


@dataclass
class MemoryPoint:
    label: str
    service_mb: float  # the engine's process and the gRPC front's
    trimmed_mb: float
    peak_mb: float
    front_mb: float
    workers_mb: list[float]

    def line(self) -> str:
        workers = ", ".join(f"{m:.0f}" for m in self.workers_mb) or "not started"
        return (
            f"{self.label:<30} service RSS {self.service_mb:6.1f} MB (after gc + malloc_trim "
            f"{self.trimmed_mb:6.1f}, peak so far {self.peak_mb:6.1f}; of which the gRPC "
            f"front {self.front_mb:5.1f}); fit workers {workers} MB"
        )


def measure_memory(label: str, service: Any) -> MemoryPoint:
    """The RSS of the service (this process, which hosts the engine, and the gRPC front),
    before and after handing freed memory back, and of its fit workers."""
    gc.collect()
    front_pid = service.scaler.pid
    front = rss_mb(front_pid)
    raw = rss_mb() + front
    release_free_memory()  # what of the RSS is freed memory the allocator kept
    point = MemoryPoint(label, raw, rss_mb() + front,
                        rss_mb(field="VmHWM") + rss_mb(front_pid, field="VmHWM"),
                        front, [rss_mb(p) for p in fit_worker_pids(service)])
    log(point.line())
    return point


class GcPauses:
    """Times every cyclic garbage collection in this process (the service's) while open:
    a full collection stops every thread, requests included."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self.began = 0.0

    def callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.began = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self.began)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self.callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self.callback)


class CpuMeter:
    """CPU seconds of each party over a load window, and what the rest of the machine used
    or left idle; `extra` parties are measured by the caller (e.g. reaped children)."""

    def __init__(self, parties: dict[str, list[str]]) -> None:
        self.parties = parties
        self.before = {name: sum(cpu_seconds(p) for p in pids) for name, pids in parties.items()}
        self.busy, self.total = machine_cpu_seconds()

    def stop(self, extra: dict[str, float] | None = None) -> tuple[dict[str, float], float]:
        """Each party's CPU seconds since the start, and the machine's capacity in them."""
        cpu = {name: sum(cpu_seconds(p) for p in pids) - self.before[name]
               for name, pids in self.parties.items()}
        cpu.update(extra or {})
        busy, total = machine_cpu_seconds()
        ours = sum(v for v in cpu.values() if not math.isnan(v))
        cpu["everything else on the machine"] = max(0.0, busy - self.busy - ours)
        cpu["idle"] = max(0.0, (total - self.total) - (busy - self.busy))
        return cpu, total - self.total


class Profiler:
    """py-spy on one process for each window: folded stacks into `directory`, GIL holders
    only unless `all_threads`; the hottest frames printed after each window."""

    def __init__(self, directory: Path, seconds: float, *, py_spy: str | None = None,
                 all_threads: bool = False, top: int = 25) -> None:
        self.directory = directory
        self.seconds = seconds
        self.py_spy = py_spy or shutil.which("py-spy")
        self.all_threads = all_threads
        self.top = top
        if self.py_spy is None:
            log("--profile: py-spy not found (pip install py-spy, or --py-spy PATH); skipped")

    def start(self, label: str, pid: int) -> tuple[subprocess.Popen[bytes], str] | None:
        if self.py_spy is None:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        output = str(self.directory / f"{re.sub(r'[^A-Za-z0-9]+', '-', label)}.txt")
        command = [self.py_spy, "record", "--pid", str(pid), "--duration",
                   str(math.ceil(self.seconds)), "--rate", "200", "--nonblocking",
                   "--format", "raw", "--output", output]
        if not self.all_threads:
            command.append("--gil")
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return process, output

    def finish(self, started: tuple[subprocess.Popen[bytes], str] | None) -> str | None:
        """Wait for the recording; print its hottest frames; the folded stacks' path."""
        if started is None:
            return None
        process, path = started
        _, err = process.communicate(timeout=120)
        if process.returncode != 0:
            log(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
            return path
        summarize_folded(Path(path), top=self.top,
                         what="all" if self.all_threads else "GIL-holding")
        return path


def summarize_folded(path: Path, top: int = 25, what: str = "") -> None:
    """Print the hottest frames of py-spy's folded stacks ("thread;f1;f2 count" lines)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [short_frame(f) for f in stack.split(";")[1:]]  # [0] names the thread
        if frames:
            own[frames[-1]] += count
            for frame in set(frames):
                inclusive[frame] += count
    if not total:
        log(f"profile {path}: no samples")
        return
    print(f"\npy-spy, {what} samples of the service process: {total} ({path})")
    print("  self %  frame                                                incl %  frame")
    for (a, n), (b, m) in zip(own.most_common(top), inclusive.most_common(top), strict=False):
        print(f"  {100 * n / total:6.1f}  {a[:52]:<52} {100 * m / total:6.1f}  {b}")


def short_frame(frame: str) -> str:
    """ "function (path/to/file.py:123)" -> "function (file.py)": lines merged per function."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].split(':')[0]})" if where else name
