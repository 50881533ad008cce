"""`forecaster export`: one PromQL series from Prometheus as the CSV `forecaster backtest` reads.

The CSV has a `timestamp,value` header, then one row per evaluation of the query on the range
grid: ISO-8601 UTC timestamps ending in Z, strictly increasing, and the values as Prometheus
gave them (no rounding, no resampling)::

    server = export_server("http://prometheus.monitoring:9090")
    start, end = export_window(days=14, step_seconds=60, now=datetime.now(UTC))
    series = fetch_series(server, 'sum(rate(http_requests_total{job="web"}[1m]))', start, end, 60)
    write_csv(series, sys.stdout)

Errors name the command-line flag to change (`--server`, `--start`, ...), since that is where
every value here comes from.
"""

from __future__ import annotations

import math
import re
import reprlib
import ssl
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import pandas as pd

from forecaster.durations import format_duration
from forecaster.errors import InvalidInputError
from forecaster.sources.prometheus import PrometheusServerConfig, PrometheusSource

__all__ = [
    "MAX_EXPORT_POINTS",
    "check_output_path",
    "export_server",
    "export_window",
    "fetch_series",
    "format_value",
    "grid_points",
    "parse_header",
    "summary",
    "write_csv",
    "write_csv_file",
]

MAX_EXPORT_POINTS = 2_000_000
"""More points than this is refused: 14 days at 1 s is 1.2 M; beyond that, raise --step."""

# PrometheusServerConfig's field names, as the flags of `forecaster export` spell them.
_FLAG_FOR_FIELD = {
    "url": "--server",
    "bearer_token_file": "--bearer-token-file",
    "headers": "--header",
    "ca_file": "--ca-file",
    "insecure_skip_verify": "--insecure-skip-verify",
    "timeout_seconds": "--timeout",
}


# RFC 9110: a field name is a token; a value is visible characters, spaces and tabs (bytes
# above 0x7F pass as Latin-1, which is how requests sends them).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def parse_header(text: str) -> tuple[str, str]:
    """`Name=value` (as given to --header) as a (name, value) pair."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not _HEADER_NAME.fullmatch(name):
        raise InvalidInputError(
            "--header",
            "must be NAME=VALUE with a name of letters, digits and -, such as "
            f"X-Scope-OrgID=team-a; got {reprlib.repr(text)}",
        )
    if not _HEADER_VALUE.fullmatch(value):
        raise InvalidInputError(
            "--header",
            f"the value of {name} holds a line break, a control character or a character "
            f"beyond Latin-1, which HTTP cannot carry; got {reprlib.repr(text)}",
        )
    return name, value


def export_server(
    url: str,
    *,
    bearer_token_file: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    ca_file: str | None = None,
    insecure_skip_verify: bool = False,
    timeout_seconds: float = 30.0,
) -> PrometheusServerConfig:
    """The server to read from; files are checked now, so a wrong path fails before any query."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # a bad port or IPv6 literal raises here rather than deeper down
    except ValueError as exc:
        raise InvalidInputError(
            "--server",
            f"is not a URL such as http://prometheus:9090 ({exc}); "
            f"got {re.sub(r'(?<=//)[^/@]*@', '***@', url)!r}",
        ) from exc
    if "@" in parts.netloc:  # said without echoing the URL: it holds the credentials
        raise InvalidInputError(
            "--server",
            "must not embed user:password@; give --bearer-token-file, or the credentials as "
            "--header 'Authorization=Basic <base64 of user:password>'",
        )
    for flag, path in (("--bearer-token-file", bearer_token_file), ("--ca-file", ca_file)):
        if path is not None and not Path(path).is_file():
            raise InvalidInputError(flag, f"{path!r} is not a readable file")
    merged: dict[str, str] = {}
    for name, value in headers:
        if name in merged:
            raise InvalidInputError("--header", f"gives {name!r} twice; give each header once")
        merged[name] = value
    try:
        server = PrometheusServerConfig(
            url=url,
            bearer_token_file=bearer_token_file,
            headers=merged,
            ca_file=ca_file,
            insecure_skip_verify=insecure_skip_verify,
            timeout_seconds=timeout_seconds,
        )
    except InvalidInputError as exc:
        # The config names its own fields (and "set only one of ..." names both); name the flags.
        reason = exc.reason
        for field_name, flag in _FLAG_FOR_FIELD.items():
            reason = reason.replace(field_name, flag)
        raise InvalidInputError(_FLAG_FOR_FIELD.get(exc.field, exc.field), reason) from exc
    if bearer_token_file is not None:
        _check_token_file(bearer_token_file)
    if ca_file is not None:
        _check_ca_file(ca_file)
    return server


def export_window(
    *,
    step_seconds: int,
    now: datetime,
    start: datetime | None = None,
    end: datetime | None = None,
    days: float = 14.0,
) -> tuple[datetime, datetime]:
    """The (start, end) to query: `end` defaults to `now` floored to the step, `start` to
    the whole steps within `days` before `end`; both UTC, whole seconds. Refuses an empty
    window or one of too many points."""
    if step_seconds < 1:
        raise InvalidInputError("--step", f"must be at least 1s, got {step_seconds}s")
    if end is None:
        seconds = math.floor(_utc(now).timestamp() / step_seconds) * step_seconds
        end = datetime.fromtimestamp(seconds, UTC)
    end = _utc(end)
    for flag, value in (("--start", start), ("--end", end)):
        if value is not None and value.microsecond:
            raise InvalidInputError(
                flag, f"must be a whole second (the grid of a range query), got {_iso(value)}"
            )
    if start is None:
        if not (days > 0 and math.isfinite(days)):
            raise InvalidInputError("--days", f"must be a positive number, got {days!r}")
        # Counted before timedelta(days=...) is built: it overflows past 999,999,999 days.
        points = math.floor(days * 86_400 / step_seconds) + 1
        if points > MAX_EXPORT_POINTS:
            raise InvalidInputError(
                "--days",
                f"{days:g} days at --step {format_duration(step_seconds)!r} makes "
                f"{points:,} points, more than {MAX_EXPORT_POINTS:,}: give fewer days or "
                "raise --step",
            )
        if points < 2:
            raise InvalidInputError(
                "--days",
                f"{days:g} days holds no whole --step {format_duration(step_seconds)!r}: give "
                "more days or a shorter --step",
            )
        # Whole steps back from --end, so the last row is --end and every row is on its grid.
        start = end - timedelta(seconds=(points - 1) * step_seconds)
    start = _utc(start)
    if start >= end:
        raise InvalidInputError(
            "--start", f"must be before --end ({_iso(end)}), got {_iso(start)}"
        )
    points = int((end - start).total_seconds() // step_seconds) + 1
    if points > MAX_EXPORT_POINTS:
        raise InvalidInputError(
            "--step",
            f"{format_duration(step_seconds)!r} over {_iso(start)} .. {_iso(end)} makes "
            f"{points:,} points, more than {MAX_EXPORT_POINTS:,}: raise --step or shorten the "
            f"window (--days, --start)",
        )
    return start, end


def fetch_series(
    server: PrometheusServerConfig,
    query: str,
    start: datetime,
    end: datetime,
    step_seconds: int,
    *,
    refused: Callable[[str, int], None] | None = None,
) -> pd.Series:
    """The query evaluated on start, start + step, ... <= end (one series; see PrometheusSource);
    `refused(reason, count)` hears of the NaN, Inf or negative points left out."""
    if not query.strip():
        raise InvalidInputError("--query", "must be a non-empty PromQL expression")
    with PrometheusSource(server, refused=refused) as source:
        return source.query_range(query, start, end, step_seconds)


def grid_points(start: datetime, end: datetime, step_seconds: int) -> int:
    """How many points the range grid holds: start rounded up to a second, then every step."""
    first = math.ceil(_utc(start).timestamp())
    return int((_utc(end).timestamp() - first) // step_seconds) + 1


def format_value(value: float) -> str:
    """A value as written to the CSV: whole numbers without '.0', others in full (repr)."""
    value = float(value)  # numpy's repr of its float64 is "np.float64(...)"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def write_csv(series: pd.Series, out: TextIO) -> int:
    """Write `timestamp,value` rows (UTC, ending in Z); return the number of rows."""
    index = pd.DatetimeIndex(series.index)
    index = index.tz_localize("UTC") if index.tz is None else index.tz_convert("UTC")
    out.write("timestamp,value\n")
    rows = 0
    for stamp, value in zip(index, series.to_numpy(dtype="float64"), strict=True):
        # Prometheus range grids are whole seconds (start rounded up, integer step).
        out.write(f"{stamp.strftime('%Y-%m-%dT%H:%M:%SZ')},{format_value(value)}\n")
        rows += 1
    return rows


def write_csv_file(series: pd.Series, path: Path) -> int:
    """write_csv to `path`; called once every point is fetched, so a failed query writes nothing."""
    try:
        with path.open("w", encoding="utf-8", newline="") as handle:
            return write_csv(series, handle)
    except OSError as exc:
        raise InvalidInputError("--out", f"cannot write {str(path)!r} ({exc.strerror})") from exc


def check_output_path(path: Path) -> None:
    """Fail before querying when --out cannot be written; leaves the file system as it was."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InvalidInputError("--out", f"{str(path)!r} is a directory; give a file name")
    if not folder.is_dir():
        raise InvalidInputError("--out", f"folder {str(folder)!r} does not exist; create it first")
    existed = path.exists()
    try:  # os.access says yes to root even where nothing can be created (/proc, read-only mounts)
        with path.open("a" if existed else "x"):
            pass
    except OSError as exc:
        raise InvalidInputError("--out", f"cannot write {str(path)!r} ({exc.strerror})") from exc
    if not existed:
        path.unlink()


def summary(series: pd.Series, destination: str, *, points: int, refused: int = 0) -> str:
    """One line for stderr: how many rows, which span, where to, and how many of the `points`
    on the grid are missing, so that a gap in the CSV is never a silent one."""
    if series.empty:
        line = f"wrote 0 rows to {destination}"
    else:
        first, last = pd.Timestamp(series.index[0]), pd.Timestamp(series.index[-1])
        line = (
            f"wrote {len(series)} rows, {_iso(first.to_pydatetime())} .. "
            f"{_iso(last.to_pydatetime())}, to {destination}"
        )
    missing = points - len(series)
    if missing > 0:
        line += (
            f"; {missing} of {points} points on the grid are missing ({missing - refused} with "
            f"no sample in Prometheus's lookback, {refused} NaN, Inf or negative and "
            f"refused), which `forecaster backtest` reads as gaps"
        )
    return line


def _check_token_file(path: str) -> None:
    try:
        token = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInputError(
            "--bearer-token-file", f"cannot read {path!r} ({exc.strerror})"
        ) from exc
    try:
        text = token.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError(
            "--bearer-token-file", f"{path!r} is not UTF-8 text; a token is"
        ) from None
    if not text.strip():  # checked here too, so the message names the flag, before any query
        raise InvalidInputError(
            "--bearer-token-file", f"{path!r} is empty; it must hold the token"
        )


def _check_ca_file(path: str) -> None:
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise InvalidInputError(
            "--ca-file", f"{path!r} is not a PEM bundle of CA certificates ({exc})"
        ) from exc


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
