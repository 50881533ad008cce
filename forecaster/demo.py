"""The embedded default: bundled traces replayed as live targets, so nothing else is needed."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from forecaster.config import ConfiguredTarget, Settings
from forecaster.errors import InvalidInputError
from forecaster.sources.replay import ReplaySource

DEMO_SERVER = "http://replay.demo"
DEMO_NAMESPACE = "demo"
REPLICAS_AT_PEAK = 10  # targetValue = the 95th percentile of demand / 10, as in the backtests


def default_data_dir() -> Path:
    """The repository's data/ folder (the demo runs from a checkout, as `make run` does)."""
    return Path(__file__).resolve().parent.parent / "data"


def demo_setup(settings: Settings, data_dir: Path | None = None) -> tuple[Settings, ReplaySource]:
    """Settings with one target per bundled sub-daily trace, and the source replaying them."""
    folder = data_dir or default_data_dir()
    if not folder.is_dir() or not any(folder.glob("*.csv")):
        if data_dir is not None:  # the operator's folder: name the flag that gave it
            raise InvalidInputError(
                "--demo-data", f"must be a folder of timestamp,value *.csv traces; "
                f"{str(folder)!r} holds none"
            )
        raise InvalidInputError(
            "--demo", f"no bundled traces in {str(folder)!r}; run from a checkout of the "
            f"project, or give a folder of traces with --demo-data"
        )
    source = ReplaySource.from_folder(folder)
    targets = []
    for query in source.queries:
        _, current = source.query_instant(query)
        history = source.query_range(
            query, *source.window(query, days=4), step_seconds=300
        )
        peak = float(history.quantile(0.95)) if len(history) else current
        target_value = max(peak / REPLICAS_AT_PEAK, 1e-3)
        targets.append(
            ConfiguredTarget(
                namespace=DEMO_NAMESPACE,
                name=query.split("_")[0],
                metadata={
                    "serverAddress": DEMO_SERVER,
                    "query": query,
                    "targetValue": f"{math.ceil(target_value * 100) / 100:g}",
                },
            )
        )
    return replace(settings, targets=(*settings.targets, *targets), servers=()), source
