"""The `forecaster` command: argument parsing and error reporting only; work lives elsewhere."""

from __future__ import annotations

import argparse
import reprlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import pandas as pd

from forecaster.durations import format_duration, parse_duration
from forecaster.errors import ForecasterError, InsufficientHistoryError, InvalidInputError
from forecaster.fitting import pin_math_threads
from forecaster.spec import (
    CEILING_STARTUP_SECONDS,
    DEFAULT_PLAN_HALF_LIFE_SECONDS,
    DEFAULT_STABILIZATION_SECONDS,
    MAX_STABILIZATION_SECONDS,
    MAX_STEP_SECONDS,
    MAX_TARGET_VALUE,
    MIN_STEP_SECONDS,
    MIN_TARGET_VALUE,
)

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


class ProgressBar:
    """Progress on stderr, shown once a run has taken `delay` seconds: a redrawn bar on a
    terminal, a plain line at each quarter otherwise (so logs stay readable)."""

    def __init__(self, label: str, delay: float = 2.0, width: int = 30) -> None:
        self.label, self.delay, self.width = label, delay, width
        self.began = time.monotonic()
        self.last_draw = 0.0
        self.quarters_shown = 0
        self.terminal = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.began < self.delay:
            return
        elapsed = now - self.began
        if not self.terminal:
            quarter = 4 * done // max(total, 1)
            if quarter > self.quarters_shown:
                self.quarters_shown = quarter
                sys.stderr.write(f"{self.label}: {done}/{total} in {elapsed:.0f}s\n")
            return
        if now - self.last_draw < 0.2 and done < total:
            return
        self.last_draw = now
        filled = int(self.width * done / max(total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        sys.stderr.write(f"\r{self.label} [{bar}] {done}/{total} {elapsed:.0f}s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


MAX_PORT = 65_535
# export's per-request timeout: a query unanswered in a day will not be answered, and a socket
# cannot wait as long as a Timedelta can say.
MAX_TIMEOUT_SECONDS = 86_400
# Kubernetes counts replicas in an int32.
MAX_REPLICAS = 2**31 - 1
# The longest duration a pandas Timedelta holds, in whole days: the bound of a flag whose
# meaning has none ("refit every N" longer than the trace simply never refits).
LONGEST_DURATION_SECONDS = int(pd.Timedelta.max.total_seconds()) // 86_400 * 86_400


def _duration(
    field: str, low: int = 0, high: int = LONGEST_DURATION_SECONDS
) -> argparse._ActionType:
    """A flag's duration parser, bounded to [low, high] seconds before pandas sees it."""

    def parse(text: str) -> pd.Timedelta:
        try:
            seconds = parse_duration(text, field)
        except InvalidInputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if not low <= seconds <= high:
            raise argparse.ArgumentTypeError(
                f"must be from {format_duration(low)!r} to {format_duration(high)!r}; "
                f"got {reprlib.repr(text)}"
            )
        return pd.Timedelta(seconds=seconds)

    parse.__name__ = "duration"
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{reprlib.repr(text)} is not a number") from None


def _positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"must be a positive finite number, got {reprlib.repr(text)}"
        )
    return value


def _target(text: str) -> float:
    value = _number(text)
    if not MIN_TARGET_VALUE <= value <= MAX_TARGET_VALUE:  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"must be from {MIN_TARGET_VALUE} to {MAX_TARGET_VALUE:.0e}, like a trigger's "
            f"targetValue; got {reprlib.repr(text)}: scale the trace instead"
        )
    return value


def _whole_number(text: str) -> int:
    from forecaster.config import whole_number

    try:
        return whole_number(text, "")
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(exc.reason) from None


def _replicas(low: int) -> argparse._ActionType:
    def parse(text: str) -> int:
        value = _whole_number(text)
        if not low <= value <= MAX_REPLICAS:
            raise argparse.ArgumentTypeError(
                f"must be from {low} to {MAX_REPLICAS:,} (Kubernetes' int32); "
                f"got {reprlib.repr(text)}"
            )
        return value

    parse.__name__ = "replicas"
    return parse


def _port(text: str) -> int:
    value = _whole_number(text)
    if not 0 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(
            f"must be from 0 (any free port) to {MAX_PORT}, got {reprlib.repr(text)}"
        )
    return value


def _path(text: str) -> Path:
    if not text.strip():  # Path("") is ".", the current folder: never what was meant
        raise argparse.ArgumentTypeError("must not be empty; give a path")
    return Path(text)


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _quantile(text: str) -> float:
    value = _number(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {reprlib.repr(text)}")
    return value


def _share(text: str) -> float:
    value = _number(text)
    if not 0.0 < value < 0.5:
        raise argparse.ArgumentTypeError(f"must be in (0, 0.5), got {reprlib.repr(text)}")
    return value


def _time_zone(text: str) -> str:
    from forecaster.spec import parse_time_zone

    try:
        return parse_time_zone(text, "time-zone")
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _timestamp(text: str) -> pd.Timestamp:
    message = f"{reprlib.repr(text)} is not an ISO-8601 time (e.g. 2024-05-01T00:00Z)"
    try:
        value = pd.Timestamp(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(message) from None
    if pd.isna(value):  # "", "NaT" and "nan" give NaT rather than an error
        raise argparse.ArgumentTypeError(message)
    value = value.tz_localize("UTC") if value.tzinfo is None else value.tz_convert("UTC")
    # Later steps work in nanoseconds, which span 1677-09-21 .. 2262-04-11 only.
    first, last = pd.Timestamp.min.ceil("D"), pd.Timestamp.max.floor("D")
    if not first.tz_localize("UTC") <= value <= last.tz_localize("UTC"):
        raise argparse.ArgumentTypeError(
            f"must be from {first.date()} to {last.date()}, got {reprlib.repr(text)}"
        )
    return value


def _add_backtest(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from forecaster.models import MODEL_FACTORIES

    p = sub.add_parser(
        "backtest",
        help="replay a CSV trace: predictive vs reactive scaling",
        description="Replay a timestamp,value CSV decision by decision (no look-ahead) and "
        "compare predictive scaling with a reactive HPA and a perfect-foresight oracle.",
    )
    p.add_argument("input", type=_path, help="CSV with columns timestamp,value")
    p.add_argument("--target", type=_target, required=True,
                   help="load one replica handles (the HPA target value)")
    p.add_argument("--step", type=_duration("step", MIN_STEP_SECONDS, MAX_STEP_SECONDS),
                   default=pd.Timedelta("5min"), help="grid step (default 5m)")
    p.add_argument("--startup", type=_duration("startup", 0, CEILING_STARTUP_SECONDS),
                   default=pd.Timedelta("5min"),
                   help="pod start-up time, the lead time (default 5m; at most 1d, "
                   "the most a service's maxStartup allows)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--eval-start", type=_timestamp, default=None,
                      help="first evaluated interval (ISO-8601); off-grid rounds up")
    when.add_argument("--eval-days", type=_positive_float, default=4.0,
                      help="evaluate the last N days (default 4)")
    p.add_argument("--refit", type=_duration("refit", 1), default=pd.Timedelta("1h"),
                   help="refit interval, anchored at the evaluation start (default 1h)")
    p.add_argument("--model", default="auto", choices=sorted(MODEL_FACTORIES),
                   help="forecasting model (default auto: chosen by backtesting recent history)")
    p.add_argument("--max-under-provisioned", type=_share, default=None,
                   help="share of intervals allowed short of capacity, held by moving a level "
                   "on the plan (default 0.05)")
    p.add_argument("--quantile", type=_quantile, default=None,
                   help="expert: plan this demand quantile as it is, with no level moved "
                   "(the plan's base quantile is 0.9 otherwise)")
    p.add_argument("--time-zone", type=_time_zone, default="UTC",
                   help="IANA zone whose wall clock the daily and weekly seasons follow "
                   "(default UTC)")
    p.add_argument("--no-floor", action="store_true",
                   help="do not floor the planned load at the demand of the last two intervals")
    p.add_argument("--plan-half-life", type=_duration("plan-half-life"),
                   default=pd.Timedelta(seconds=DEFAULT_PLAN_HALF_LIFE_SECONDS),
                   help="half-life of the moving average of quantile forecasts that the plan "
                   "follows (default 10m; 0 plans each forecast as it is)")
    p.add_argument("--stabilization", type=_duration("stabilization", 0,
                                                     MAX_STABILIZATION_SECONDS),
                   default=pd.Timedelta(seconds=DEFAULT_STABILIZATION_SECONDS),
                   help="the HPA's scale-down stabilization window, as the ScaledObject sets "
                   "it (default 5m, the HPA's own; at most 1h)")
    p.add_argument("--min-replicas", type=_replicas(0), default=1,
                   help="the fewest replicas, as minReplicaCount sets it (default 1)")
    p.add_argument("--max-replicas", type=_replicas(1), default=None,
                   help="the most replicas, as maxReplicaCount sets it (default: no maximum)")
    p.add_argument("--out", type=_path, default=None,
                   help="output folder (default out/backtest/<input name>)")
    p.set_defaults(handler=_run_backtest)


def _run_backtest(args: argparse.Namespace) -> int:
    from forecaster.backtest import (
        BacktestConfig,
        check_output_folder,
        run_backtest,
        write_outputs,
    )
    from forecaster.backtest.report import format_table
    from forecaster.backtest.simulate import evaluation_start
    from forecaster.series import read_csv, to_grid

    if args.quantile is not None and args.max_under_provisioned is not None:
        raise InvalidInputError(
            "--quantile, --max-under-provisioned",
            "give one: a fixed quantile moves no level, a share moves one",
        )
    fixed = args.quantile is not None
    config = BacktestConfig(
        target=args.target,
        step=args.step,
        startup=args.startup,
        eval_start=args.eval_start,
        eval_days=args.eval_days,
        refit=args.refit,
        model=args.model,
        quantile=args.quantile if fixed else 0.9,
        max_under_provisioned=None if fixed else (args.max_under_provisioned or 0.05),
        time_zone=args.time_zone,
        reactive_floor=not args.no_floor,
        plan_half_life=args.plan_half_life,
        stabilization=args.stabilization,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
    )
    grid = to_grid(read_csv(args.input), config.step)
    evaluation_start(grid, config)  # a bad --eval-start or --eval-days fails before any output
    out = args.out or Path("out") / "backtest" / args.input.stem
    check_output_folder(out)
    result = run_backtest(grid, config, name=args.input.stem, progress=ProgressBar("backtest"))
    write_outputs(result, out)
    print(format_table([result.summary]))
    print(f"\nwrote {out}/decisions.csv, forecasts.csv, summary.json, report.png")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="run the KEDA external scaler (gRPC) and the HTTP API",
        description="Start the engine, the gRPC external scaler and the HTTP API. Settings come "
        "from --config (or FORECASTER_CONFIG), then FORECASTER_* variables, then these flags.",
    )
    p.add_argument("--config", type=_path, default=None, help="YAML settings file")
    p.add_argument("--grpc-port", type=_port, default=None, help="gRPC port (default 50051)")
    p.add_argument("--http-port", type=_port, default=None, help="HTTP port (default 8080)")
    p.add_argument("--host", type=_text, default=None,
                   help="address to bind (default 0.0.0.0)")
    p.add_argument("--state-dir", type=_path, default=None,
                   help="directory to keep each target's fitted model and state in, to serve "
                   "from at a restart (created if missing; only forecaster may write it)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="the least severe log records written to stderr (default INFO)")
    p.add_argument("--demo", action="store_true",
                   help="serve the bundled traces, replayed as live targets (no Prometheus)")
    p.add_argument("--demo-data", type=_path, default=None,
                   help="folder of timestamp,value CSV traces for --demo (default: data/)")
    p.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from forecaster.config import load_settings, setting_name
    from forecaster.fitting import limit_malloc_arenas
    from forecaster.logs import configure_logging
    from forecaster.service import Service, run_until_signalled

    if args.demo_data is not None and not args.demo:
        raise InvalidInputError(
            "--demo-data", "names the traces --demo replays and is ignored without it; "
            "add --demo, or drop --demo-data to serve the configured targets"
        )
    limit_malloc_arenas()  # before the service's threads start
    configure_logging(args.log_level)
    overrides = {"grpcPort": args.grpc_port, "httpPort": args.http_port, "host": args.host,
                 "stateDir": args.state_dir}
    settings = load_settings(args.config, overrides=overrides, path_name="--config")
    _check_host(settings.host, "--host" if args.host is not None else setting_name("host"))
    if settings.state_dir is not None:
        from forecaster.state import check_directory

        origin = "--state-dir" if args.state_dir is not None else setting_name("stateDir")
        check_directory(settings.state_dir, origin)
    source = None
    if args.demo:
        from forecaster.demo import demo_setup

        settings, source = demo_setup(settings, args.demo_data)
    return run_until_signalled(Service(settings, source=source))


def _check_host(host: str, field: str) -> None:
    """Fail before anything starts when the address to bind cannot be resolved."""
    import socket

    try:
        socket.getaddrinfo(host, None, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidInputError(
            field, f"cannot resolve {reprlib.repr(host)} to an address to bind ({exc})"
        ) from None


def _add_export(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export",
        help="write a PromQL series from Prometheus as the CSV that backtest reads",
        description="Evaluate one PromQL query over a time range and write timestamp,value CSV "
        "(ISO-8601 UTC, strictly increasing, values as given) to --out or stdout.",
    )
    p.add_argument("--server", required=True, help="Prometheus URL, e.g. http://prometheus:9090")
    p.add_argument("--query", required=True, help="PromQL returning one series (aggregate it)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--start", type=_timestamp, default=None, help="first point (ISO-8601)")
    when.add_argument("--days", type=_positive_float, default=14.0,
                      help="export the N days before --end (default 14)")
    p.add_argument("--end", type=_timestamp, default=None,
                   help="last point (ISO-8601; default now, floored to the step)")
    p.add_argument("--step", type=_duration("step", 1, MAX_STEP_SECONDS),
                   default=pd.Timedelta("1min"), help="resolution (default 1m)")
    p.add_argument("--out", type=_path, default=None, help="CSV file to write (default stdout)")
    p.add_argument("--bearer-token-file", type=_path, default=None,
                   help="file holding a bearer token")
    p.add_argument("--header", action="append", default=[], metavar="NAME=VALUE",
                   help="extra HTTP header, e.g. X-Scope-OrgID=team-a (repeatable)")
    p.add_argument("--ca-file", type=_path, default=None,
                   help="CA bundle to verify an https server")
    p.add_argument("--insecure-skip-verify", action="store_true",
                   help="do not verify the server's TLS certificate")
    p.add_argument("--timeout", type=_duration("timeout", 1, MAX_TIMEOUT_SECONDS),
                   default=pd.Timedelta("30s"),
                   help="per-request timeout (default 30s)")
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    import os
    from datetime import UTC, datetime

    from forecaster import export

    server = export.export_server(
        args.server,
        bearer_token_file=None if args.bearer_token_file is None else str(args.bearer_token_file),
        headers=[export.parse_header(text) for text in args.header],
        ca_file=None if args.ca_file is None else str(args.ca_file),
        insecure_skip_verify=args.insecure_skip_verify,
        timeout_seconds=args.timeout.total_seconds(),
    )
    step = int(args.step.total_seconds())
    start, end = export.export_window(
        step_seconds=step,
        now=datetime.now(UTC),
        start=None if args.start is None else args.start.to_pydatetime(),
        end=None if args.end is None else args.end.to_pydatetime(),
        days=args.days,
    )
    if args.out is not None:
        export.check_output_path(args.out)
    refused: list[int] = []
    series = export.fetch_series(
        server, args.query, start, end, step, refused=lambda _reason, count: refused.append(count)
    )
    if args.out is None:
        try:
            export.write_csv(series, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:
            # The reader left (`| head`): say so once; stdout goes to devnull so that Python's
            # own flush at exit does not print a traceback.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            print("forecaster: error: stdout was closed before the CSV was all written "
                  f"({len(series)} rows); give --out to write a file", file=sys.stderr)
            return EXIT_FAILURE
    else:
        export.write_csv_file(series, args.out)
    points = export.grid_points(start, end, step)
    line = export.summary(series, str(args.out or "stdout"), points=points, refused=sum(refused))
    print(line, file=sys.stderr)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {_one_line(message)} "
                  f"(see {self.prog} --help)\n")


def _one_line(message: str) -> str:
    """A message on one line: some carry a library's multi-line text (a YAML parser's)."""
    return " ".join(message.split())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="forecaster", description="Predictive autoscaling for Kubernetes, served to KEDA."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_backtest(sub)
    _add_serve(sub)
    _add_export(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    pin_math_threads()
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None and args.handler is _run_serve:  # this process's own command line
        from forecaster.fitting import use_system_allocator

        use_system_allocator()
    try:
        return int(args.handler(args))
    except (InvalidInputError, InsufficientHistoryError) as exc:
        print(f"forecaster: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ForecasterError as exc:
        print(f"forecaster: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
