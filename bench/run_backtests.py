"""`make backtest`: `forecaster backtest` on each sub-daily trace in data/, then one table.

    python bench/run_backtests.py [--model NAME | --models a,b,c] [--max-under-provisioned S,...]
        [--out DIR]

Each trace is evaluated on its last 1,152 five-minute steps (4 days) with --step 5m
--startup 5m and its own per-replica target (below). Outputs go to out/backtest/<trace>, or
out/backtest/<trace>/<model> when several models are compared (`--out` moves out/backtest, so
that runs at different shares can go on side by side). The combined table is built
from the summary.json files the runs wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

from forecaster.backtest.report import format_table
from forecaster.cli import build_parser, main
from forecaster.models import MODEL_FACTORIES

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
OUT = ROOT / "out" / "backtest"

# trace file -> (target per replica, first evaluated interval): the last 1,152 steps.
TRACES: dict[str, tuple[str, str]] = {
    "aws_elb_request_count_8c0756.csv": ("16.70", "2014-04-20T00:40Z"),
    "nasa_http_1995_requests_per_minute.csv": ("9.83", "1995-08-28T04:00Z"),
    "twitter_volume_aapl.csv": ("26.98", "2015-04-19T02:50Z"),
}


def default_model() -> str:
    """The CLI's own default, so this script never disagrees with `forecaster backtest`."""
    args = build_parser().parse_args(["backtest", "trace.csv", "--target", "1"])
    return str(args.model)


def run_one(
    trace: str, target: str, eval_start: str, model: str, out: Path, share: str | None = None
) -> int:
    argv = [
        "backtest", str(DATA / trace), "--target", target, "--eval-start", eval_start,
        "--step", "5m", "--startup", "5m", "--model", model, "--out", str(out),
    ]
    if share is not None:
        argv += ["--max-under-provisioned", share]
    shown = [str(Path(a).relative_to(ROOT)) if a.startswith(str(ROOT)) else a for a in argv]
    print(f"forecaster {' '.join(shown)}", file=sys.stderr, flush=True)
    printed = io.StringIO()  # each run's own table: the combined one comes at the end
    with contextlib.redirect_stdout(printed):
        return main(argv)


def label(summary: dict[str, Any], model: str, several: bool) -> dict[str, Any]:
    if not several:
        return summary
    width = 34 - len(model) - 1
    return {**summary, "trace": f"{summary['trace'][:width]} {model}"}


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", default=None, help="one model (default: the CLI's default)")
    which.add_argument("--models", default=None, help="several models, comma-separated")
    parser.add_argument("--max-under-provisioned", default=None,
                        help="share(s) of intervals allowed short, comma-separated "
                        "(default: the CLI's, 0.05)")
    parser.add_argument("--out", type=Path, default=OUT,
                        help=f"the folder for the outputs (default: {OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    shares: list[str | None] = (
        [s.strip() for s in args.max_under_provisioned.split(",") if s.strip()]
        if args.max_under_provisioned else [None]
    )
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
    else:
        models = [args.model or default_model()]
    unknown = [m for m in models if m not in MODEL_FACTORIES]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODEL_FACTORIES)}")
    several = len(models) > 1

    summaries: list[dict[str, Any]] = []
    failures: list[str] = []
    for share in shares:
        for trace, (target, eval_start) in TRACES.items():
            for model in models:
                out = args.out / Path(trace).stem
                if several:
                    out = out / model
                if len(shares) > 1:
                    out = out / f"share-{share}"
                code = run_one(trace, target, eval_start, model, out, share)
                if code != 0:
                    failures.append(f"{trace} ({model}): exit code {code}")
                    continue
                summary = json.loads((out / "summary.json").read_text())
                summaries.append(label(summary, model, several))
    if summaries:
        print(format_table(summaries))
        print(f"\noutputs under {args.out}/")
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run())
