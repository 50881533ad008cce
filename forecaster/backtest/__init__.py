"""Offline backtests: how predictive scaling would have done against reactive on a real trace."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forecaster.backtest.scoring import forecast_accuracy, score_policy
from forecaster.backtest.simulate import BacktestConfig, Simulation, simulate
from forecaster.errors import InvalidInputError
from forecaster.series import RegularSeries

__all__ = [
    "BacktestConfig", "BacktestResult", "check_output_folder", "run_backtest", "write_outputs",
]

DECISION_COLUMNS = [
    "timestamp", "demand", "forecast", "forecast_at_quantile", "slo_level", "replicas",
    "reactive_replicas", "oracle_replicas",
]
FORECAST_COLUMNS = ["origin", "timestamp", "step_ahead", "yhat", "lower", "upper", "model"]


class BacktestResult:
    """A simulation and its summary (a JSON-ready dict)."""

    def __init__(self, simulation: Simulation, summary: dict[str, Any]) -> None:
        self.simulation = simulation
        self.summary = summary


def run_backtest(
    grid: RegularSeries,
    config: BacktestConfig,
    *,
    name: str = "trace",
    progress: Callable[[int, int], None] | None = None,
) -> BacktestResult:
    """Simulate and score; intervals whose demand is missing are skipped and counted."""
    sim = simulate(grid, config, progress)
    d = sim.decisions
    scored = d["demand"].notna().to_numpy()
    demand = d["demand"].to_numpy()[scored]
    oracle = d["oracle_replicas"].to_numpy()[scored]
    step_hours = config.step / pd.Timedelta(hours=1)
    # A missing planned load (inside a long gap) leaves an HPA where it was: hold the last one,
    # as hpa_step does, rather than let one NaN make every multiplier's cost NaN.
    planned_predictive = d["forecast"].ffill().to_numpy()
    planned_reactive = pd.Series(sim.planned_reactive).ffill().to_numpy()
    policies = {
        "predictive": score_policy(
            planned_predictive[scored], d["replicas"].to_numpy()[scored],
            demand, oracle, config.target, step_hours,
        ),
        "reactive": score_policy(
            planned_reactive[scored], d["reactive_replicas"].to_numpy()[scored],
            demand, oracle, config.target, step_hours,
        ),
        "oracle": score_policy(demand, oracle, demand, oracle, config.target, step_hours),
    }
    accuracy = forecast_accuracy(
        demand,
        d["forecast_mean"].to_numpy()[scored],
        d["lower"].to_numpy()[scored],
        d["upper"].to_numpy()[scored],
        sim.history_demand,
        grid.steps_per_day,
    )
    models = sim.forecasts.drop_duplicates("origin")["model"].value_counts()
    summary: dict[str, Any] = {
        "trace": name,
        "target": config.target,
        "step_seconds": int(config.step.total_seconds()),
        "startup_seconds": int(config.startup.total_seconds()),
        "lead_steps": config.lead_steps,
        "horizon_steps": 1 + config.lead_steps,
        "model": config.model,
        "quantile": config.quantile,
        "max_under_provisioned": config.max_under_provisioned,
        "warmup_seconds": (
            int(config.warmup.total_seconds())
            if config.max_under_provisioned is not None else 0
        ),
        "slo_level_last": (
            float(sim.controller.level) if sim.controller is not None else None
        ),
        "reactive_floor": config.reactive_floor,
        "stabilization_seconds": int(config.stabilization.total_seconds()),
        "min_replicas": config.min_replicas,
        "max_replicas": config.max_replicas,
        "plan_half_life_seconds": int(config.plan_half_life.total_seconds()),
        "eval_start": sim.eval_start.isoformat(),
        "eval_end": d["timestamp"].iloc[-1].isoformat(),
        "intervals": len(d),
        "missing_demand_intervals": int((~scored).sum()),
        "long_gaps_in_trace": len(grid.gaps),
        "held_steps_in_trace": grid.held_steps,
        "refits": sim.refits,
        "fallback_fits": sim.fallbacks,
        "models_used": {str(k): int(v) for k, v in models.items()},
        "fit_seconds_mean": float(np.mean(sim.fit_seconds)) if sim.fit_seconds else 0.0,
        "policies": {key: asdict(score) for key, score in policies.items()},
        "selections": sim.selections,
        "forecast": accuracy,
    }
    return BacktestResult(sim, _json_safe(summary))


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_output_folder(out: Path) -> None:
    """Fail before a long run when `out` cannot be made a writable folder; creates nothing."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is" if existing == out else f"is under {str(existing)!r}, which is"
        raise InvalidInputError("--out", f"{str(out)!r} {what} not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise InvalidInputError(
            "--out", f"cannot create files in {str(existing)!r} ({exc.strerror})"
        ) from exc


def write_outputs(result: BacktestResult, out: Path) -> None:
    """decisions.csv, forecasts.csv, summary.json and report.png under `out`."""
    try:
        _write_outputs(result, out)
    except OSError as exc:
        where = exc.filename if exc.filename is not None else out
        raise InvalidInputError("--out", f"cannot write {str(where)!r} ({exc.strerror})") from exc


def _write_outputs(result: BacktestResult, out: Path) -> None:
    from forecaster.backtest.report import plot_report

    out.mkdir(parents=True, exist_ok=True)
    decisions = result.simulation.decisions[DECISION_COLUMNS].copy()
    decisions["timestamp"] = _iso(decisions["timestamp"])
    decisions.to_csv(out / "decisions.csv", index=False)
    forecasts = result.simulation.forecasts[FORECAST_COLUMNS].copy()
    forecasts["origin"] = _iso(forecasts["origin"])
    forecasts["timestamp"] = _iso(forecasts["timestamp"])
    forecasts.to_csv(out / "forecasts.csv", index=False)
    (out / "summary.json").write_text(json.dumps(result.summary, indent=2) + "\n")
    plot_report(result, out / "report.png")


def _iso(times: pd.Series) -> pd.Series:
    return pd.DatetimeIndex(times).strftime("%Y-%m-%dT%H:%M:%SZ").to_series(index=times.index)
