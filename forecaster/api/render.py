"""Engine objects as the API's JSON: plain dicts, camelCase keys, ISO-8601 UTC times.

Numbers go through `finite`: JSON has no NaN or Infinity, so a missing number is null.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from forecaster.api.inputs import finite
from forecaster.engine import Engine
from forecaster.models import Forecast
from forecaster.policy import PlannedLoad
from forecaster.target import ShareHeld, Target, freshness_limit


def iso(moment: float | pd.Timestamp | None) -> str | None:
    """Epoch seconds or a timestamp as '2024-05-01T12:00:00Z' (null when unknown)."""
    if moment is None:
        return None
    if isinstance(moment, pd.Timestamp):
        moment = moment.timestamp()
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z"
    )


def quantile_key(q: float) -> str:
    """0.9 -> "0.9": the shortest text that reads back as the same number."""
    return repr(float(q))


def split_id(target_id: str) -> dict[str, str]:
    """Namespaces and metric names hold no slash; a configured target's name may."""
    namespace, rest = target_id.split("/", 1)
    name, metric = rest.rsplit("/", 1)
    return {"namespace": namespace, "name": name, "metric": metric}


def target_status(engine: Engine, target: Target) -> dict[str, Any]:
    """What GET /api/v1/targets says about one target; reads only the published snapshot."""
    snapshot, spec = target.snapshot, target.spec
    age = engine.age(snapshot)
    limit = freshness_limit(engine.settings, spec)
    accuracy = target.accuracy()
    planned = engine.serving_outage(target.target_id) or snapshot.planned
    return {
        "id": target.target_id,
        **split_id(target.target_id),
        "configured": target.configured,
        "model": snapshot.model,
        "requestedModel": spec.model,
        "mode": planned.mode if planned is not None else None,
        "outageSince": iso(planned.outage_since) if planned is not None else None,
        "lastFit": iso(snapshot.fitted_at),
        "restored": target.restored,
        "forecastMadeAt": finite(snapshot.forecast_made_at),
        "lastPoint": iso(snapshot.current_time),
        "ageSeconds": finite(age),
        "fresh": age <= limit,
        "freshnessLimitSeconds": limit,
        "currentValue": finite(snapshot.current_value),
        "plannedValue": finite(planned.value) if planned is not None else None,
        "historyPoints": snapshot.history_points,
        "accuracy": {
            "scored": accuracy.scored,
            "mae": finite(accuracy.mae),
            "coverage80": finite(accuracy.coverage_80),
            "lastAbsError": finite(accuracy.last_abs_error),
        },
        "fits": {
            "count": target.fits,
            "failures": target.fit_failures,
            "fallbacks": target.fallbacks,
            "refreshFailures": target.refresh_failures,
            "lastFitSeconds": finite(target.fit_seconds[-1]) if target.fit_seconds else None,
        },
        "lastError": snapshot.last_error,
        "spec": {
            "query": spec.query,
            "serverAddress": spec.server_address,
            "targetValue": spec.target_value,
            "quantile": spec.quantile,
            "planHalfLifeSeconds": spec.plan_half_life_seconds,
            "stepSeconds": spec.step_seconds,
            "startupSeconds": spec.startup_seconds,
            "historyWindowSeconds": spec.history_window_seconds,
        },
    }


def forecast_json(
    forecast: Forecast, horizon: int, quantiles: Sequence[float], model: str
) -> dict[str, Any]:
    """The first `horizon` steps of `forecast`, with the mean and each of `quantiles`, named
    as made by `model` (for `auto`, the model it chose)."""
    # origin + k steps by arithmetic: pandas' date_range costs more than the rest together.
    origin, step = forecast.origin.timestamp(), forecast.step.total_seconds()
    stamps = [origin + k * step for k in range(1, horizon + 1)]
    bands = {quantile_key(q): forecast.quantile(q)[:horizon] for q in quantiles}
    points = [
        {
            "timestamp": iso(stamp),
            "mean": finite(float(forecast.mean[i])),
            "quantiles": {key: finite(float(band[i])) for key, band in bands.items()},
        }
        for i, stamp in enumerate(stamps)
    ]
    return {
        "model": model,
        "origin": iso(forecast.origin),
        "stepSeconds": int(forecast.step.total_seconds()),
        "horizon": horizon,
        "quantiles": list(quantiles),
        "points": points,
    }


def planned_json(planned: PlannedLoad) -> dict[str, Any]:
    return {
        "mode": planned.mode,
        "quantile": planned.quantile,
        "forecastAtQuantile": finite(planned.forecast),
        "smoothedForecast": finite(planned.smoothed),
        "peakOverLead": finite(planned.peak_over_lead),
        "current": finite(planned.current),
        "floor": finite(planned.floor),
        "planned": finite(planned.value),
        "floored": planned.floored,
        "scheduledMinimum": finite(planned.scheduled_minimum),
        "horizonSteps": planned.horizon_steps,
        "planLevel": finite(planned.slo_level),
        "outageSince": iso(planned.outage_since),
    }


def share_json(share: ShareHeld | None) -> dict[str, Any] | None:
    """How the target holds its maxUnderProvisioned (null for a fixed quantile)."""
    if share is None:
        return None
    return {
        "asked": share.asked,
        "achieved": {window: finite(value) for window, value in share.achieved.items()},
        "judgedIntervals": dict(share.judged),
        "level": finite(share.level),
    }
