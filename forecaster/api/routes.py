"""The REST API under /api/v1 (JSON in, JSON out, one error shape), plus /readyz and
/openapi.json.

A target's id is `namespace/name/metricName`; URLs carry it as three path segments:
`/api/v1/targets/<namespace>/<name>/<metric>/...`. Reads come from the engine's published
snapshots and never wait on a fit; the two kinds of heavier work, each at most N at a time
(503 past that), are an ad-hoc fit (in a worker process: forecaster/api/adhoc.py) and a
forecast longer than the snapshot's (predicted in the request from a copy of the model).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
from flask import Blueprint, Response, current_app, jsonify, request
from flask.blueprints import BlueprintSetupState

from forecaster.api import inputs, render
from forecaster.api.adhoc import AdhocJob, AdhocRunner
from forecaster.api.errors import (
    Busy,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    Unprocessable,
    UnsupportedMediaType,
)
from forecaster.api.openapi import openapi_document, target_subresources
from forecaster.config import Settings
from forecaster.engine import Engine
from forecaster.errors import (
    InvalidInputError,
    NotReadyError,
    UnknownTargetError,
)
from forecaster.fitting import release_free_memory
from forecaster.models import Forecast
from forecaster.policy import (
    HpaState,
    ScalingPolicy,
    check_replica_bounds,
    hpa_step,
    recommend,
)
from forecaster.sources import HistorySource
from forecaster.spec import target_id
from forecaster.target import Snapshot, Target, freshness_limit
from forecaster.targets import TargetResolver

blueprint = Blueprint("api", __name__)

# `path:` for the name, as for the plots: KEDA names never hold a slash, a configured one may.
TARGET = "/api/v1/targets/<namespace>/<path:name>/<metric>"
FORECAST_SLOTS = 2  # forecasts beyond the snapshot at once
BUSY_RETRY_AFTER_SECONDS = 5
CACHE_ENTRIES = 64
MAX_REPLICAS = 100_000
ADHOC_KEY = "forecaster.adhoc"
SMALL_BODY_BYTES = 16 * 1024  # a query body's fields (query at most 10,000 chars) fit


class ForecastCache:
    """Long forecasts per (target, horizon, quantiles), valid while the snapshot they were
    computed with is still the target's published one (snapshots are replaced, never mutated)."""

    def __init__(self, size: int = CACHE_ENTRIES) -> None:
        self._size = size
        self._entries: OrderedDict[tuple[Any, ...], tuple[Snapshot, Forecast]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...], snapshot: Snapshot) -> Forecast | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] is not snapshot:
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: tuple[Any, ...], snapshot: Snapshot, forecast: Forecast) -> None:
        with self._lock:
            self._entries[key] = (snapshot, forecast)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


@dataclass
class ApiState:
    """Per-app limits and caches (no module-level state: tests build many apps)."""

    forecast_slots: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(FORECAST_SLOTS)
    )
    cache: ForecastCache = field(default_factory=ForecastCache)
    configured_ids: tuple[str, ...] | None = None


@blueprint.record_once
def _setup(state: BlueprintSetupState) -> None:
    state.app.extensions["forecaster.api"] = ApiState()
    state.app.extensions[ADHOC_KEY] = AdhocRunner()


def _engine() -> Engine:
    engine: Engine = current_app.extensions["forecaster.engine"]
    return engine


def _resolver() -> TargetResolver:
    resolver: TargetResolver = current_app.extensions["forecaster.resolver"]
    return resolver


def _settings() -> Settings:
    settings: Settings = current_app.config["SETTINGS"]
    return settings


def _state() -> ApiState:
    state: ApiState = current_app.extensions["forecaster.api"]
    return state


def _target(namespace: str, name: str, metric: str) -> Target:
    return _engine().get(target_id(namespace, name, metric))


# -- probes and the description ------------------------------------------------------------


@blueprint.get("/readyz")
def readyz() -> tuple[Response, int]:
    """200 while the gRPC scaler serves (and saved state is loaded); 503 with the reason while
    starting or once shutting down. Prometheus plays no part: a pod taken out of the Service
    for a Prometheus outage would leave KEDA's GetMetricSpec unanswered, and its fallback
    never applies then."""
    problem = current_app.extensions.get("forecaster.readiness", lambda: None)()
    if problem is not None:
        raise NotReadyError(problem, retry_after_seconds=1)
    return jsonify(status="ready", configuredTargets=len(_configured_ids())), 200


def _configured_ids() -> tuple[str, ...]:
    """The ids of the config file's targets; computed once per app (settings never change)."""
    state = _state()
    if state.configured_ids is None:
        state.configured_ids = tuple(dict.fromkeys(_resolver().configured_ids()))
    return state.configured_ids


@blueprint.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3 document of every route this app serves."""
    return jsonify(openapi_document())


# -- targets -------------------------------------------------------------------------------


@blueprint.get("/api/v1/targets")
def list_targets() -> Response:
    """Every target with its model, freshness, accuracy, mode, fit counters and last error."""
    engine = _engine()
    targets = sorted(engine.targets(), key=lambda target: target.target_id)
    return jsonify(targets=[render.target_status(engine, target) for target in targets])


@blueprint.get(TARGET)
def get_target(namespace: str, name: str, metric: str) -> Response:
    """One target's status, as in the list."""
    try:
        target = _target(namespace, name, metric)
    except UnknownTargetError:
        _refuse_unknown_subresource(namespace, name, metric)
        raise
    return jsonify(render.target_status(_engine(), target))


def _refuse_unknown_subresource(namespace: str, name: str, metric: str) -> None:
    """A name may hold slashes, so `.../<id>/forecasts` reads as a target whose name ends in
    the id's metric; when that id is a known target, say the route is unknown instead."""
    head, slash, tail = name.rpartition("/")
    if not slash:
        return
    known = target_id(namespace, head, tail)
    try:
        _engine().get(known)
    except UnknownTargetError:
        return
    raise NotFound(
        f"no such route: target {known} has no {metric!r}; it has "
        f"{', '.join(target_subresources())} (see /openapi.json)"
    )


@blueprint.get(f"{TARGET}/forecast")
def get_forecast(namespace: str, name: str, metric: str) -> Response:
    """The forecast per step: `?horizon=N` steps (default: the lead time the scaler plans
    for) and `?quantiles=0.5,0.9` (default: the published bands)."""
    target = _target(namespace, name, metric)
    snapshot = target.snapshot
    published = snapshot.forecast
    if published is None:
        reason = f"; last error: {snapshot.last_error}" if snapshot.last_error else ""
        raise NotReadyError(
            f"target {target.target_id} has no fitted model yet and serves its current value "
            f"reactively{reason}",
            retry_after_seconds=_engine().settings.refresh_seconds,
        )
    horizon = inputs.horizon_param(
        request.args.get("horizon"), target.spec.step_seconds, published.horizon
    )
    quantiles = inputs.quantiles_param(
        request.args.get("quantiles"), tuple(sorted(published.quantiles))
    )
    if horizon <= published.horizon and all(q in published.quantiles for q in quantiles):
        forecast = published
    else:
        snapshot, forecast = _longer_forecast(target, horizon, quantiles)
    body = render.forecast_json(forecast, horizon, quantiles, snapshot.model or forecast.model)
    engine = _engine()
    return jsonify(
        target=target.target_id,
        fresh=engine.age(snapshot) <= _freshness(target),
        ageSeconds=inputs.finite(engine.age(snapshot)),
        **body,
    )


def _freshness(target: Target) -> float:
    return freshness_limit(_engine().settings, target.spec)


def _longer_forecast(
    target: Target, horizon: int, quantiles: tuple[float, ...]
) -> tuple[Snapshot, Forecast]:
    """Predict beyond the snapshot from a copy of the model, taken under the target's lock
    (the engine updates models in place under it); the prediction itself runs unlocked."""
    state = _state()
    key = (target.target_id, horizon, quantiles)
    snapshot = target.snapshot
    cached = state.cache.get(key, snapshot)
    if cached is not None:
        return snapshot, cached
    if not state.forecast_slots.acquire(blocking=False):
        raise Busy(
            f"{FORECAST_SLOTS} forecasts beyond the published horizon are already running; "
            f"retry shortly, or ask for the published horizon and quantiles",
            retry_after=BUSY_RETRY_AFTER_SECONDS,
        )
    try:
        snapshot, forecast = _engine().predict(target.target_id, horizon, quantiles)
    finally:
        state.forecast_slots.release()
    state.cache.put(key, snapshot, forecast)
    return snapshot, forecast


@blueprint.get(f"{TARGET}/decision")
def get_decision(namespace: str, name: str, metric: str) -> Response:
    """The load to plan for and the replicas an HPA would choose for it, with the numbers;
    `minReplicas`, `maxReplicas` and `currentReplicas` show bounds and tolerance applied."""
    target = _target(namespace, name, metric)
    args = request.args
    low = inputs.whole_number(args.get("minReplicas"), "minReplicas", low=0, high=MAX_REPLICAS)
    high = inputs.whole_number(args.get("maxReplicas"), "maxReplicas", low=1, high=MAX_REPLICAS)
    current = inputs.whole_number(
        args.get("currentReplicas"), "currentReplicas", low=0, high=MAX_REPLICAS
    )
    low = 1 if low is None else low
    check_replica_bounds(low, high, ("minReplicas", "maxReplicas"))
    planned = _engine().serve(target.target_id)  # 503 unless fresh, as for KEDA
    dry_run = planned.mode == "dry_run"
    if dry_run and target.snapshot.planned is not None:
        planned = target.snapshot.planned  # what the forecast plans, though KEDA gets less
    policy = ScalingPolicy(
        target_per_replica=target.spec.target_value, min_replicas=low, max_replicas=high
    )
    recommendation = recommend(planned.value, current, policy)
    replicas = hpa_step(HpaState(replicas=current), planned.value, policy).replicas
    limited_by = None
    if replicas is not None and replicas > recommendation:
        limited_by = "minReplicas"
    elif replicas is not None and replicas < recommendation:
        limited_by = "maxReplicas"
    return jsonify(
        target=target.target_id,
        **render.planned_json(planned),
        dryRun=dry_run,
        startupSeconds=target.spec.startup_seconds,
        targetValuePerReplica=target.spec.target_value,
        minReplicas=low,
        maxReplicas=high,
        currentReplicas=current,
        tolerance=policy.tolerance,
        recommendation=recommendation,
        replicas=replicas,
        limitedBy=limited_by,
        underProvisioned=render.share_json(target.snapshot.share),
    )


@blueprint.get(f"{TARGET}/metric")
def get_metric(namespace: str, name: str, metric: str) -> Response:
    """The planned load as a KEDA `metrics-api` value. A ScaledObject trigger reads it with::

        - type: metrics-api
          metadata:
            url: http://forecaster.autoscaling:8080/api/v1/targets/shop/web/fc-1/metric
            valueLocation: value        # a GJSON path into this answer
            targetValue: "50"           # the same targetValue as the forecast target's

    List the target under `targets:` in the config, so it is forecast from start-up; each read
    counts as activity, like a scaler request. When the data is stale this answers 503, so
    KEDA's `fallback` applies.
    """
    target = _target(namespace, name, metric)
    engine = _engine()
    engine.touch(target.target_id)
    planned = engine.serve(target.target_id)
    return jsonify(
        value=planned.value,
        target=target.spec.target_value,
        mode=planned.mode,
        current=planned.current,
        active=engine.is_active(target.target_id),
        metricName=target.spec.effective_metric_name,
    )


# -- ad-hoc forecasts ----------------------------------------------------------------------


@blueprint.post("/api/v1/forecast")
def post_forecast() -> Response:
    """An ad-hoc forecast of inline points, or of a query on a configured Prometheus server
    when the config allows queries (api.allowQueries, which needs apiToken).

    Parsing, fit, prediction and rendering run in a worker process (forecaster/api/adhoc.py),
    bounded: at most MAX_POINTS points, and at most adhoc.SLOTS forecasts at once (503 with
    Retry-After past that).
    """
    if request.mimetype != "application/json":
        given = request.headers.get("Content-Type")
        raise UnsupportedMediaType(
            f"the body must be JSON, sent with 'Content-Type: application/json'; got "
            f"{repr(given) if given else 'no Content-Type'}",
            field="Content-Type",
        )
    data = request.get_data(cache=False)  # over MAX_CONTENT_LENGTH: 413 from Flask
    wanted = _small_request(data)
    runner: AdhocRunner = current_app.extensions[ADHOC_KEY]
    with runner.reserve() as slot:  # the query, too, counts against the slots
        if wanted is None:
            answer = slot.run(AdhocJob(body=data))  # inline points: answered; a query: parsed
            wanted = answer.query
        if wanted is not None:
            history = None if wanted.series is not None else _query_history(wanted)
            answer = slot.run(AdhocJob(request=wanted, history=history))
    if answer.error is not None:
        raise _refusal(*answer.error)
    response = Response(answer.json, mimetype="application/json")
    # The raw body and the answer leave freed blocks with the C allocator; once the answer is
    # sent, they go back to the system.
    response.call_on_close(release_free_memory)
    return response


def _small_request(data: bytes) -> inputs.AdhocRequest | None:
    """A body up to SMALL_BODY_BYTES (every query body) is parsed here, so that a refused query
    costs no worker; a larger one (None) is parsed in the worker."""
    if len(data) > SMALL_BODY_BYTES:
        return None
    body = inputs.parse_body(data)
    if inputs.wants_query(body):
        _check_queries_allowed()
    return inputs.adhoc_request(body)


def _refusal(kind: str, message: str, field: str | None) -> Exception:
    """A worker's refusal as the error it was there."""
    if kind == "invalid":
        return InvalidInputError(field or "body", message)
    if kind == "too_large":
        return PayloadTooLarge(message, field=field)
    return Unprocessable(message, field=field)


def _check_queries_allowed() -> None:
    """A query runs with forecaster's own Prometheus credentials: only when the operator
    allowed it, and only for callers holding the API token (checked before any route)."""
    settings = _settings()
    if settings.api.allow_queries and settings.api_token:
        return
    missing = ("apiToken: {file: PATH}" if settings.api.allow_queries
               else "api: {allowQueries: true} (with apiToken)")
    raise PermissionDenied(
        f"forecasts of a Prometheus query are off on this service: a query runs with "
        f"forecaster's own Prometheus credentials. Send the points inline as 'series', or "
        f"have the operator add {missing} to the config",
        field="query",
    )


def _adhoc_source(address: str) -> HistorySource:
    """Only servers the operator configured; an ad-hoc query never goes anywhere else."""
    settings = _settings()
    if not settings.servers and not settings.demo:
        raise InvalidInputError(
            "serverAddress",
            "no Prometheus servers are configured, and ad-hoc queries only go to servers "
            "listed under 'prometheus:' in the config; send the points inline as 'series'",
        )
    return _resolver().sources.for_address(address)


def _query_history(wanted: inputs.AdhocRequest) -> pd.Series:
    _check_queries_allowed()  # again: a query body padded past SMALL_BODY_BYTES came by the worker
    source = _adhoc_source(wanted.server_address or "")
    step = wanted.step_seconds
    now = _engine().clock()
    end = datetime.fromtimestamp(math.floor(now / step) * step, UTC)
    start = end - timedelta(seconds=(wanted.history_steps - 1) * step)
    return source.query_range(wanted.query or "", start, end, step)
