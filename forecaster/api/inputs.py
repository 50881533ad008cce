"""Query parameters and request bodies of the REST API, validated into plain values.

Pure functions: no Flask here. Every rule broken raises InvalidInputError naming the field as
the client wrote it (`horizon`, `series[3].value`), or PayloadTooLarge for the size limits.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from forecaster.api.errors import PayloadTooLarge
from forecaster.durations import ACCEPTED_DURATION_FORMS, parse_duration
from forecaster.errors import InvalidInputError
from forecaster.models import MODEL_FACTORIES
from forecaster.series import MAX_VALUE

MAX_HORIZON_SECONDS = 7 * 86_400
MAX_HORIZON_STEPS = 2016  # 7 days of 5-minute steps
MAX_QUANTILES = 9
MAX_POINTS = 20_000
MAX_STEP_SECONDS = 86_400
MAX_QUERY_CHARS = 10_000
MIN_HISTORY_STEPS = 10
EARLIEST = pd.Timestamp("1970-01-01", tz="UTC")
LATEST = pd.Timestamp("2200-01-01", tz="UTC")  # nanosecond timestamps end in 2262

ADHOC_DEFAULTS: Mapping[str, Any] = {
    "step": "5m",
    "horizon": 12,
    "quantiles": (0.1, 0.5, 0.9),
    "model": "auto",
    "historyWindow": "7d",
}
SERIES_KEYS = frozenset({"series", "step", "horizon", "quantiles", "model"})
QUERY_KEYS = frozenset({"serverAddress", "query", "historyWindow", "step", "horizon",
                        "quantiles", "model"})

_WHOLE = re.compile(r"[0-9]{1,9}")
_DECIMAL = re.compile(r"(?:0?\.[0-9]{1,12}|0|1)")


def check_query_keys(given: Iterable[str], allowed: frozenset[str]) -> None:
    """Refuse a query parameter the route does not take, or one given more than once: either
    would be silently ignored (a misspelt `maxReplica`, a second `maxReplicas`)."""
    counts = Counter(given)
    for key, times in counts.items():
        if key not in allowed:
            takes = (f"it takes {', '.join(sorted(allowed))}" if allowed
                     else "it takes no query parameters")
            raise InvalidInputError(key, f"is not a query parameter of this route; {takes}")
        if times > 1:
            hint = " (a list is comma-separated, as in quantiles=0.5,0.9)" if (
                key == "quantiles") else ""
            raise InvalidInputError(key, f"is given {times} times; give it once{hint}")


_JSON_TYPES = ((bool, "boolean"), (int | float, "number"), (str, "string"), (list, "array"),
               (dict, "object"))
SHOWN_CHARS = 60


def json_type(value: Any) -> str:
    """The JSON name of a parsed JSON value's type (`object`, not Python's `dict`)."""
    if value is None:
        return "null"
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)),
                type(value).__name__)


def shown(value: Any) -> str:
    """A value from a JSON body in JSON's spelling (true, null, "text"), cut short for a
    message."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS - 3]}..."


def max_horizon_steps(step_seconds: int) -> int:
    """The longest horizon served: 7 days of steps, and never more than 2016 steps."""
    return max(1, min(MAX_HORIZON_STEPS, MAX_HORIZON_SECONDS // step_seconds))


def whole_number(text: str | None, field: str, *, low: int, high: int) -> int | None:
    """A whole-number query parameter in [low, high], or None when absent."""
    if text is None:
        return None
    if not _WHOLE.fullmatch(text):
        raise InvalidInputError(
            field, f"must be a whole number between {low} and {high}; got {reprlib.repr(text)}"
        )
    return _in_range(int(text), field, low, high)


def horizon_param(text: str | None, step_seconds: int, default: int) -> int:
    high = max_horizon_steps(step_seconds)
    value = whole_number(text, "horizon", low=1, high=high)
    return min(default, high) if value is None else value


def quantiles_param(text: str | None, default: tuple[float, ...]) -> tuple[float, ...]:
    """`0.5,0.9` into (0.5, 0.9): each in (0, 1), at most MAX_QUANTILES distinct."""
    if text is None:
        return default
    parts = [part.strip() for part in text.split(",")]
    values = []
    for part in parts:
        if not _DECIMAL.fullmatch(part):
            raise InvalidInputError(
                "quantiles",
                f"must be comma-separated decimals in (0, 1) such as '0.5,0.9'; "
                f"got {reprlib.repr(part)}",
            )
        values.append(float(part))
    return _quantiles(values)


def _quantiles(values: list[float]) -> tuple[float, ...]:
    for value in values:
        if not 0 < value < 1:
            raise InvalidInputError("quantiles", f"each must be in (0, 1), got {value!r}")
    distinct = tuple(sorted(set(values)))
    if not distinct:
        raise InvalidInputError("quantiles", "must hold at least one quantile such as 0.9")
    if len(distinct) > MAX_QUANTILES:
        raise InvalidInputError(
            "quantiles", f"at most {MAX_QUANTILES} distinct quantiles, got {len(distinct)}"
        )
    return distinct


def _in_range(value: int, field: str, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidInputError(field, f"must be between {low} and {high}; got {value}")
    return value


@dataclass(frozen=True)
class AdhocRequest:
    """A validated POST /api/v1/forecast body: inline `series`, or `query` on a server."""

    step_seconds: int
    horizon: int
    quantiles: tuple[float, ...]
    model: str
    series: pd.Series | None = None
    server_address: str | None = None
    query: str | None = None
    history_window_seconds: int | None = None

    @property
    def history_steps(self) -> int:
        """Steps of history a query asks Prometheus for."""
        return (self.history_window_seconds or 0) // self.step_seconds


def parse_body(data: bytes) -> Any:
    """A request body as JSON; InvalidInputError naming `body` when it is not JSON."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise InvalidInputError("body", f"must be a JSON object: {exc}") from None


def wants_query(body: Any) -> bool:
    """Whether a body asks for a forecast of a Prometheus query rather than of inline points."""
    return isinstance(body, dict) and "series" not in body and bool(
        {"query", "serverAddress"} & set(body)
    )


def adhoc_request(body: Any) -> AdhocRequest:
    """Validate the body of an ad-hoc forecast; see the OpenAPI document for its schema."""
    if not isinstance(body, dict):
        raise InvalidInputError(
            "body", f"must be a JSON object, got {json_type(body)} {shown(body)}"
        )
    inline = "series" in body
    if not inline and not ({"query", "serverAddress"} & set(body)):
        raise InvalidInputError(
            "series", "give either 'series' (inline points) or 'serverAddress' and 'query'"
        )
    allowed = SERIES_KEYS if inline else QUERY_KEYS
    for key in body:
        if key not in allowed:
            other = "query" if inline else "series"
            hint = (f"; it belongs to a {other} request, and a body is one or the other"
                    if key in SERIES_KEYS | QUERY_KEYS else "")
            raise InvalidInputError(
                key, f"is not a field here{hint}; fields: {', '.join(sorted(allowed))}"
            )
    step = _step(body.get("step", ADHOC_DEFAULTS["step"]))
    horizon = _horizon(body.get("horizon", ADHOC_DEFAULTS["horizon"]), step)
    quantiles = _quantile_list(body.get("quantiles", list(ADHOC_DEFAULTS["quantiles"])))
    model = _model(body.get("model", ADHOC_DEFAULTS["model"]))
    if inline:
        series = _series(body["series"], step)
        return AdhocRequest(step, horizon, quantiles, model, series=series)
    address = _text(body.get("serverAddress"), "serverAddress", 2048)
    query = _text(body.get("query"), "query", MAX_QUERY_CHARS)
    window = _duration(body.get("historyWindow", ADHOC_DEFAULTS["historyWindow"]),
                       "historyWindow")
    if window < MIN_HISTORY_STEPS * step:
        raise InvalidInputError(
            "historyWindow",
            f"must hold at least {MIN_HISTORY_STEPS} steps of {step}s; got {window}s",
        )
    if window // step > MAX_POINTS:
        raise InvalidInputError(
            "historyWindow",
            f"holds {window // step} steps of {step}s; at most {MAX_POINTS}: shorten "
            f"historyWindow or raise step",
        )
    return AdhocRequest(step, horizon, quantiles, model, server_address=address, query=query,
                        history_window_seconds=window)


def _text(value: Any, field: str, limit: int) -> str:
    if value is None:
        raise InvalidInputError(field, "is required")
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(field, f"must be a non-empty string; got {shown(value)}")
    if len(value) > limit:
        raise InvalidInputError(field, f"must be at most {limit} characters; got {len(value)}")
    return value.strip()


def _duration(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidInputError(
            field, f"must be a duration, {ACCEPTED_DURATION_FORMS}; got {shown(value)}"
        )
    seconds = value if isinstance(value, int) else parse_duration(value, field)
    if seconds < 1:
        raise InvalidInputError(field, f"must be at least 1s; got {shown(value)}")
    return seconds


def _step(value: Any) -> int:
    step = _duration(value, "step")
    if step > MAX_STEP_SECONDS:
        raise InvalidInputError("step", f"must be at most 1d ({MAX_STEP_SECONDS}s); got {step}s")
    return step


def _horizon(value: Any, step: int) -> int:
    high = max_horizon_steps(step)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(
            "horizon", f"must be a whole number of steps from 1 to {high}; got "
            f"{shown(value)}"
        )
    if not 1 <= value <= high:
        raise InvalidInputError(
            "horizon", f"must be between 1 and {high} steps (7 days of {step}s steps, "
            f"at most {MAX_HORIZON_STEPS}); got {value}"
        )
    return value


def _quantile_list(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not all(
        isinstance(q, int | float) and not isinstance(q, bool) for q in value
    ):
        raise InvalidInputError(
            "quantiles", f"must be a list of numbers in (0, 1); got {shown(value)}"
        )
    return _quantiles([float(q) for q in value])


def _model(value: Any) -> str:
    if not isinstance(value, str) or value not in MODEL_FACTORIES:
        known = ", ".join(sorted(MODEL_FACTORIES))
        raise InvalidInputError("model", f"must be one of {known}; got {shown(value)}")
    return value


def _series(value: Any, step: int) -> pd.Series:
    """Inline points into a UTC series: strictly increasing ISO times, finite values >= 0."""
    if not isinstance(value, list):
        raise InvalidInputError(
            "series", f"must be a list of {{timestamp, value}} objects; got {json_type(value)}"
        )
    if len(value) > MAX_POINTS:
        raise PayloadTooLarge(
            f"series holds {len(value)} points; at most {MAX_POINTS} are accepted", field="series"
        )
    if not value:
        raise InvalidInputError("series", "must hold at least one point")
    stamps: list[str] = []
    numbers: list[float] = []
    for i, point in enumerate(value):
        if not isinstance(point, dict) or set(point) != {"timestamp", "value"}:
            raise InvalidInputError(
                f"series[{i}]",
                f"must be an object with exactly 'timestamp' and 'value'; got "
                f"{shown(point)}",
            )
        stamp, number = point["timestamp"], point["value"]
        if not isinstance(stamp, str):
            raise InvalidInputError(
                f"series[{i}].timestamp",
                f"must be an ISO-8601 string such as '2024-05-01T12:00:00Z'; got "
                f"{shown(stamp)}",
            )
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise InvalidInputError(
                f"series[{i}].value", f"must be a number; got {shown(number)}"
            )
        stamps.append(stamp)
        numbers.append(float(number))
    times = pd.to_datetime(pd.Series(stamps), utc=True, format="ISO8601", errors="coerce")
    bad = np.flatnonzero(times.isna().to_numpy())
    if bad.size:
        i = int(bad[0])
        raise InvalidInputError(
            f"series[{i}].timestamp",
            f"cannot parse {shown(stamps[i])} as an ISO-8601 time such as "
            f"'2024-05-01T12:00:00Z'",
        )
    outside = np.flatnonzero(((times < EARLIEST) | (times >= LATEST)).to_numpy())
    if outside.size:
        i = int(outside[0])
        raise InvalidInputError(
            f"series[{i}].timestamp",
            f"{shown(stamps[i])} is outside {EARLIEST.year}..{LATEST.year - 1}",
        )
    index = pd.DatetimeIndex(times).as_unit("ns")
    values = np.asarray(numbers)
    wrong = np.flatnonzero(~np.isfinite(values) | (values < 0) | (values > MAX_VALUE))
    if wrong.size:
        i = int(wrong[0])
        raise InvalidInputError(
            f"series[{i}].value",
            f"must be a finite number from 0 to {MAX_VALUE:g} (a rate); got "
            f"{shown(value[i]['value'])}",
        )
    order = np.flatnonzero(np.diff(index.asi8) <= 0)
    if order.size:
        i = int(order[0]) + 1
        raise InvalidInputError(
            f"series[{i}].timestamp",
            f"{shown(stamps[i])} is not after the previous point's {shown(stamps[i - 1])}; "
            f"points must be in strictly increasing time",
        )
    span = (index[-1] - index[0]) // pd.Timedelta(seconds=step) + 1
    if span > MAX_POINTS:
        raise PayloadTooLarge(
            f"series spans {span} steps of {step}s from first to last point; at most "
            f"{MAX_POINTS}: raise step or send a shorter span",
            field="series",
        )
    return pd.Series(values, index=index, name="value")


def finite(value: float | None) -> float | None:
    """A number for JSON: NaN and infinities (which JSON cannot carry) become null."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)
