"""A real Prometheus for tests: backfilled from OpenMetrics files with promtool, on 127.0.0.1.

Tests talk to the genuine server (PromQL, HTTP errors, the 11,000-point limit) rather than to a
mock, so what passes here is what a cluster's Prometheus does. Example::

    write_openmetrics(trace, "demo_requests", tmp / "a.om", {"job": "demo"})
    with PrometheusServer([tmp / "a.om"]) as server:
        requests.get(f"{server.url}/api/v1/query", params={"query": "demo_requests"}, timeout=5)
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Self

import pandas as pd
import requests

from tests.support.waiting import wait_for

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_INSTALL_HINT = (
    "`make test` installs Debian's `prometheus` package (apt-get install prometheus), "
    "which provides both binaries"
)


class PrometheusServerError(RuntimeError):
    """The test Prometheus could not be backfilled, started or made ready."""


def load_trace(path: Path) -> pd.Series:
    """Read a repo trace CSV (`timestamp,value`, ISO-8601 UTC with Z) as a float64 UTC series."""
    frame = pd.read_csv(path)
    if list(frame.columns) != ["timestamp", "value"]:
        raise ValueError(f"{path}: header must be 'timestamp,value', got {list(frame.columns)!r}")
    index = pd.DatetimeIndex(pd.to_datetime(frame["timestamp"], utc=True), name="timestamp")
    series = pd.Series(frame["value"].to_numpy(dtype="float64"), index=index, name=path.stem)
    if not series.index.is_monotonic_increasing or not series.index.is_unique:
        raise ValueError(f"{path}: timestamps must be strictly increasing")
    return series


def shift_to_end_at(series: pd.Series, end: datetime) -> pd.Series:
    """Move a trace in time, keeping its spacing, so that its last point falls on `end`."""
    if end.tzinfo is None:
        raise ValueError(f"end must be timezone-aware, got naive {end!r}")
    if series.empty:
        raise ValueError("cannot shift an empty series")
    offset = pd.Timestamp(end).tz_convert("UTC") - series.index[-1]
    shifted = series.copy()
    shifted.index = series.index + offset
    return shifted


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _format_timestamp(ts: pd.Timestamp) -> str:
    # Prometheus stores milliseconds; whole seconds are written without a fraction.
    millis = ts.as_unit("ns").value // 1_000_000
    seconds, rest = divmod(millis, 1000)
    return f"{seconds}" if rest == 0 else f"{seconds}.{rest:03d}"


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def write_openmetrics(
    series: pd.Series, metric: str, path: Path, labels: dict[str, str] | None = None
) -> None:
    """Write one series as an OpenMetrics gauge that `promtool tsdb create-blocks-from` accepts.

    promtool silently drops out-of-order samples, so a series whose timestamps are not strictly
    increasing is refused here instead.
    """
    if not _METRIC_NAME.match(metric):
        raise ValueError(f"metric: {metric!r} is not a valid Prometheus metric name")
    labels = labels or {}
    for name in labels:
        if not _LABEL_NAME.match(name) or name.startswith("__"):
            raise ValueError(f"labels: {name!r} is not a valid label name")
    if not isinstance(series.index, pd.DatetimeIndex) or series.index.tz is None:
        raise ValueError("series: index must be a timezone-aware DatetimeIndex")
    if not series.index.is_monotonic_increasing or not series.index.is_unique:
        raise ValueError("series: timestamps must be strictly increasing (promtool drops others)")
    label_text = ",".join(
        f'{name}="{_escape_label_value(value)}"' for name, value in sorted(labels.items())
    )
    prefix = f"{metric}{{{label_text}}}" if label_text else metric
    index = series.index.tz_convert("UTC").as_unit("ns")
    lines = [f"# TYPE {metric} gauge"]
    lines.extend(
        f"{prefix} {_format_value(float(value))} {_format_timestamp(ts)}"
        for ts, value in zip(index, series.to_numpy(dtype="float64"), strict=True)
    )
    lines.append("# EOF")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _require_binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise PrometheusServerError(f"`{name}` is not on PATH: {_INSTALL_HINT}")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 free at the moment of asking, for a server the caller starts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:])


def backfill(
    files: Sequence[Path],
    data_dir: Path,
    *,
    promtool: str | None = None,
    max_block_duration: str = "384h",
) -> None:
    """Write TSDB blocks for each OpenMetrics file into `data_dir` with promtool.

    promtool's default 2 h blocks make ~170 fsynced blocks per 14 days (seconds of work);
    `--max-block-duration` (a hidden flag in 2.42, public later) makes a handful. The blocks can
    also be copied into several servers' data dirs, which is faster than running promtool again.
    """
    promtool = promtool or _require_binary("promtool")
    data_dir.mkdir(parents=True, exist_ok=True)
    for path in files:
        command = [promtool, "tsdb", "create-blocks-from", "openmetrics", "--quiet"]
        options = [f"--max-block-duration={max_block_duration}"] if max_block_duration else []
        done = subprocess.run(
            [*command, *options, str(path), str(data_dir)],
            capture_output=True,
            timeout=120,
            check=False,
        )
        output = (done.stdout + done.stderr).decode("utf-8", "replace")
        if done.returncode != 0 and options and "unknown long flag" in output:
            # A promtool without the flag: fall back to its default block size.
            done = subprocess.run(
                [*command, str(path), str(data_dir)], capture_output=True, timeout=120, check=False
            )
            output = (done.stdout + done.stderr).decode("utf-8", "replace")
        if done.returncode != 0:
            tail = "\n".join(output.splitlines()[-25:])
            raise PrometheusServerError(
                f"promtool could not backfill {path} (exit {done.returncode}):\n{tail}"
            )


class PrometheusServer:
    """A Prometheus process over backfilled history, listening on a free 127.0.0.1 port.

    `stop()` and `start()` may be called repeatedly; a restart keeps the data dir and the port,
    so a client built from `.url` reconnects to the same history.
    """

    def __init__(
        self,
        openmetrics_files: Sequence[Path] = (),
        *,
        blocks_dir: Path | None = None,
        workdir: Path | None = None,
        ready_timeout_seconds: float = 30.0,
        retention: str = "3650d",
        port: int | None = None,
        scrape_configs: Sequence[Mapping[str, object]] = (),
    ) -> None:
        """`scrape_configs` are Prometheus `scrape_configs` entries, for a server that also
        scrapes live targets (none by default: the history is backfilled)."""
        self._prometheus = _require_binary("prometheus")
        self._promtool = _require_binary("promtool")
        self._files = [Path(f) for f in openmetrics_files]
        self._blocks_dir = blocks_dir
        self._ready_timeout = ready_timeout_seconds
        self._retention = retention
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._workdir = workdir
        self._port: int | None = port  # None: a free one at the first start
        self._process: subprocess.Popen[bytes] | None = None
        self._backfilled = False
        self._scrape_configs = [dict(c) for c in scrape_configs]

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="forecaster-prometheus-")
            self._workdir = Path(self._tempdir.name)
        return self._workdir

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    @property
    def url(self) -> str:
        if self._port is None:
            raise PrometheusServerError("the server has not been started yet: call start()")
        return f"http://127.0.0.1:{self._port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The server process's id while it is started, else None."""
        return self._process.pid if self._process is not None else None

    def backfill(self) -> None:
        """Fill the data dir once: copy `blocks_dir` if given, then backfill each file."""
        if self._backfilled:
            return
        if self._blocks_dir is not None:
            shutil.copytree(self._blocks_dir, self.data_dir, dirs_exist_ok=True)
        backfill(self._files, self.data_dir, promtool=self._promtool)
        self._backfilled = True

    def start(self) -> None:
        """Backfill if needed, start Prometheus and wait until /-/ready answers 200."""
        if self.running:
            return
        self.backfill()
        config = self.workdir / "prometheus.yml"
        settings = {"global": {"scrape_interval": "1m"}, "scrape_configs": self._scrape_configs}
        config.write_text(json.dumps(settings), encoding="utf-8")  # JSON is YAML
        if self._port is None:
            self._port = free_port()
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    self._prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.data_dir}",
                    f"--web.listen-address=127.0.0.1:{self._port}",
                    # Retention counts back from the newest block: keep every backfilled point.
                    f"--storage.tsdb.retention.time={self._retention}",
                    "--log.level=info",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        with requests.Session() as session:

            def ready() -> bool:
                assert self._process is not None
                code = self._process.poll()
                if code is not None:
                    self._process = None
                    raise PrometheusServerError(
                        f"prometheus exited with code {code} before it was ready; log tail:\n"
                        f"{_tail(self.log_path)}"
                    )
                try:
                    return session.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200
                except requests.RequestException:
                    return False

            try:
                wait_for(ready, self._ready_timeout, what=f"prometheus at {self.url} ready")
            except AssertionError as exc:
                self.stop()
                raise PrometheusServerError(
                    f"prometheus at {self.url} was not ready within {self._ready_timeout} s; "
                    f"log tail:\n{_tail(self.log_path)}"
                ) from exc

    def stop(self, timeout_seconds: float = 10.0) -> None:
        """Terminate Prometheus (SIGTERM, then SIGKILL if it lingers); the data dir is kept."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_seconds)

    def close(self) -> None:
        """Stop the server and delete its temp dir (a caller-given workdir is left in place)."""
        self.stop()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None
            self._workdir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def held_each_minute(trace: pd.Series, now: datetime, *, days: int | None = None) -> pd.Series:
    """The trace on a 5-minute grid, placed to end 2 hours after `now` and held each minute.

    Instant queries then keep finding a sample however long a test session runs, and range
    queries on the 5-minute grid return the trace's own values. `days` keeps only the last days.
    """
    grid = trace.resample("5min").mean().ffill()
    if days is not None:
        grid = grid.iloc[-days * 288 :]
    end = pd.Timestamp(now).floor("5min") + pd.Timedelta(hours=2)
    grid.index = grid.index - grid.index[-1] + end
    minutes = pd.date_range(grid.index[0], end + pd.Timedelta(minutes=4), freq="1min")
    return grid.reindex(minutes, method="ffill")
