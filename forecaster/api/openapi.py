"""The OpenAPI 3 document of the HTTP interface, served at /openapi.json.

Written out by hand, next to the routes it describes; tests/test_rest_api.py checks that its
paths and methods are exactly the app's routes, and tests/test_rest_fuzz.py fuzzes the app
from it. The query parameters it lists are the only ones each route accepts
(`query_parameters`, checked before every request). The page routes (/, /metrics, plot.png,
share.png, /login) live in forecaster/api/pages.py; who may call what is forecaster/api/auth.py.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from forecaster.api.inputs import (
    MAX_HORIZON_STEPS,
    MAX_POINTS,
    MAX_QUANTILES,
    MAX_QUERY_CHARS,
    MAX_STEP_SECONDS,
    MAX_VALUE,
)
from forecaster.models import MODEL_FACTORIES
from forecaster.series import DEFAULT_MAX_FILL_STEPS as MAX_FILL_STEPS

API_VERSION = "1.0.0"
TARGET = "/api/v1/targets/{namespace}/{name}/{metric}"
PAGE_PLOT = "/targets/{namespace}/{name}/{metric}/plot.png"
PAGE_SHARE_PLOT = "/targets/{namespace}/{name}/{metric}/share.png"
PAGE_PATHS = frozenset({
    "/", "/metrics", f"{TARGET}/plot.png", PAGE_PLOT, f"{TARGET}/share.png", PAGE_SHARE_PLOT,
    "/login",
})

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"{_REF}{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if "enum" in schema:  # OpenAPI 3.0: null must also be listed in an enum
        schema = {**schema, "enum": [*schema["enum"], None]}
    return {**schema, "nullable": True}


def _number() -> dict[str, Any]:
    return {"type": "number"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


def _unavailable(description: str) -> dict[str, Any]:
    return {
        **_error(description),
        "headers": {
            "Retry-After": {
                "description": "seconds to wait before retrying",
                "schema": {"type": "integer", "minimum": 1},
            }
        },
    }


def _json(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


_UNAUTHENTICATED = {"$ref": "#/components/responses/Unauthenticated"}
_NOT_FOUND = {"$ref": "#/components/responses/NotFound"}
_INVALID = {"$ref": "#/components/responses/InvalidArgument"}
_UNAVAILABLE = {"$ref": "#/components/responses/Unavailable"}
_NOT_ALLOWED = {"$ref": "#/components/responses/MethodNotAllowed"}
# A token is needed only when apiToken is configured (`{}`: nothing, when it is not). The
# session cookie reads (GET) but never writes; /metrics also takes the scrape token.
_OPEN: list[dict[str, list[str]]] = []
_SECURED: list[dict[str, list[str]]] = [{}, {"bearerAuth": []}, {"sessionCookie": []}]
_SECURED_WRITE: list[dict[str, list[str]]] = [{}, {"bearerAuth": []}]
_SECURED_METRICS: list[dict[str, list[str]]] = [
    {}, {"bearerAuth": []}, {"metricsToken": []}, {"sessionCookie": []}
]

_TARGET_PARAMETERS = [
    {
        "name": "namespace",
        "in": "path",
        "required": True,
        "description": "the ScaledObject's namespace (first part of the target id)",
        "schema": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                   "maxLength": 63},
        "example": "shop",
    },
    {
        "name": "name",
        "in": "path",
        "required": True,
        "description": "the ScaledObject's name (second part of the target id)",
        "schema": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                   "maxLength": 253},
        "example": "web",
    },
    {
        "name": "metric",
        "in": "path",
        "required": True,
        "description": "the trigger's metricName, given or the stable default `fc-<hash>` "
        "(third part of the target id)",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$", "maxLength": 200},
        "example": "fc-8a2ffca1845a",
    },
]

_DURATION = {
    "oneOf": [
        {"type": "integer", "minimum": 1, "description": "seconds"},
        {"type": "string", "pattern": "^[0-9]{1,12}[wdhms]?$", "example": "5m",
         "description": "a whole number with one unit s, m, h, d or w"},
    ]
}
_OUTAGE_SINCE = _nullable({
    "type": "string", "format": "date-time",
    "description": "in an outage: when Prometheus stopped answering (null otherwise)"})
_QUANTILE = {"type": "number", "minimum": 0, "maximum": 1, "exclusiveMinimum": True,
             "exclusiveMaximum": True}
_QUANTILES_PARAM = f"^(0?\\.[0-9]{{1,12}})(,0?\\.[0-9]{{1,12}}){{0,{MAX_QUANTILES - 1}}}$"


def _replicas(name: str, minimum: int, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": {"type": "integer", "minimum": minimum, "maximum": 100_000}}


_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "field"],
                "additionalProperties": False,
                "properties": {
                    "code": {
                        "type": "string",
                        "enum": ["invalid_argument", "unauthenticated", "permission_denied",
                                 "not_found", "method_not_allowed", "payload_too_large",
                                 "unsupported_media_type", "unprocessable", "internal",
                                 "unavailable", "error"],
                    },
                    "message": {"type": "string"},
                    "field": _nullable({"type": "string",
                                        "description": "the input at fault, as the client "
                                        "named it (e.g. `horizon`, `series[3].value`)"}),
                },
            }
        },
    },
    "Health": {"type": "object", "required": ["status"], "properties": {
        "status": {"type": "string", "enum": ["ok"]}}},
    "Ready": {
        "type": "object",
        "required": ["status", "configuredTargets"],
        "properties": {"status": {"type": "string", "enum": ["ready"]},
                       "configuredTargets": {"type": "integer", "minimum": 0}},
    },
    "TargetStatus": {
        "type": "object",
        "required": ["id", "namespace", "name", "metric", "configured", "model", "requestedModel",
                     "mode", "outageSince", "lastFit", "restored", "forecastMadeAt",
                     "lastPoint", "ageSeconds", "fresh",
                     "freshnessLimitSeconds", "currentValue", "plannedValue", "historyPoints",
                     "accuracy", "fits", "lastError", "spec"],
        "properties": {
            "id": {"type": "string", "example": "shop/web/fc-8a2ffca1845a",
                   "description": "namespace/name/metricName"},
            "namespace": {"type": "string"},
            "name": {"type": "string"},
            "metric": {"type": "string"},
            "configured": {"type": "boolean",
                           "description": "listed in the config file (never dropped as idle)"},
            "model": _nullable({"type": "string", "description": "the model in use"}),
            "requestedModel": {"type": "string"},
            "mode": _nullable({
                "type": "string", "enum": ["forecast", "reactive", "outage"],
                "description": "outage: Prometheus cannot be reached, and the decision is "
                "planned from the forecast the model made when it stopped answering"}),
            "outageSince": _OUTAGE_SINCE,
            "lastFit": _nullable({"type": "string", "format": "date-time"}),
            "restored": {"type": "boolean", "description":
                         "the model was loaded from saved state (stateDir) and has not been "
                         "refitted since the start"},
            "forecastMadeAt": _nullable({"type": "number", "description":
                                         "when the published forecast was predicted, in "
                                         "epoch seconds (null before the first)"}),
            "lastPoint": _nullable({"type": "string", "format": "date-time",
                                    "description": "time of the newest value read"}),
            "ageSeconds": _nullable({"type": "number", "minimum": 0}),
            "fresh": {"type": "boolean",
                      "description": "ageSeconds within freshnessLimitSeconds"},
            "freshnessLimitSeconds": _number(),
            "currentValue": _nullable(_number()),
            "plannedValue": _nullable(_number()),
            "historyPoints": {"type": "integer", "minimum": 0},
            "accuracy": {
                "type": "object",
                "description": "decision-horizon forecasts scored against what then happened",
                "required": ["scored", "mae", "coverage80", "lastAbsError"],
                "properties": {
                    "scored": {"type": "integer", "minimum": 0},
                    "mae": _nullable(_number()),
                    "coverage80": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
                    "lastAbsError": _nullable(_number()),
                },
            },
            "fits": {
                "type": "object",
                "required": ["count", "failures", "fallbacks", "refreshFailures",
                             "lastFitSeconds"],
                "properties": {
                    "count": {"type": "integer"},
                    "failures": {"type": "integer"},
                    "fallbacks": {"type": "integer"},
                    "refreshFailures": {"type": "integer"},
                    "lastFitSeconds": _nullable(_number()),
                },
            },
            "lastError": _nullable({"type": "string"}),
            "spec": {
                "type": "object",
                "required": ["query", "serverAddress", "targetValue", "quantile",
                             "planHalfLifeSeconds", "stepSeconds", "startupSeconds",
                             "historyWindowSeconds"],
                "properties": {
                    "query": {"type": "string"},
                    "serverAddress": {"type": "string"},
                    "targetValue": _number(),
                    "quantile": _number(),
                    "planHalfLifeSeconds": {"type": "integer"},
                    "stepSeconds": {"type": "integer"},
                    "startupSeconds": {"type": "integer"},
                    "historyWindowSeconds": {"type": "integer"},
                },
            },
        },
    },
    "TargetList": {
        "type": "object",
        "required": ["targets"],
        "properties": {"targets": {"type": "array", "items": _ref("TargetStatus")}},
    },
    "ForecastPoint": {
        "type": "object",
        "required": ["timestamp", "mean", "quantiles"],
        "properties": {
            "timestamp": {"type": "string", "format": "date-time",
                          "description": "start of the interval forecast"},
            "mean": _nullable(_number()),
            "quantiles": {"type": "object", "additionalProperties": _nullable(_number()),
                          "description": "by quantile, e.g. {\"0.9\": 123.4}"},
        },
    },
    "Forecast": {
        "type": "object",
        "required": ["model", "origin", "stepSeconds", "horizon", "quantiles", "points"],
        "properties": {
            "model": {"type": "string",
                      "description": "the model that made it (for auto, the one it chose)"},
            "origin": {"type": "string", "format": "date-time",
                       "description": "start of the last observed interval"},
            "stepSeconds": {"type": "integer", "minimum": 1},
            "horizon": {"type": "integer", "minimum": 1},
            "quantiles": {"type": "array", "items": _QUANTILE},
            "points": {"type": "array", "items": _ref("ForecastPoint")},
        },
    },
    "TargetForecast": {
        "allOf": [
            _ref("Forecast"),
            {
                "type": "object",
                "required": ["target", "fresh", "ageSeconds"],
                "properties": {
                    "target": {"type": "string"},
                    "fresh": {"type": "boolean"},
                    "ageSeconds": _nullable({"type": "number", "minimum": 0}),
                },
            },
        ]
    },
    "AdhocForecast": {
        "allOf": [
            _ref("Forecast"),
            {
                "type": "object",
                "required": ["requestedModel", "fellBack", "failures", "historyPoints",
                             "pointsReceived", "pointsFilled"],
                "properties": {
                    "requestedModel": {"type": "string"},
                    "fellBack": {"type": "boolean",
                                 "description": "the model used is a simpler fallback"},
                    "failures": {
                        "type": "array",
                        "items": {"type": "object", "required": ["model", "reason"],
                                  "properties": {"model": {"type": "string"},
                                                 "reason": {"type": "string"}}},
                    },
                    "historyPoints": {"type": "integer", "minimum": 0,
                                      "description": "steps of the grid the model was fitted "
                                      "to that hold a value (received or filled)"},
                    "pointsReceived": {"type": "integer", "minimum": 0,
                                       "description": "points sent inline, or returned by "
                                       "the query, before they were put on the grid"},
                    "pointsFilled": {"type": "integer", "minimum": 0,
                                     "description": "steps without a point that were given "
                                     "the last value before them (gaps of at most "
                                     f"{MAX_FILL_STEPS} steps)"},
                },
            },
        ]
    },
    "Decision": {
        "type": "object",
        "required": ["target", "mode", "dryRun", "quantile", "forecastAtQuantile",
                     "smoothedForecast", "peakOverLead", "current", "floor", "planned",
                     "floored", "scheduledMinimum",
                     "horizonSteps", "outageSince", "startupSeconds",
                     "targetValuePerReplica", "minReplicas", "maxReplicas", "currentReplicas",
                     "tolerance", "recommendation", "replicas", "limitedBy", "planLevel",
                     "underProvisioned"],
        "properties": {
            "target": {"type": "string"},
            "mode": {"type": "string", "enum": ["forecast", "reactive", "outage"],
                     "description": "outage: Prometheus cannot be reached; planned is the "
                     "forecast made when it stopped answering, at quantile, raised by a "
                     "margin, for up to the trigger's outageHorizon (503 after)"},
            "outageSince": _OUTAGE_SINCE,
            "dryRun": {"type": "boolean",
                       "description": "the engine runs dry: KEDA is served the current load, "
                       "and these numbers are what the forecast would have planned"},
            "quantile": _number(),
            "forecastAtQuantile": _nullable({
                **_number(), "description": "the quantile forecast for the interval new "
                "pods will serve (null when reactive)"}),
            "smoothedForecast": _nullable({
                **_number(), "description": "forecastAtQuantile averaged over recent origins "
                "with the trigger's planHalfLife (null when reactive)"}),
            "peakOverLead": _nullable(_number()),
            "current": {**_number(), "description": "current load"},
            "floor": _nullable({
                **_number(), "description": "the reactive floor: the lower of the current "
                "load and the last grid point's, so a one-step spike does not raise it"}),
            "planned": {**_number(),
                        "description": "max(smoothedForecast, floor, scheduledMinimum): "
                        "the load to plan for; in an outage max(forecastAtQuantile x the "
                        "outage margin, scheduledMinimum), with no floor"},
            "floored": {"type": "boolean",
                        "description": "the floor was above the smoothed forecast"},
            "scheduledMinimum": _nullable({
                **_number(), "description": "replicas x targetValue of a scheduledMinReplicas "
                "window over the lead time (null when none)"}),
            "horizonSteps": {"type": "integer"},
            "planLevel": _nullable({
                **_number(), "description": "the log of the factor the maxUnderProvisioned "
                "controller put on the plan (null for a fixed quantile)"}),
            "underProvisioned": _nullable({
                "type": "object",
                "description": "how the target holds its maxUnderProvisioned (null for a "
                "fixed quantile): intervals whose demand exceeded the capacity the plans had "
                "ready, replayed with the HPA's arithmetic",
                "required": ["asked", "achieved", "judgedIntervals", "level"],
                "properties": {
                    "asked": _number(),
                    "achieved": {
                        "type": "object",
                        "required": ["1d", "7d"],
                        "properties": {"1d": _nullable(_number()), "7d": _nullable(_number())},
                    },
                    "judgedIntervals": {
                        "type": "object",
                        "required": ["1d", "7d"],
                        "properties": {"1d": {"type": "integer", "minimum": 0},
                                       "7d": {"type": "integer", "minimum": 0}},
                    },
                    "level": _number(),
                },
            }),
            "startupSeconds": {"type": "integer"},
            "targetValuePerReplica": _number(),
            "minReplicas": {"type": "integer"},
            "maxReplicas": _nullable({"type": "integer"}),
            "currentReplicas": _nullable({"type": "integer"}),
            "tolerance": _number(),
            "recommendation": {"type": "integer", "minimum": 1,
                               "description": "the HPA's ceil(planned / targetValuePerReplica),"
                               " held at currentReplicas within the tolerance"},
            "replicas": {"type": "integer", "minimum": 0,
                         "description": "the recommendation within minReplicas..maxReplicas"},
            "limitedBy": _nullable({"type": "string", "enum": ["minReplicas", "maxReplicas"]}),
        },
    },
    "MetricValue": {
        "type": "object",
        "required": ["value", "target", "mode", "current", "active", "metricName"],
        "properties": {
            "value": {**_number(), "description": "the planned load (valueLocation: value)"},
            "target": {**_number(), "description": "the target value per replica"},
            "mode": {"type": "string", "enum": ["forecast", "reactive", "dry_run", "outage"],
                     "description": "dry_run: the engine runs dry, so value is the current "
                     "load while forecasts are still published; outage: Prometheus cannot "
                     "be reached and value is planned from the forecast made when it stopped "
                     "answering (see the decision)"},
            "current": _number(),
            "active": {"type": "boolean"},
            "metricName": {"type": "string"},
        },
    },
    "SeriesForecastRequest": {
        "type": "object",
        "required": ["series"],
        "additionalProperties": False,
        "properties": {
            "series": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_POINTS,
                "description": f"points in strictly increasing time; at most {MAX_POINTS} "
                "(413 past that), spanning at most as many steps. They are put on a grid of "
                "`step` aligned to the Unix epoch: the points within one step are averaged "
                "into one value, and a gap of at most "
                f"{MAX_FILL_STEPS} steps holds the last value before it (a longer gap stays "
                "empty); the answer counts them (pointsReceived, historyPoints, "
                "pointsFilled)",
                "items": {
                    "type": "object",
                    "required": ["timestamp", "value"],
                    "additionalProperties": False,
                    "properties": {
                        "timestamp": {"type": "string", "format": "date-time",
                                      "description": "from 1970 to 2199"},
                        "value": {"type": "number", "minimum": 0, "maximum": MAX_VALUE},
                    },
                },
            },
            "step": _DURATION,
            "horizon": {"$ref": f"{_REF}Horizon"},
            "quantiles": {"$ref": f"{_REF}Quantiles"},
            "model": {"$ref": f"{_REF}Model"},
        },
    },
    "QueryForecastRequest": {
        "type": "object",
        "required": ["serverAddress", "query"],
        "additionalProperties": False,
        "properties": {
            "serverAddress": {"type": "string", "minLength": 1, "maxLength": 2048,
                              "description": "one of the configured Prometheus servers' urls "
                              "(any other is refused with 400)"},
            "query": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS,
                      "description": "PromQL returning one series"},
            "historyWindow": {**_DURATION, "description": f"default 7d; at most {MAX_POINTS} "
                              "steps"},
            "step": _DURATION,
            "horizon": {"$ref": f"{_REF}Horizon"},
            "quantiles": {"$ref": f"{_REF}Quantiles"},
            "model": {"$ref": f"{_REF}Model"},
        },
    },
    "Horizon": {"type": "integer", "minimum": 1, "maximum": MAX_HORIZON_STEPS,
                "description": "steps ahead (default 12); at most 7 days of steps"},
    "Quantiles": {"type": "array", "items": _QUANTILE, "minItems": 1,
                  "maxItems": MAX_QUANTILES, "description": "default [0.1, 0.5, 0.9]"},
    "Model": {"type": "string", "enum": sorted(MODEL_FACTORIES),
              "description": "default auto (picks by backtest; the slowest to fit)"},
}


def _get(
    summary: str, description: str, responses: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    return {"get": {"summary": summary, "description": description, "responses": responses,
                    **extra}}


def _target_get(summary: str, description: str, ok: dict[str, Any], *, parameters: list[Any],
                errors: dict[str, Any], operation_id: str) -> dict[str, Any]:
    responses = {"200": ok, "401": _UNAUTHENTICATED, "404": _NOT_FOUND, **errors}
    return _get(summary, description, responses, parameters=[*_TARGET_PARAMETERS, *parameters],
                security=_SECURED, operationId=operation_id, tags=["targets"])


_PATHS: dict[str, Any] = {
    "/healthz": _get("Liveness", "200 while the process serves HTTP, its gRPC scaler "
                     "front answers and its fit pool can start worker processes; 503 with the "
                     "reason when the front has exited or has not reported for 10 s (stuck), "
                     "or when the fit pool cannot be rebuilt after a worker died (no process "
                     "can be spawned): a restart is the cure. Never needs a token.",
                     {"200": _json("alive", "Health"), "503": _UNAVAILABLE},
                     security=_OPEN, operationId="healthz", tags=["probes"]),
    "/readyz": _get(
        "Readiness",
        "200 while the gRPC scaler serves (and saved state is loaded); 503 with the reason "
        "while starting, once shutting down, or while the gRPC front is stuck. Never a "
        "question of Prometheus, and never needs a token.",
        {"200": _json("ready", "Ready"), "503": _UNAVAILABLE},
        security=_OPEN, operationId="readyz", tags=["probes"],
    ),
    "/openapi.json": _get("This document", "The OpenAPI 3 description of this service.",
                          {"200": {"description": "the document",
                                   "content": {"application/json": {"schema": {
                                       "type": "object"}}}},
                           "401": _UNAUTHENTICATED},
                          security=_SECURED, operationId="openapi", tags=["meta"]),
    "/": _get("Overview page", "An HTML page of the targets (forecaster/api/pages.py). With "
              "apiToken configured, a browser without the session cookie (one that asks for "
              "text/html) is sent to /login; other clients get 401.",
              {"200": {"description": "the page", "content": {"text/html": {
                  "schema": {"type": "string"}}}},
               "303": {"description": "not signed in: to the sign-in form (Location: login)"},
               "401": _UNAUTHENTICATED},
              security=_SECURED, operationId="index", tags=["pages"]),
    "/login": {
        "get": {
            "summary": "Sign-in form",
            "description": "An HTML form that exchanges the apiToken for the session cookie "
            "(POST /login). Open, like the probes.",
            "operationId": "loginForm",
            "tags": ["pages"],
            "security": _OPEN,
            "responses": {"200": {"description": "the form", "content": {"text/html": {
                "schema": {"type": "string"}}}}},
        },
        "post": {
            "summary": "Sign in",
            "description": "Checks the form field `token` against the apiToken. Right: 303 "
            "to the page with `Set-Cookie: forecaster_session=...; HttpOnly; "
            "SameSite=Strict` (valid 12 hours, for GET requests; it holds an HMAC keyed by the "
            "token, never the token). Wrong: 303 back to the form (`login#wrong-token`). "
            "Without apiToken configured: 303 to the page.",
            "operationId": "login",
            "tags": ["pages"],
            "security": _OPEN,
            "requestBody": {
                "required": True,
                "content": {"application/x-www-form-urlencoded": {"schema": {
                    "type": "object",
                    "required": ["token"],
                    "properties": {"token": {"type": "string", "minLength": 1,
                                             "pattern": "\\S"}},
                }}},
            },
            "responses": {
                "303": {"description": "to the page (signed in) or back to the form",
                        "headers": {"Location": {"schema": {"type": "string"}}}},
                "400": _INVALID,
            },
        },
    },
    "/metrics": _get("Prometheus metrics", "The service's own metrics, in Prometheus' text "
                     "exposition format. Takes the apiToken, or the metricsToken a scraper "
                     "holds (which opens nothing else).",
                     {"200": {"description": "metrics", "content": {"text/plain": {
                         "schema": {"type": "string"}}}},
                      "401": _UNAUTHENTICATED},
                     security=_SECURED_METRICS, operationId="metrics", tags=["pages"]),
    "/api/v1/targets": _get(
        "List targets",
        "Every target with its status: model in use, last fit, age of the newest value and "
        "freshness, recent accuracy, mode (forecast or reactive), fit counters, last error.",
        {"200": _json("the targets", "TargetList"), "401": _UNAUTHENTICATED},
        security=_SECURED, operationId="listTargets", tags=["targets"],
    ),
    TARGET: _target_get(
        "One target",
        "A target's status, as in the list. The id `namespace/name/metricName` is given as "
        "three path segments.",
        _json("the target", "TargetStatus"), parameters=[], errors={},
        operation_id="getTarget",
    ),
    f"{TARGET}/forecast": _target_get(
        "A target's forecast",
        "The forecast per step (timestamp, mean, each quantile). The defaults are what the "
        "scaler publishes (its lead time, its quantile bands) and are served from memory; a "
        "longer horizon or other quantiles are predicted from the fitted model, at most 2 at "
        "once (503 past that). 503 while the target has no fitted model yet.",
        _json("the forecast", "TargetForecast"),
        parameters=[
            {"name": "horizon", "in": "query", "required": False,
             "description": "steps ahead, at most 7 days of the target's steps (and at most "
             f"{MAX_HORIZON_STEPS}); default: the published horizon",
             "schema": {"type": "integer", "minimum": 1, "maximum": MAX_HORIZON_STEPS}},
            {"name": "quantiles", "in": "query", "required": False,
             "description": f"comma-separated, each in (0, 1), at most {MAX_QUANTILES}; "
             "default: the published bands", "example": "0.5,0.9",
             "schema": {"type": "string", "pattern": _QUANTILES_PARAM}},
        ],
        errors={"400": _INVALID, "503": _UNAVAILABLE},
        operation_id="getForecast",
    ),
    f"{TARGET}/decision": _target_get(
        "The scaling decision",
        "The load to plan for (the quantile forecast for the interval new pods will serve, "
        "floored by the current load) and the replicas the HPA would choose for it, with the "
        "numbers. 503 when the data is not fresh, unless Prometheus cannot be reached and "
        "the trigger's outageHorizon has not run out: then the decision is planned from the "
        "forecast made when it stopped answering (mode `outage`).",
        _json("the decision", "Decision"),
        parameters=[
            _replicas("minReplicas", 0, "lower bound applied to the recommendation (default 1)"),
            _replicas("maxReplicas", 1, "upper bound applied to the recommendation"),
            _replicas("currentReplicas", 0, "replicas now: within the HPA's 10% tolerance the "
                      "recommendation holds at this count"),
        ],
        errors={"400": _INVALID, "503": _UNAVAILABLE},
        operation_id="getDecision",
    ),
    f"{TARGET}/metric": _target_get(
        "KEDA metrics-api value",
        "The planned load as JSON for KEDA's `metrics-api` trigger: set `url` to this route "
        "and `valueLocation: value` (a GJSON path), with the same `targetValue`. 503 when the "
        "data is not fresh, so KEDA's `fallback` applies.",
        _json("the metric", "MetricValue"), parameters=[],
        errors={"503": _UNAVAILABLE}, operation_id="getMetric",
    ),
    f"{TARGET}/plot.png": _target_get(
        "Forecast plot", "History and forecast as a PNG (forecaster/api/pages.py).",
        {"description": "the plot", "content": {"image/png": {
            "schema": {"type": "string", "format": "binary"}}}},
        parameters=[], errors={"503": _UNAVAILABLE}, operation_id="getPlot",
    ),
    PAGE_PLOT: {"get": {
        "summary": "Forecast plot for the page",
        "description": "The same plot, for the page's <img> tags, which send the session "
        "cookie (forecaster/api/pages.py).",
        "operationId": "getPagePlot",
        "tags": ["pages"],
        "security": _SECURED,
        "parameters": _TARGET_PARAMETERS,
        "responses": {
            "200": {"description": "the plot", "content": {"image/png": {
                "schema": {"type": "string", "format": "binary"}}}},
            "401": _UNAUTHENTICATED,
            "404": _NOT_FOUND,
            "503": _UNAVAILABLE,
        },
    }},
    f"{TARGET}/share.png": _target_get(
        "Share plot",
        "The share of the target's intervals short of capacity over the last day, at each "
        "interval of the last week, against its maxUnderProvisioned, as a PNG "
        "(forecaster/api/pages.py). 404 for a target that plans at a fixed quantile.",
        {"description": "the plot", "content": {"image/png": {
            "schema": {"type": "string", "format": "binary"}}}},
        parameters=[], errors={}, operation_id="getSharePlot",
    ),
    PAGE_SHARE_PLOT: {"get": {
        "summary": "Share plot for the page",
        "description": "The same share plot, for the page's <img> tags, which send the "
        "session cookie (forecaster/api/pages.py).",
        "operationId": "getPageSharePlot",
        "tags": ["pages"],
        "security": _SECURED,
        "parameters": _TARGET_PARAMETERS,
        "responses": {
            "200": {"description": "the plot", "content": {"image/png": {
                "schema": {"type": "string", "format": "binary"}}}},
            "401": _UNAUTHENTICATED,
            "404": _NOT_FOUND,
        },
    }},
    "/api/v1/forecast": {
        "post": {
            "summary": "An ad-hoc forecast",
            "description": "Fits a model, in a worker process, to inline `series`, or to "
            "`query` on a configured Prometheus server over `historyWindow`, and forecasts "
            f"`horizon` steps. Bounded: a body of at most 2 MiB, at most {MAX_POINTS} points, "
            f"steps of at most {MAX_STEP_SECONDS}s, and at most 2 ad-hoc fits at once (503 "
            "with Retry-After past that). A query runs with forecaster's own Prometheus "
            "credentials, so it is refused (403 naming the setting) unless the config sets "
            "`api: {allowQueries: true}`, which needs apiToken. A query Prometheus answers "
            "with other than one clean series is 422 naming `query`; an unreachable "
            "Prometheus is 503.",
            "operationId": "postForecast",
            "tags": ["forecasts"],
            "security": _SECURED_WRITE,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"oneOf": [
                    _ref("SeriesForecastRequest"), _ref("QueryForecastRequest")]}}},
            },
            "responses": {
                "200": _json("the forecast", "AdhocForecast"),
                "400": _INVALID,
                "401": _UNAUTHENTICATED,
                "403": _error("a query, and the config does not allow queries "
                              "(api.allowQueries) or sets no apiToken"),
                "413": _error("the body, or the points in it, are over the limits"),
                "415": _error("the body is not sent as `Content-Type: application/json`"),
                "422": _error("no model could be fitted, or the query's answer is unusable"),
                "503": _UNAVAILABLE,
            },
        }
    },
}


def _every_operation_refuses(paths: dict[str, Any]) -> dict[str, Any]:
    """Every operation: 400 for a query parameter it does not take or one given twice, and 405
    for another method on its path (each answer says which methods the path takes)."""
    for item in paths.values():
        for operation in item.values():
            operation["responses"].setdefault("400", _INVALID)
            operation["responses"]["405"] = _NOT_ALLOWED
    return paths


_every_operation_refuses(_PATHS)

_DOCUMENT: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "forecaster",
        "version": API_VERSION,
        "description": "Predictive autoscaling for Kubernetes. A target's id is "
        "`namespace/name/metricName` (the ScaledObject's namespace and name and the trigger's "
        "metric name); URLs carry it as three path segments: "
        "`/api/v1/targets/{namespace}/{name}/{metric}/...`. Every error is JSON of one shape, "
        "`{\"error\": {\"code\", \"message\", \"field\"}}`; a 503 carries Retry-After. With "
        "`apiToken` configured, every route but /healthz, /readyz and /login needs "
        "`Authorization: Bearer <apiToken>`, or for GET the session cookie that POST /login "
        "sets; /metrics also takes `metricsToken`.",
    },
    "paths": _PATHS,
    "components": {
        "schemas": _SCHEMAS,
        "responses": {
            "InvalidArgument": _error("a parameter breaks a rule, or a query parameter is "
                                      "unknown to the route or given more than once; `field` "
                                      "names it"),
            "MethodNotAllowed": {
                **_error("the path does not take this method; the message and the Allow "
                         "header name the methods it takes"),
                "headers": {"Allow": {"description": "the methods the path takes",
                                      "schema": {"type": "string"}}},
            },
            "Unauthenticated": _error("a token is configured and the request carries none "
                                      "that this route accepts (bearer token or, for GET, "
                                      "the session cookie)"),
            "NotFound": _error("no such target (it is registered by KEDA's first call, or "
                               "listed under `targets:` in the config)"),
            "Unavailable": _unavailable("no fresh data or model yet, Prometheus unreachable, "
                                        "or busy; retry after Retry-After seconds"),
        },
        "securitySchemes": {
            "bearerAuth": {"type": "http", "scheme": "bearer",
                           "description": "the config's apiToken"},
            "metricsToken": {"type": "http", "scheme": "bearer",
                             "description": "the config's metricsToken: /metrics only"},
            "sessionCookie": {"type": "apiKey", "in": "cookie", "name": "forecaster_session",
                              "description": "set by POST /login; GET and HEAD only"},
        },
    },
}


def openapi_document() -> dict[str, Any]:
    """The document (a fresh copy: callers may change theirs)."""
    return copy.deepcopy(_DOCUMENT)


def openapi_path(rule: str) -> str:
    """A Flask rule (`/a/<namespace>/<path:name>`) as the document's path
    (`/a/{namespace}/{name}`)."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


_QUERY_PARAMETERS: dict[tuple[str, str], frozenset[str]] = {
    (path, method.upper()): frozenset(
        parameter["name"] for parameter in operation.get("parameters", ())
        if parameter["in"] == "query"
    )
    for path, item in _PATHS.items()
    for method, operation in item.items()
}


def query_parameters(path: str, method: str) -> frozenset[str] | None:
    """The query parameters the document gives the operation (HEAD: GET's); None when the
    document has no such operation."""
    method = "GET" if method == "HEAD" else method
    return _QUERY_PARAMETERS.get((path, method))


def target_subresources() -> tuple[str, ...]:
    """What follows a target's id in its routes (`forecast`, `decision`, ...)."""
    prefix = f"{TARGET}/"
    return tuple(path.removeprefix(prefix) for path in _PATHS if path.startswith(prefix))
