"""The target spec language: a TriggerSpec, its defaults, and its parsing from string metadata.

KEDA sends a trigger's metadata (``scalerMetadata``, every value a string); the config file's
``defaults:`` and ``targets:`` use the same keys. This module imports neither numpy nor pandas,
so the scaler's front process can parse a trigger itself.

A ScaledObject trigger looks like::

    triggers:
      - type: external
        metadata:
          scalerAddress: forecaster.autoscaling:50051
          serverAddress: http://prometheus.monitoring:9090
          query: sum(rate(http_requests_total{service="web"}[5m]))
          targetValue: "50"
          historyWindow: 14d
          step: 5m
          planHalfLife: 10m     # 0 plans each quantile forecast as it is
          excludeFromTraining: "2026-11-20T10:00Z/2026-11-20T14:30Z"   # an incident
          scheduledMinReplicas: "2026-12-24T08:00/2026-12-24T20:00=12" # a campaign, local time
          outageHorizon: 30m    # forecast through a Prometheus outage this long; 0: off
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import reprlib
import zoneinfo
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from forecaster.durations import format_duration, parse_duration
from forecaster.errors import InvalidInputError
from forecaster.windows import Window, parse_windows

__all__ = [
    "AUTO_MODEL",
    "DEFAULT_LIMITS",
    "DEFAULT_OUTAGE_HORIZON_SECONDS",
    "DEFAULT_PLAN_HALF_LIFE_SECONDS",
    "DEFAULT_TARGET_MEMORY_BYTES",
    "IGNORED_KEDA_KEYS",
    "LIMIT_CEILINGS",
    "MAX_OUTAGE_HORIZON_SECONDS",
    "MAX_TARGET_VALUE",
    "METADATA_KEYS",
    "MIN_TARGET_VALUE",
    "MemoryEstimate",
    "MetricSpec",
    "TriggerLimits",
    "TriggerSpec",
    "changed_keys",
    "check_memory",
    "check_object_ref",
    "default_metric_name",
    "memory_estimate",
    "metric_spec",
    "parse_time_zone",
    "parse_trigger_metadata",
    "quoted",
    "resolve_from_env",
]

AUTO_MODEL = "auto"
"""The model value that lets backtests pick; always accepted besides the known models."""

METADATA_KEYS: Mapping[str, str] = {
    "serverAddress": "server_address",
    "query": "query",
    "targetValue": "target_value",
    "startupSeconds": "startup_seconds",
    "quantile": "quantile",
    "maxUnderProvisioned": "max_under_provisioned",
    "scaleDownStabilization": "scale_down_stabilization_seconds",
    "planHalfLife": "plan_half_life_seconds",
    "historyWindow": "history_window_seconds",
    "step": "step_seconds",
    "model": "model",
    "activationValue": "activation_value",
    "metricName": "metric_name",
    "timeZone": "time_zone",
    "excludeFromTraining": "exclude_from_training",
    "scheduledMinReplicas": "scheduled_min_replicas",
    "outageHorizon": "outage_horizon_seconds",
}
"""Each metadata key this scaler reads, and the TriggerSpec field it fills."""

IGNORED_KEDA_KEYS = frozenset({"scalerAddress", "enableTLS", "unsafeSsl"})
"""Keys KEDA itself reads from the same trigger; skipped silently, as is any other
``*FromEnv`` key."""

FROM_ENV = "FromEnv"
"""KEDA resolves ``xFromEnv`` from the workload's environment and sends the value under that
key; forecaster reads it as the value of ``x``."""

# KEDA sends targetValue to the HPA in millis: below one milli it is a zero target, which
# Kubernetes rejects; above 1e15 the integer targetSize leaves int64 headroom.
MIN_TARGET_VALUE = 0.001
MAX_TARGET_VALUE = 1e15

# Settings that name a target by themselves; every other key counts in the default metric
# name only when it differs from its default.
_IDENTITY_KEYS = frozenset({"serverAddress", "query", "targetValue", "metricName"})

DEFAULT_PLAN_HALF_LIFE_SECONDS = 600
DEFAULT_OUTAGE_HORIZON_SECONDS = 30 * 60
MIN_STEPS_IN_HISTORY = 10
DEFAULT_MAX_UNDER_PROVISIONED = 0.05
DEFAULT_STABILIZATION_SECONDS = 300  # the HPA's own default scale-down window
MAX_STABILIZATION_SECONDS = 3_600
# Bounds on what one trigger may ask for: each keeps a target's memory and its queries to
# Prometheus within what one service of many targets can hold. Startup, outage horizon,
# history, points and query bytes are TriggerLimits' defaults, which the operator may raise.
MAX_STARTUP_SECONDS = 6 * 3_600
MAX_OUTAGE_HORIZON_SECONDS = 6 * 3_600
MAX_HISTORY_SECONDS = 90 * 86_400
MIN_STEP_SECONDS = 10
MAX_STEP_SECONDS = 3_600
MAX_POINTS = 50_000
MAX_QUERY_BYTES = 8 * 1_024
MAX_METRIC_NAME = 128
MIN_QUANTILE = 0.5
# How far an operator may raise those five bounds (TriggerLimits): past them a trigger's
# queries or its forecasts stop being a sane request whatever memory it is given. A query goes
# in a GET's URL (prometheus-api-client's default), up to three times longer once encoded.
CEILING_STARTUP_SECONDS = 24 * 3_600
CEILING_OUTAGE_HORIZON_SECONDS = 24 * 3_600
CEILING_HISTORY_SECONDS = 730 * 86_400
CEILING_POINTS = 1_000_000
CEILING_QUERY_BYTES = 64 * 1_024
# What one target may hold in memory unless targetMemoryBytes says otherwise.
DEFAULT_TARGET_MEMORY_BYTES = 32 * 2**20
# The memory estimate's model, fitted from above to what bench/bench_target_memory.py
# measured (bench/README.md, "Target memory"): bytes for a target whatever its size, per
# history point, per calibration score per forecast step (the models keep CALIBRATION_SECONDS
# of scores for each step, and a fit builds one such tracker per candidate), per forecast step
# and validation origin (each candidate's forecast paths through VALIDATION_SECONDS, at most
# half the history), and, for each step of the longest forecast predicted, per calibration
# score and per residual of the models' error samples (RESIDUAL_SECONDS of residuals, or
# RESIDUAL_SAMPLES, in each of an ensemble's members, and their copies). The windows are the
# models' (forecaster.models.calibration, selection, ets and gbm).
MEMORY_BASE_BYTES = 4 * 2**20
MEMORY_PER_POINT = 200
MEMORY_PER_SCORE = 32
MEMORY_PER_PATH_STEP = 640
MEMORY_PER_SCORE_SAMPLE = 16
MEMORY_PER_RESIDUAL_SAMPLE = 48
CALIBRATION_SECONDS = 3 * 86_400
VALIDATION_SECONDS = 4 * 86_400
RESIDUAL_SECONDS = 7 * 86_400
RESIDUAL_SAMPLES = 2_016
# The models whose fits are counted in full: `auto` (candidates validated, scores kept per
# forecast step), and those with a direct model per forecast step, bounded by it.
MEMORY_HEAVY_MODELS = frozenset({AUTO_MODEL, "ensemble", "gbm", "gbm_quantile"})

_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]{1,12}")
_METRIC_NAME = re.compile(r"[A-Za-z0-9_-]+")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_CREDENTIALS = re.compile(r"(?<=//)[^/@]*@")

_T = TypeVar("_T")


@dataclass(frozen=True)
class TriggerLimits:
    """The bounds on one trigger that an operator may raise (the config's maxStartup,
    maxOutageHorizon, maxHistoryWindow, maxPointsPerTarget and maxQueryBytes); the defaults
    are the built-in bounds, and targetMemoryBytes still holds every trigger they let through.

    >>> spec, _ = parse_trigger_metadata(
    ...     {"serverAddress": "http://prometheus:9090", "query": "up", "targetValue": "10",
    ...      "startupSeconds": "28800"},
    ...     known_models=[], limits=TriggerLimits(max_startup_seconds=8 * 3600),
    ... )
    >>> spec.startup_seconds
    28800
    """

    max_startup_seconds: int = MAX_STARTUP_SECONDS
    max_outage_horizon_seconds: int = MAX_OUTAGE_HORIZON_SECONDS
    max_history_seconds: int = MAX_HISTORY_SECONDS
    max_points: int = MAX_POINTS
    max_query_bytes: int = MAX_QUERY_BYTES


LIMIT_CEILINGS = TriggerLimits(
    max_startup_seconds=CEILING_STARTUP_SECONDS,
    max_outage_horizon_seconds=CEILING_OUTAGE_HORIZON_SECONDS,
    max_history_seconds=CEILING_HISTORY_SECONDS,
    max_points=CEILING_POINTS,
    max_query_bytes=CEILING_QUERY_BYTES,
)
"""The most each bound may be raised to."""
DEFAULT_LIMITS = TriggerLimits()
"""The bounds a trigger is held to unless the config raises them."""


@dataclass(frozen=True)
class TriggerSpec:
    """One forecast target as a KEDA trigger describes it; build it with parse_trigger_metadata.

    >>> spec, unknown = parse_trigger_metadata(
    ...     {"serverAddress": "http://prometheus:9090", "query": "up", "targetValue": "10"},
    ...     known_models=["seasonal_naive"],
    ... )
    >>> spec.step_seconds, spec.metric_name
    (300, 'fc-8a2ffca1845a')
    """

    server_address: str
    query: str
    target_value: float
    startup_seconds: int = 300
    quantile: float = 0.9
    # The share of intervals allowed short of capacity, held by a controller on the plan
    # (forecaster.slo); None when `quantile` was set: the quantile is then planned as it is.
    max_under_provisioned: float | None = DEFAULT_MAX_UNDER_PROVISIONED
    # The ScaledObject's scale-down stabilization window, for the HPA arithmetic the
    # controller replays from its own plans.
    scale_down_stabilization_seconds: int = DEFAULT_STABILIZATION_SECONDS
    # The plan follows an average of recent quantile forecasts with this half-life; 0: none.
    plan_half_life_seconds: int = DEFAULT_PLAN_HALF_LIFE_SECONDS
    history_window_seconds: int = 14 * 86_400
    step_seconds: int = 300
    model: str = AUTO_MODEL
    activation_value: float = 0.0
    metric_name: str | None = None
    time_zone: str = "UTC"
    # Bins overlapping these are missing to the models (the floor still sees real demand).
    exclude_from_training: tuple[Window, ...] = ()
    # While one overlaps the lead-time window, the planned load is at least replicas x target.
    scheduled_min_replicas: tuple[Window, ...] = ()
    # While Prometheus cannot be reached, plan from the model's path this long; 0: not at all.
    outage_horizon_seconds: int = DEFAULT_OUTAGE_HORIZON_SECONDS

    @property
    def effective_metric_name(self) -> str:
        """The metric name KEDA sees: the given one, or the stable default."""
        return self.metric_name or default_metric_name(self.server_address, self.query)


def default_metric_name(
    server_address: str, query: str, settings: Mapping[str, str] | None = None
) -> str:
    """A metric name stable across restarts: "fc-" and 12 hex digits of a hash of the server,
    the query and each setting that differs from its default (`settings`, key -> canonical
    value), so that two triggers with different settings never share a target."""
    extra = "".join(f"\n{key}={value}" for key, value in sorted((settings or {}).items()))
    digest = hashlib.sha256(f"{server_address}\n{query}{extra}".encode()).hexdigest()
    return f"fc-{digest[:12]}"


@dataclass(frozen=True)
class MetricSpec:
    """What GetMetricSpec serves: the metric's name and the load one replica handles."""

    metric_name: str
    target_value: float


def changed_keys(old: TriggerSpec, new: TriggerSpec) -> list[str]:
    """The metadata keys whose settings differ between two specs, in METADATA_KEYS' order."""
    return [key for key, name in METADATA_KEYS.items()
            if getattr(old, name) != getattr(new, name)]


def quoted(text: str, limit: int = 40) -> str:
    """A value for a message or a log line: its first `limit` characters, quoted and capped."""
    return reprlib.repr(text[:limit])


@dataclass(frozen=True)
class MemoryEstimate:
    """The most one target is estimated to hold at once, in bytes, by part, and the counts
    they follow from; `memory_estimate` makes one, `check_memory` holds it to a budget."""

    history_points: int
    forecast_steps: int  # the fitted horizon: one step plus the lead time
    outage_steps: int  # the forecast kept through a Prometheus outage (0: off)
    scores: int  # calibration scores kept per forecast step
    residuals: int  # the fitted models' residuals, each step's error sample
    history: int  # the buffer, and what the models fit and keep per point
    calibration: int  # per forecast step, a window of scores, in several copies while fitting
    models: int  # per forecast step and validation origin: the candidates' forecast paths
    step_bytes: int  # predicting one forecast step: its error samples, and their copies

    @property
    def forecasts(self) -> int:
        """Predicting the longest forecast: the lead time's, or the outage's when longer."""
        return max(self.forecast_steps, self.outage_steps) * self.step_bytes

    @property
    def total(self) -> int:
        return (MEMORY_BASE_BYTES + self.history + self.calibration + self.models
                + self.forecasts)

    def largest(self) -> tuple[str, str]:
        """The metadata key to lower first, and what it drives."""
        samples = max(self.scores, self.residuals)
        beyond = max(0, self.outage_steps - self.forecast_steps)
        parts = {
            ("historyWindow", f"{self.history_points:,} history points"): self.history,
            ("startupSeconds", f"{self.forecast_steps:,} forecast steps of {samples:,} error "
             f"samples each"): (self.calibration + self.models
                                + self.forecast_steps * self.step_bytes),
            ("outageHorizon", f"an outage forecast of {self.outage_steps:,} steps of "
             f"{samples:,} error samples each"): beyond * self.step_bytes,
        }
        return max(parts, key=lambda part: parts[part])


def memory_estimate(spec: TriggerSpec) -> MemoryEstimate:
    """What a target of this spec holds at most: in the fit worker while it is fitted, and in
    the engine's process between fits (bench/README.md, "Target memory", has the figures).
    `auto` and the models built on gradient boosting count every part; a single model fitted
    alone keeps no calibration scores and runs no validation."""
    step = spec.step_seconds
    points = spec.history_window_seconds // step
    forecast = 1 + -(-spec.startup_seconds // step)
    outage = (0 if spec.outage_horizon_seconds == 0
              else -(-spec.outage_horizon_seconds // step) + 2 + forecast)
    scores = max(1, CALIBRATION_SECONDS // step)
    residuals = min(points, max(RESIDUAL_SECONDS // step, RESIDUAL_SAMPLES))
    origins = min(points // 2, VALIDATION_SECONDS // step)
    if spec.model not in MEMORY_HEAVY_MODELS:  # one model, fitted alone: no scores, no paths
        scores = origins = 0
    step_bytes = (MEMORY_PER_SCORE_SAMPLE * scores + MEMORY_PER_RESIDUAL_SAMPLE * residuals
                  if spec.model in MEMORY_HEAVY_MODELS else MEMORY_PER_SCORE_SAMPLE * residuals)
    return MemoryEstimate(
        history_points=points,
        forecast_steps=forecast,
        outage_steps=outage,
        scores=scores,
        residuals=residuals,
        history=MEMORY_PER_POINT * points,
        calibration=MEMORY_PER_SCORE * forecast * scores,
        models=MEMORY_PER_PATH_STEP * forecast * origins,
        step_bytes=step_bytes,
    )


def check_memory(spec: TriggerSpec, budget: int) -> MemoryEstimate:
    """The spec's memory estimate; InvalidInputError naming the key to lower, the estimate
    and the budget when it is over `budget` bytes (the targetMemoryBytes setting)."""
    estimate = memory_estimate(spec)
    if estimate.total <= budget:
        return estimate
    key, what = estimate.largest()
    value = {"historyWindow": spec.history_window_seconds,
             "startupSeconds": spec.startup_seconds,
             "outageHorizon": spec.outage_horizon_seconds}[key]
    shown = str(value) if key == "startupSeconds" else format_duration(value)
    single = (f", or name one model such as 'holt_winters' (now {spec.model!r})"
              if spec.model in MEMORY_HEAVY_MODELS else "")
    raise InvalidInputError(
        key,
        f"this trigger would hold about {_mib(estimate.total)} (historyWindow, step, "
        f"startupSeconds, outageHorizon and model drive it; most of it for {what}), over the "
        f"{_mib(budget)} a target may hold (targetMemoryBytes); lower {key} (now "
        f"{shown!r}) or raise step (now {format_duration(spec.step_seconds)!r}){single}",
    )


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB" if size >= 2**20 else f"{size / 2**10:,.0f} KiB"


def resolve_from_env(metadata: Mapping[str, str]) -> dict[str, str]:
    """The metadata with each ``xFromEnv`` of a known key read as ``x``; InvalidInputError
    naming both keys when both are given."""
    resolved = dict(metadata)
    for key in metadata:
        base = key[: -len(FROM_ENV)]
        if key.endswith(FROM_ENV) and base in METADATA_KEYS:
            if base in metadata:
                raise InvalidInputError(
                    key, f"and {base!r} are both set: give the value once, in one of them"
                )
            resolved[base] = resolved.pop(key)
    return resolved


def target_id(namespace: str, name: str, metric_name: str) -> str:
    """`namespace/name/metricName`, the id a ScaledObject's trigger maps to."""
    return f"{namespace}/{name}/{metric_name}"


def metric_spec(
    metadata: Mapping[str, str], defaults: Mapping[str, str] | None = None
) -> MetricSpec:
    """The metric name and targetValue of a trigger, from its metadata alone (with the config's
    `defaults` under it). Raises InvalidInputError only when targetValue is missing, unreadable
    or out of bounds: every other mistake leaves the name computable and is reported when the
    target is resolved, so KEDA keeps a metric spec and its fallback can count the failures."""
    try:
        values = {**(defaults or {}), **resolve_from_env(metadata)}
    except InvalidInputError as exc:
        if exc.field.removesuffix(FROM_ENV) == "targetValue":
            raise
        values = {**(defaults or {}), **metadata}
    target = values.get("targetValue")
    if not isinstance(target, str) or not target.strip():
        raise InvalidInputError("targetValue", "is required: add it to the trigger's metadata")
    target_value = _target_value(target.strip())
    name = values.get("metricName")
    if (isinstance(name, str) and len(name.strip()) <= MAX_METRIC_NAME
            and _METRIC_NAME.fullmatch(name.strip())):
        return MetricSpec(name.strip(), target_value)
    return MetricSpec(_hashed_name(values, defaults or {}), target_value)


def _hashed_name(values: Mapping[str, object], defaults: Mapping[str, str]) -> str:
    """The default metric name of metadata that may not parse: unparsable values count as
    their text, so the name is still stable."""
    server = _text(values.get("serverAddress"))
    with contextlib.suppress(InvalidInputError):  # named by its text; resolving reports it
        server = _server_address(server)
    settings = {}
    for key in METADATA_KEYS:
        if key in _IDENTITY_KEYS or key not in values:
            continue
        value = _canonical(key, _text(values[key]))
        default = _canonical(key, defaults[key]) if key in defaults else _BUILT_IN.get(key)
        if value != default:
            settings[key] = value
    return default_metric_name(server, _text(values.get("query")), settings)


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def _canonical(key: str, text: str) -> str:
    """A setting's value in one spelling ('5m' and '300' are one step), or its text when it
    does not parse."""
    parse = _CANONICAL.get(key)
    if parse is None:
        return text
    try:
        return str(parse(text, key))
    except InvalidInputError:
        return text


def check_object_ref(namespace: str, name: str) -> None:
    """A ScaledObject's namespace and name as Kubernetes allows them (DNS-1123 label and
    subdomain): they become log lines, metric labels and URLs."""
    for key, value, pattern, limit, form in (
        ("scaledObjectRef.namespace", namespace, _DNS_LABEL, 63, "DNS-1123 label"),
        ("scaledObjectRef.name", name, _DNS_SUBDOMAIN, 253, "DNS-1123 subdomain"),
    ):
        if not value:
            raise InvalidInputError(key, "is required")
        if len(value) > limit or not pattern.fullmatch(value):
            raise InvalidInputError(
                key, f"must be a {form} (lower-case letters, digits and '-', at most {limit} "
                f"characters), as Kubernetes names are; got {reprlib.repr(value[:80])}",
            )


def parse_trigger_metadata(
    metadata: Mapping[str, str],
    *,
    known_models: Collection[str],
    defaults: Mapping[str, str] | None = None,
    limits: TriggerLimits = DEFAULT_LIMITS,
) -> tuple[TriggerSpec, list[str]]:
    """Validate KEDA trigger metadata, with the config's `defaults` under it, within the
    operator's `limits`; return the spec and the sorted keys nobody reads.

    Raises InvalidInputError naming the metadata key at the first rule broken.
    """
    for key, value in metadata.items():
        _string_value(key, value)
    explicit = resolve_from_env(metadata)
    defaults = _level_defaults(defaults or {}, explicit)
    metadata = {**defaults, **explicit}
    values = {key: _string_value(key, metadata[key]) for key in METADATA_KEYS if key in metadata}
    if "quantile" in values and "maxUnderProvisioned" in values:
        where = "the trigger" if "quantile" in explicit else "the config's defaults"
        raise InvalidInputError(
            "maxUnderProvisioned",
            f"and 'quantile' are both set in {where}: maxUnderProvisioned holds a share of "
            f"intervals short of capacity, quantile plans one fixed quantile; keep one",
        )
    unknown = sorted(
        key
        for key in metadata
        if key not in METADATA_KEYS and key not in IGNORED_KEDA_KEYS and not key.endswith("FromEnv")
    )

    server_address = _server_address(_required(values, metadata, "serverAddress"))
    query = _query(_required(values, metadata, "query"), limits.max_query_bytes)
    target_value = _target_value(_required(values, metadata, "targetValue"))
    history = _optional(
        values, "historyWindow", partial(_history_window, limit=limits.max_history_seconds),
        TriggerSpec.history_window_seconds,
    )
    step = _optional(values, "step", _step, TriggerSpec.step_seconds)
    points = limits.max_points
    if history > points * step:
        raise InvalidInputError(
            "historyWindow",
            f"must hold at most {points:,} steps (the maxPointsPerTarget setting): "
            f"historyWindow is {format_duration(history)!r} and step is "
            f"{format_duration(step)!r}, so lower historyWindow to at most "
            f"{format_duration(points * step)!r} or raise step",
        )
    if history < MIN_STEPS_IN_HISTORY * step:
        raise InvalidInputError(
            "historyWindow",
            f"must hold at least {MIN_STEPS_IN_HISTORY} steps: historyWindow is "
            f"{format_duration(history)!r} and step is {format_duration(step)!r}, so raise "
            f"historyWindow to at least {format_duration(MIN_STEPS_IN_HISTORY * step)!r} "
            f"or lower step",
        )
    time_zone = _optional(values, "timeZone", parse_time_zone, TriggerSpec.time_zone)
    spec = TriggerSpec(
        server_address=server_address,
        query=query,
        target_value=target_value,
        startup_seconds=_optional(
            values, "startupSeconds", partial(_startup_seconds, limit=limits.max_startup_seconds),
            TriggerSpec.startup_seconds,
        ),
        quantile=_optional(values, "quantile", _quantile, TriggerSpec.quantile),
        max_under_provisioned=(
            None if "quantile" in values else _optional(
                values, "maxUnderProvisioned", _share, DEFAULT_MAX_UNDER_PROVISIONED
            )
        ),
        scale_down_stabilization_seconds=_optional(
            values, "scaleDownStabilization", _stabilization,
            TriggerSpec.scale_down_stabilization_seconds,
        ),
        plan_half_life_seconds=_optional(
            values, "planHalfLife", parse_duration, TriggerSpec.plan_half_life_seconds
        ),
        history_window_seconds=history,
        step_seconds=step,
        model=_model(values.get("model", TriggerSpec.model), known_models),
        activation_value=_optional(
            values, "activationValue", _activation_value, TriggerSpec.activation_value
        ),
        metric_name=(
            _metric_name(values["metricName"], "metricName") if "metricName" in values
            else _hashed_name(values, defaults or {})
        ),
        time_zone=time_zone,
        exclude_from_training=parse_windows(
            values.get("excludeFromTraining", ""), "excludeFromTraining", time_zone,
            with_replicas=False,
        ),
        scheduled_min_replicas=parse_windows(
            values.get("scheduledMinReplicas", ""), "scheduledMinReplicas", time_zone,
            with_replicas=True,
        ),
        outage_horizon_seconds=_optional(
            values, "outageHorizon",
            partial(_outage_horizon, limit=limits.max_outage_horizon_seconds),
            TriggerSpec.outage_horizon_seconds,
        ),
    )
    return spec, unknown


def _optional(
    values: Mapping[str, str], key: str, parse: Callable[[str, str], _T], default: _T
) -> _T:
    return parse(values[key], key) if key in values else default


def _string_value(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(
            key,
            f"must be a string, as KEDA sends every metadata value; "
            f"got {reprlib.repr(value)} ({type(value).__name__}): quote it",
        )
    return value.strip()


def _required(values: Mapping[str, str], metadata: Mapping[str, str], key: str) -> str:
    if key not in values:
        near = [other for other in metadata if other.lower() == key.lower()]
        hint = f" (found {reprlib.repr(near[0])}: keys are case-sensitive)" if near else ""
        raise InvalidInputError(key, f"is required: add it to the trigger's metadata{hint}")
    if not values[key]:
        raise InvalidInputError(key, "is required and must not be empty or blank")
    return values[key]


def _server_address(text: str) -> str:
    # Credentials are masked before the address is quoted: errors end up in logs and events.
    shown = reprlib.repr(_CREDENTIALS.sub("***@", text))
    form = "http(s)://host[:port][/path], such as 'http://prometheus.monitoring:9090'"
    try:
        parts = urlsplit(text)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a bad port or a broken IPv6 literal
        valid = False
    if not valid:
        raise InvalidInputError("serverAddress", f"must be {form}; got {shown}")
    if "@" in parts.netloc:
        raise InvalidInputError(
            "serverAddress",
            f"must not carry user:password@ credentials; got {shown}: KEDA passes none "
            f"to an external scaler, so give them to the server's entry in forecaster's "
            f"config (prometheus: bearerTokenFile or basicAuth)",
        )
    if parts.query or parts.fragment or any(char.isspace() for char in text):
        raise InvalidInputError(
            "serverAddress", f"must be {form}, with no query, fragment or spaces; got {shown}"
        )
    # One canonical form, so "http://p:9090/" and "http://p:9090" name the same metric.
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _number(text: str, key: str) -> float:
    value = float(text) if _NUMBER.fullmatch(text) else math.nan
    if not math.isfinite(value):
        raise InvalidInputError(
            key, f"must be a finite decimal number such as '50' or '0.5'; got {reprlib.repr(text)}"
        )
    return value


def _target_value(text: str) -> float:
    value = _number(text, "targetValue")
    if value <= 0:
        raise InvalidInputError(
            "targetValue",
            f"must be > 0: it is the metric value one replica handles; got {reprlib.repr(text)}",
        )
    if value < MIN_TARGET_VALUE:
        raise InvalidInputError(
            "targetValue",
            f"must be at least {MIN_TARGET_VALUE}: KEDA hands it to the HPA in millis, and a "
            f"zero target is refused; got {reprlib.repr(text)}: scale the query instead",
        )
    if value > MAX_TARGET_VALUE:
        raise InvalidInputError(
            "targetValue",
            f"must be at most {MAX_TARGET_VALUE:.0e}, within the HPA's integer range; "
            f"got {reprlib.repr(text)}: scale the query instead",
        )
    return value


def _startup_seconds(text: str, key: str, *, limit: int) -> int:
    if not _WHOLE_NUMBER.fullmatch(text):
        raise InvalidInputError(
            key,
            f"must be a whole number of seconds such as '300', with no unit; "
            f"got {reprlib.repr(text)}",
        )
    value = int(text)
    if value < 0:
        raise InvalidInputError(
            key, f"must be >= 0: the seconds a new replica needs to serve; got {reprlib.repr(text)}"
        )
    if value > limit:
        raise InvalidInputError(
            key,
            f"must be at most {limit} ({format_duration(limit)}, the maxStartup setting): how "
            f"far ahead to plan; got {reprlib.repr(text)}",
        )
    return value


def _query(text: str, limit: int) -> str:
    if len(text.encode()) > limit:
        raise InvalidInputError(
            "query",
            f"must be at most {limit} bytes (the maxQueryBytes setting); got "
            f"{len(text.encode()):,} bytes starting {quoted(text)}: record it as a rule and "
            f"query that",
        )
    return text


def _quantile(text: str, key: str) -> float:
    value = _number(text, key)
    if not MIN_QUANTILE <= value < 1:
        raise InvalidInputError(
            key,
            f"must be in [0.5, 1): the forecast quantile to provision for, such as '0.9'; "
            f"got {reprlib.repr(text)}",
        )
    return value


def _level_defaults(defaults: Mapping[str, str], explicit: Mapping[str, str]) -> dict[str, str]:
    """The config's defaults under a trigger: a trigger's explicit quantile or
    maxUnderProvisioned beats the other key's value from the defaults."""
    chosen = dict(defaults)
    for key, other in (("quantile", "maxUnderProvisioned"), ("maxUnderProvisioned", "quantile")):
        if key in explicit and other not in explicit:
            chosen.pop(other, None)
    return chosen


def _share(text: str, key: str) -> float:
    value = _number(text, key)
    if not 0 < value < 0.5:
        raise InvalidInputError(
            key,
            f"must be in (0, 0.5): the share of intervals allowed short of capacity, such as "
            f"'0.05'; got {reprlib.repr(text)}",
        )
    return value


def _at_most(seconds: int, limit: int, text: str, key: str, why: str = "") -> int:
    """`seconds`, or InvalidInputError naming `key` and the bound when over `limit`."""
    if seconds > limit:
        raise InvalidInputError(
            key, f"must be at most {format_duration(limit)!r}{why}; got {reprlib.repr(text)}"
        )
    return seconds


def _stabilization(text: str, key: str) -> int:
    seconds = parse_duration(text, key)
    return _at_most(seconds, MAX_STABILIZATION_SECONDS, text, key, " (the HPA's own limit)")


def _positive_duration(text: str, key: str) -> int:
    seconds = parse_duration(text, key)
    if seconds < 1:
        raise InvalidInputError(key, f"must be at least 1s; got {reprlib.repr(text)}")
    return seconds


def _history_window(text: str, key: str, *, limit: int) -> int:
    return _at_most(_positive_duration(text, key), limit, text, key,
                    " (the maxHistoryWindow setting)")


def _outage_horizon(text: str, key: str, *, limit: int) -> int:
    return _at_most(
        parse_duration(text, key), limit, text, key,
        " (the maxOutageHorizon setting): how long to plan from the model's forecast while "
        "Prometheus cannot be reached, '0' for not at all",
    )


def _step(text: str, key: str) -> int:
    seconds = parse_duration(text, key)
    if not MIN_STEP_SECONDS <= seconds <= MAX_STEP_SECONDS:
        raise InvalidInputError(
            key, f"must be from {format_duration(MIN_STEP_SECONDS)!r} to "
            f"{format_duration(MAX_STEP_SECONDS)!r}; got {reprlib.repr(text)}",
        )
    return seconds


def _model(text: str, known_models: Collection[str]) -> str:
    allowed = sorted({AUTO_MODEL, *known_models})
    if text not in allowed:
        raise InvalidInputError(
            "model", f"must be one of {', '.join(allowed)}; got {reprlib.repr(text)}"
        )
    return text


def _activation_value(text: str, key: str) -> float:
    value = _number(text, key)
    if value < 0:
        raise InvalidInputError(
            key,
            f"must be >= 0: above it the target counts as active; got {reprlib.repr(text)}",
        )
    return value


def parse_time_zone(text: str, key: str) -> str:
    """An IANA zone name, checked; InvalidInputError naming `key` otherwise."""
    try:
        zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as exc:  # OSError: too long
        raise InvalidInputError(
            key,
            f"must be an IANA time zone such as 'UTC' or 'Europe/Paris'; got {reprlib.repr(text)}",
        ) from exc
    return text


def _metric_name(text: str, key: str) -> str:
    if len(text) > MAX_METRIC_NAME:
        raise InvalidInputError(
            key, f"must be at most {MAX_METRIC_NAME} characters; got {len(text)} starting "
            f"{quoted(text)}",
        )
    if not _METRIC_NAME.fullmatch(text):
        raise InvalidInputError(
            key,
            f"must be letters, digits, '_' or '-' only, or left out for a stable default; "
            f"got {reprlib.repr(text)}",
        )
    return text


# The parsers that give a setting's canonical value for the default metric name, and the
# built-in defaults in the same spelling. The bounds an operator may raise are read at their
# ceilings, so that a metric's name does not change with the config's limits (GetMetricSpec
# names it from the metadata alone).
_CANONICAL: dict[str, Callable[[str, str], object]] = {
    "startupSeconds": partial(_startup_seconds, limit=LIMIT_CEILINGS.max_startup_seconds),
    "quantile": _quantile,
    "planHalfLife": parse_duration,
    "historyWindow": partial(_history_window, limit=LIMIT_CEILINGS.max_history_seconds),
    "step": _step,
    "activationValue": _activation_value,
    "maxUnderProvisioned": _share,
    "scaleDownStabilization": _stabilization,
    "outageHorizon": partial(_outage_horizon, limit=LIMIT_CEILINGS.max_outage_horizon_seconds),
}
_BUILT_IN: dict[str, str] = {
    "startupSeconds": str(TriggerSpec.startup_seconds),
    "quantile": str(TriggerSpec.quantile),
    "planHalfLife": str(TriggerSpec.plan_half_life_seconds),
    "historyWindow": str(TriggerSpec.history_window_seconds),
    "step": str(TriggerSpec.step_seconds),
    "model": TriggerSpec.model,
    "activationValue": str(TriggerSpec.activation_value),
    "maxUnderProvisioned": str(DEFAULT_MAX_UNDER_PROVISIONED),
    "scaleDownStabilization": str(TriggerSpec.scale_down_stabilization_seconds),
    "timeZone": TriggerSpec.time_zone,
    "excludeFromTraining": "",
    "scheduledMinReplicas": "",
    "outageHorizon": str(TriggerSpec.outage_horizon_seconds),
}
