"""Service settings, read and validated in one place: a YAML file, then environment, then flags.

A config file (every key optional)::

    grpcPort: 50051
    httpPort: 8080
    host: 0.0.0.0               # the address both ports bind
    refreshInterval: 30s        # pull new points this often
    refitInterval: 1h           # refit each target's model this often
    targetIdleTimeout: 1h       # drop targets no scaler request asked about for this long
    maxTargets: 5000            # refuse new targets from scaler requests beyond this many
    targetMemoryBytes: 32Mi     # refuse a trigger estimated to hold more (bytes, or Ki/Mi/Gi)
    maxStartup: 6h              # the most a trigger's startupSeconds may be (up to 1d)
    maxOutageHorizon: 6h        # the most its outageHorizon may be (up to 1d)
    maxHistoryWindow: 90d       # the most its historyWindow may be (up to 730d)
    maxPointsPerTarget: 50000   # the most its historyWindow / step may be (up to 1000000)
    maxQueryBytes: 8Ki          # the most its query's bytes may be (up to 64Ki); raising these
                                # is safe: targetMemoryBytes still refuses a trigger over it
    fitWorkers: 2               # processes that fit models
    dryRun: false               # true: forecast and publish decisions, serve KEDA the current load
    stateDir: /var/lib/forecaster   # keep each target's model and state here across restarts
    prometheus:                 # the servers scaler requests may name, with their credentials
      - url: http://prometheus.monitoring:9090
        bearerTokenFile: /var/run/secrets/prometheus/token   # or bearerTokenEnv: VARIABLE,
                                # or basicAuth: {username: NAME, passwordFile: PATH}
                                # (or passwordEnv: VARIABLE)
        headers: {X-Scope-OrgID: team-a}
        caFile: /etc/prometheus-ca/ca.crt                     # or insecureSkipVerify: true
        timeout: 10s
        retries: 2              # a query sent again after a transport error, timeout or 5xx
        maxReplyBytes: 16777216 # a larger reply is refused while it arrives
        maxConcurrentQueries: 4 # this server's refreshes in flight at once
    defaults: {step: 5m, historyWindow: 14d}                  # trigger metadata defaults
    targets:                                                  # forecast before KEDA first asks
      - {namespace: shop, name: web, metadata: {serverAddress: ..., query: ..., targetValue: "50"}}
    tls: {certFile: /tls/tls.crt, keyFile: /tls/tls.key, clientCAFile: /tls/ca.crt}
    apiToken: {file: /var/run/secrets/api/token}              # or env: NAME; every HTTP route
                                                              # but /healthz and /readyz needs it
    metricsToken: {file: /var/run/secrets/metrics/token}      # or env: NAME; /metrics only
    api:
      allowQueries: false       # true: POST /api/v1/forecast may query Prometheus (needs apiToken)

Most keys are also read from a FORECASTER_* variable (see `load_settings`; docs/deploy.md,
"Every setting", lists each with its variable and flag).
"""

from __future__ import annotations

import os
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from forecaster.durations import format_duration, parse_duration
from forecaster.errors import InvalidInputError
from forecaster.sources.prometheus import (
    DEFAULT_MAX_CONCURRENT_QUERIES,
    DEFAULT_MAX_REPLY_BYTES,
    MAX_CONCURRENT_QUERIES_LIMIT,
    PrometheusServerConfig,
)
from forecaster.spec import (
    DEFAULT_LIMITS,
    DEFAULT_TARGET_MEMORY_BYTES,
    LIMIT_CEILINGS,
    TriggerLimits,
    check_memory,
    metric_spec,
    target_id,
)

ENV_PREFIX = "FORECASTER_"
MIN_TARGET_MEMORY_BYTES = 2**20
MAX_TARGET_MEMORY_BYTES = 64 * 2**30
_BINARY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


@dataclass(frozen=True)
class EngineSettings:
    """How the background loop paces its work."""

    refresh_seconds: float = 30.0
    refit_seconds: float = 3600.0
    idle_seconds: float = 3600.0
    max_targets: int = 5000  # request-created targets beyond it are refused (memory, fit time)
    # A trigger whose memory estimate (forecaster.spec.memory_estimate) exceeds it is refused.
    target_memory_bytes: int = DEFAULT_TARGET_MEMORY_BYTES
    # The bounds a trigger's metadata is held to; raised, they stay under target_memory_bytes.
    trigger_limits: TriggerLimits = DEFAULT_LIMITS
    fit_workers: int = 2
    io_workers: int = 8
    first_value_wait_seconds: float = 3.0
    dry_run: bool = False  # serve the reactive value to KEDA; forecasts are still published


@dataclass(frozen=True)
class TlsSettings:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None


@dataclass(frozen=True)
class ApiSettings:
    """What the REST API lets a caller do beyond reading forecasts."""

    # An ad-hoc forecast of a PromQL query runs it with forecaster's own Prometheus
    # credentials, so it is off unless the operator turns it on (and sets apiToken).
    allow_queries: bool = False


@dataclass(frozen=True)
class ConfiguredTarget:
    """A target the operator lists, forecast from start-up on."""

    namespace: str
    name: str
    metadata: Mapping[str, str]


@dataclass(frozen=True)
class Settings:
    engine: EngineSettings = field(default_factory=EngineSettings)
    servers: tuple[PrometheusServerConfig, ...] = ()
    defaults: Mapping[str, str] = field(default_factory=dict)
    targets: tuple[ConfiguredTarget, ...] = ()
    grpc_port: int = 50051
    http_port: int = 8080
    host: str = "0.0.0.0"
    tls: TlsSettings | None = None
    api_token: str | None = None
    demo: bool = False
    metrics_token: str | None = None  # for scrapes: accepted on /metrics only
    api: ApiSettings = field(default_factory=ApiSettings)
    # Where each target's fitted model and live state are saved, to serve from at a restart
    # (forecaster.state); None: nothing is saved. Only forecaster may write it.
    state_dir: Path | None = None

    def __repr__(self) -> str:
        token = None if self.api_token is None else "***"
        metrics = None if self.metrics_token is None else "***"
        return (
            f"Settings(engine={self.engine!r}, servers={self.servers!r}, "
            f"targets={len(self.targets)}, grpc_port={self.grpc_port}, "
            f"http_port={self.http_port}, tls={self.tls is not None}, api_token={token!r}, "
            f"metrics_token={metrics!r}, api={self.api!r}, state_dir={self.state_dir!r})"
        )

    def configured_target_values(self) -> tuple[tuple[str, float], ...]:
        """(target id, targetValue) of each listed target, named as the engine names it."""
        found = []
        for target in self.targets:
            spec = metric_spec(target.metadata, self.defaults)
            found.append((target_id(target.namespace, target.name, spec.metric_name),
                          spec.target_value))
        return tuple(found)


def load_settings(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    path_name: str = "config",
) -> Settings:
    """Settings from a YAML file, then FORECASTER_* environment variables, then `overrides`
    (the command line's flags, which win); every value validated here. An error in the file
    `path` itself is named `path_name` (the flag that gave it)."""
    env = os.environ if env is None else env
    # Where a value came from, by the setting it sets: an error names the variable.
    sources: dict[str, str] = {"config": path_name}
    if path is None and env.get(f"{ENV_PREFIX}CONFIG"):
        path = Path(env[f"{ENV_PREFIX}CONFIG"])
        sources["config"] = f"{ENV_PREFIX}CONFIG"
    raw: dict[str, Any] = _read_yaml(path, _named("config", sources)) if path else {}
    for key, variable in ENV_VARIABLES.items():
        if variable in env:
            raw[key] = env[variable]
            sources[key] = variable
    if env.get(f"{ENV_PREFIX}PROMETHEUS_URL"):  # one server without a file: the quick start
        servers = list(raw.get("prometheus") or [])
        raw["prometheus"] = [*servers, {"url": env[f"{ENV_PREFIX}PROMETHEUS_URL"]}]
        sources[f"prometheus[{len(servers)}]"] = f"{ENV_PREFIX}PROMETHEUS_URL"
    if f"{ENV_PREFIX}API_TOKEN_FILE" in env:
        raw["apiToken"] = {"file": env[f"{ENV_PREFIX}API_TOKEN_FILE"]}
        sources["apiToken"] = f"{ENV_PREFIX}API_TOKEN_FILE"
    # The scrape token as a value (a Secret's key in the pod's env) or as a file.
    if f"{ENV_PREFIX}METRICS_TOKEN" in env:
        raw["metricsToken"] = {"env": f"{ENV_PREFIX}METRICS_TOKEN"}
        sources["metricsToken"] = f"{ENV_PREFIX}METRICS_TOKEN"
    if f"{ENV_PREFIX}METRICS_TOKEN_FILE" in env:
        raw["metricsToken"] = {"file": env[f"{ENV_PREFIX}METRICS_TOKEN_FILE"]}
        sources["metricsToken"] = f"{ENV_PREFIX}METRICS_TOKEN_FILE"
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = value
            sources.pop(key, None)
    try:
        return _build(raw, env)
    except InvalidInputError as exc:
        named = _named(exc.field, sources)
        if named == exc.field:
            raise
        raise InvalidInputError(named, exc.reason) from exc


# The settings a FORECASTER_* variable sets on its own, by key.
ENV_VARIABLES = {
    "grpcPort": "FORECASTER_GRPC_PORT",
    "httpPort": "FORECASTER_HTTP_PORT",
    "refreshInterval": "FORECASTER_REFRESH_INTERVAL",
    "refitInterval": "FORECASTER_REFIT_INTERVAL",
    "targetIdleTimeout": "FORECASTER_TARGET_IDLE_TIMEOUT",
    "maxTargets": "FORECASTER_MAX_TARGETS",
    "targetMemoryBytes": "FORECASTER_TARGET_MEMORY_BYTES",
    "maxStartup": "FORECASTER_MAX_STARTUP",
    "maxOutageHorizon": "FORECASTER_MAX_OUTAGE_HORIZON",
    "maxHistoryWindow": "FORECASTER_MAX_HISTORY_WINDOW",
    "maxPointsPerTarget": "FORECASTER_MAX_POINTS_PER_TARGET",
    "maxQueryBytes": "FORECASTER_MAX_QUERY_BYTES",
    "fitWorkers": "FORECASTER_FIT_WORKERS",
    "dryRun": "FORECASTER_DRY_RUN",
    "stateDir": "FORECASTER_STATE_DIR",
}


def setting_name(key: str, env: Mapping[str, str] | None = None) -> str:
    """What an error calls a setting: its variable and key when the environment set it (as
    load_settings reads it), else its key."""
    env = os.environ if env is None else env
    return _named(key, {k: variable for k, variable in ENV_VARIABLES.items() if variable in env})


def _named(field_name: str, sources: Mapping[str, str]) -> str:
    """A field under a setting a variable gave, named by the variable and the field."""
    for key, variable in sources.items():
        if field_name == key or field_name.startswith((f"{key}.", f"{key}[")):
            return variable if field_name == "config" else f"{variable} ({field_name})"
    return field_name


def _read_yaml(path: Path, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInputError(where, f"cannot read {str(path)!r}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidInputError(where, f"{str(path)!r} is not UTF-8 text") from exc
    except yaml.YAMLError as exc:
        raise InvalidInputError(where, f"{str(path)!r} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidInputError(where, f"{str(path)!r} must hold a mapping at the top level")
    return data


KNOWN_KEYS = {
    "grpcPort", "httpPort", "host", "refreshInterval", "refitInterval", "targetIdleTimeout",
    "maxTargets", "targetMemoryBytes", "maxStartup", "maxOutageHorizon", "maxHistoryWindow",
    "maxPointsPerTarget", "maxQueryBytes",
    "fitWorkers", "prometheus", "defaults", "targets", "tls", "apiToken", "demo", "dryRun",
    "metricsToken", "api", "stateDir",
}
API_KEYS = ("allowQueries",)


def _build(raw: Mapping[str, Any], env: Mapping[str, str]) -> Settings:
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise InvalidInputError(
            unknown[0], f"is not a setting; known settings are {', '.join(sorted(KNOWN_KEYS))}"
        )
    engine = EngineSettings(
        refresh_seconds=_seconds(raw, "refreshInterval", 30),
        refit_seconds=_seconds(raw, "refitInterval", 3600),
        idle_seconds=_seconds(raw, "targetIdleTimeout", 3600),
        max_targets=_int(raw, "maxTargets", 5000, low=1, high=1_000_000),
        target_memory_bytes=_bytes(raw, "targetMemoryBytes", DEFAULT_TARGET_MEMORY_BYTES,
                                   low=MIN_TARGET_MEMORY_BYTES, high=MAX_TARGET_MEMORY_BYTES),
        trigger_limits=_trigger_limits(raw),
        fit_workers=_int(raw, "fitWorkers", 2, low=1, high=64),
        dry_run=_bool(raw.get("dryRun", False), "dryRun"),
    )
    servers = tuple(
        _server(item, f"prometheus[{i}]", env)
        for i, item in enumerate(_list(raw, "prometheus"))
    )
    first: dict[str, int] = {}
    for i, server in enumerate(servers):
        if server.url in first:
            raise InvalidInputError(
                f"prometheus[{i}].url",
                f"{server.url!r} is already prometheus[{first[server.url]}]; list a server once",
            )
        first[server.url] = i
    defaults = _string_map(raw.get("defaults") or {}, "defaults")
    targets = tuple(_target(item, f"targets[{i}]") for i, item in enumerate(_list(raw, "targets")))
    for i, target in enumerate(targets):
        _check_target(target, f"targets[{i}]", defaults, servers, engine)
    settings = Settings(
        engine=engine,
        servers=servers,
        defaults=defaults,
        targets=targets,
        grpc_port=_int(raw, "grpcPort", 50051, low=0, high=65535),
        http_port=_int(raw, "httpPort", 8080, low=0, high=65535),
        host=str(raw.get("host", "0.0.0.0")),
        tls=_tls(raw.get("tls")),
        api_token=_secret(raw.get("apiToken"), "apiToken", env),
        demo=_bool(raw.get("demo", False), "demo"),
        metrics_token=_secret(raw.get("metricsToken"), "metricsToken", env),
        api=_api(raw.get("api")),
        state_dir=_directory(raw.get("stateDir"), "stateDir"),
    )
    if settings.api.allow_queries and settings.api_token is None:
        raise InvalidInputError(
            "api.allowQueries",
            "needs apiToken: a query runs with forecaster's own Prometheus credentials, so "
            "only callers with the API token may send one; set apiToken: {file: PATH} or "
            "{env: NAME}, or leave allowQueries false",
        )
    return settings


def with_overrides(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, **changes)


def _seconds(raw: Mapping[str, Any], key: str, default: float) -> float:
    value = raw.get(key)
    if value is None:
        return float(default)
    seconds = parse_duration(str(value), key)
    if seconds <= 0:
        raise InvalidInputError(key, f"must be longer than 0s, got {value!r}")
    return float(seconds)


def _int(
    raw: Mapping[str, Any], key: str, default: int, *, low: int, high: int, where: str = ""
) -> int:
    value = raw.get(key, default)
    name = f"{where}.{key}" if where else key
    number = whole_number(value, name)
    if not low <= number <= high:
        raise InvalidInputError(name, f"must be between {low} and {high}, got {number}")
    return number


_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]{1,4000}")  # int() reads at most 4300 digits


def whole_number(value: Any, where: str) -> int:
    """A whole number in ASCII digits with an optional sign, the one reading of every whole
    setting and flag: int() alone also takes '1_0' as 10 and other scripts' digits."""
    text = str(value).strip() if isinstance(value, str | int) else ""
    if isinstance(value, bool) or not _WHOLE_NUMBER.fullmatch(text):
        raise InvalidInputError(where, f"must be a whole number, got {reprlib.repr(value)}")
    return int(text)


def _directory(value: Any, where: str) -> Path | None:
    """A directory setting: a non-empty path (the directory itself is checked at start)."""
    if value is None:
        return None
    if not isinstance(value, str | Path) or not str(value).strip():
        raise InvalidInputError(where, f"must be a directory path, got {reprlib.repr(value)}")
    return Path(value)


def _bytes(raw: Mapping[str, Any], key: str, default: int, *, low: int, high: int) -> int:
    """A size in bytes: a whole number, or one with a binary unit (Ki, Mi, Gi) as Kubernetes
    writes memory, such as 32Mi."""
    value = raw.get(key, default)
    size = _size(value, key)
    if not low <= size <= high:
        raise InvalidInputError(
            key, f"must be from {low // 2**20}Mi to {high // 2**30}Gi; got {reprlib.repr(value)}"
        )
    return size


def _size(value: Any, key: str) -> int:
    text = str(value).strip()
    unit = _BINARY_UNITS.get(text[-2:], 1)
    digits = text[:-2] if unit > 1 else text
    ascii_digits = digits.isascii() and digits.isdigit()  # not '²': int() refuses it
    if isinstance(value, bool) or not ascii_digits or len(digits) > 15:
        raise InvalidInputError(
            key, f"must be a whole number of bytes, or one with Ki, Mi or Gi such as '32Mi'; "
            f"got {reprlib.repr(value)}",
        )
    return int(digits) * unit


def _show_size(size: int) -> str:
    """A size in the largest binary unit that divides it: 8192 -> '8Ki'."""
    for unit, factor in reversed(_BINARY_UNITS.items()):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _seconds_value(value: Any, key: str) -> int:
    return parse_duration(str(value), key)


# The bounds on a trigger that an operator may raise: the setting, the TriggerLimits field,
# what it bounds in a trigger, how its values are read and shown.
_LIMIT_SETTINGS: tuple[
    tuple[str, str, str, Callable[[Any, str], int], Callable[[int], str]], ...
] = (
    ("maxStartup", "max_startup_seconds", "startupSeconds", _seconds_value, format_duration),
    ("maxOutageHorizon", "max_outage_horizon_seconds", "outageHorizon", _seconds_value,
     format_duration),
    ("maxHistoryWindow", "max_history_seconds", "historyWindow", _seconds_value,
     format_duration),
    ("maxPointsPerTarget", "max_points", "historyWindow / step", whole_number,
     "{:,}".format),
    ("maxQueryBytes", "max_query_bytes", "query size in bytes", _size, _show_size),
)


def _trigger_limits(raw: Mapping[str, Any]) -> TriggerLimits:
    """The trigger bounds, each from its built-in value (not lower: the built-in defaults of
    a trigger's keys must stay within it) to its ceiling."""
    values: dict[str, int] = {}
    for key, name, bounds, parse, show in _LIMIT_SETTINGS:
        low, high = getattr(DEFAULT_LIMITS, name), getattr(LIMIT_CEILINGS, name)
        value = low if raw.get(key) is None else parse(raw[key], key)
        if not low <= value <= high:
            raise InvalidInputError(
                key,
                f"must be from {show(low)!r}, the built-in bound, to {show(high)!r}: the most "
                f"a trigger's {bounds} may be (targetMemoryBytes still holds each trigger); "
                f"got {reprlib.repr(raw[key])}",
            )
        values[name] = value
    return TriggerLimits(**values)


def _bool(value: Any, where: str) -> bool:
    # bool("false") is True: a quoted "false" must not turn insecureSkipVerify on.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise InvalidInputError(where, f"must be true or false, got {reprlib.repr(value)}")


def _known_keys(value: Mapping[str, Any], where: str, known: tuple[str, ...]) -> None:
    # A misspelt key must not be ignored: "clientCaFile" would silently turn mutual TLS off.
    unknown = sorted(str(key) for key in value if key not in known)
    if unknown:
        raise InvalidInputError(
            f"{where}.{unknown[0]}", f"is not a setting here; known: {', '.join(known)}"
        )


def _list(raw: Mapping[str, Any], key: str) -> list[Any]:
    value = raw.get(key) or []
    if not isinstance(value, list):
        raise InvalidInputError(key, f"must be a list, got {type(value).__name__}")
    return value


def _string_map(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise InvalidInputError(where, f"must be a mapping, got {type(value).__name__}")
    return {str(k): str(v) for k, v in value.items()}


def _target(item: Any, where: str) -> ConfiguredTarget:
    if not isinstance(item, dict):
        raise InvalidInputError(where, "must be a mapping with namespace, name and metadata")
    _known_keys(item, where, ("namespace", "name", "metadata"))
    for key in ("namespace", "name", "metadata"):
        if key not in item:
            raise InvalidInputError(f"{where}.{key}", "is required")
    return ConfiguredTarget(
        namespace=str(item["namespace"]),
        name=str(item["name"]),
        metadata=_string_map(item["metadata"], f"{where}.metadata"),
    )


def _check_target(
    target: ConfiguredTarget,
    where: str,
    defaults: Mapping[str, str],
    servers: tuple[PrometheusServerConfig, ...],
    engine: EngineSettings,
) -> None:
    """Parse a configured target as start-up will, so a bad one fails here, naming its path."""
    from forecaster.models import MODEL_FACTORIES
    from forecaster.spec import parse_trigger_metadata

    for key in ("namespace", "name"):
        if not getattr(target, key):
            raise InvalidInputError(f"{where}.{key}", "must not be empty")
    try:
        spec, _ = parse_trigger_metadata(target.metadata, known_models=MODEL_FACTORIES,
                                         defaults=defaults, limits=engine.trigger_limits)
        check_memory(spec, engine.target_memory_bytes)
    except InvalidInputError as exc:
        from_defaults = exc.field in defaults and exc.field not in target.metadata
        origin = "defaults" if from_defaults else f"{where}.metadata"
        raise InvalidInputError(f"{origin}.{exc.field}", exc.reason) from exc
    urls = sorted(server.url for server in servers)
    if urls and spec.server_address not in urls:
        raise InvalidInputError(
            f"{where}.metadata.serverAddress",
            f"{spec.server_address!r} is not a configured Prometheus server; "
            f"configured: {', '.join(urls)}",
        )


def _secret(value: Any, where: str, env: Mapping[str, str]) -> str | None:
    """A secret given as {file: PATH} or {env: NAME}; never inline in the file."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) != 1 or not ({"file", "env"} & set(value)):
        raise InvalidInputError(where, "must be {file: PATH} or {env: NAME}")
    if "file" in value:
        return _file_secret(value["file"], f"{where}.file")
    return _env_secret(value["env"], f"{where}.env", env)


def _file_secret(path: Any, where: str) -> str:
    try:
        secret = Path(str(path)).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise InvalidInputError(where, f"cannot read {str(path)!r}: {exc.strerror}") from exc
    if not secret:
        raise InvalidInputError(where, f"{str(path)!r} is empty")
    return secret


def _env_secret(name: Any, where: str, env: Mapping[str, str]) -> str:
    if str(name) not in env:
        raise InvalidInputError(where, f"environment variable {str(name)!r} is not set")
    # Stripped like a file's: a Secret made with --from-file often ends in a newline. An
    # empty one is refused: an empty token would turn its check off.
    secret = env[str(name)].strip()
    if not secret:
        raise InvalidInputError(where, f"environment variable {str(name)!r} is empty")
    return secret


SERVER_KEYS = (
    "url", "bearerTokenFile", "bearerTokenEnv", "basicAuth", "headers", "caFile",
    "insecureSkipVerify", "timeout", "retries", "maxReplyBytes", "maxConcurrentQueries",
)
# PrometheusServerConfig's field names, as the config file spells them.
_SERVER_FIELDS = {
    "bearer_token": "bearerTokenEnv", "bearer_token_file": "bearerTokenFile",
    "basic_auth": "basicAuth", "ca_file": "caFile", "insecure_skip_verify": "insecureSkipVerify",
    "timeout_seconds": "timeout", "max_concurrent_queries": "maxConcurrentQueries",
}


def _server(item: Any, where: str, env: Mapping[str, str]) -> PrometheusServerConfig:
    if not isinstance(item, dict) or "url" not in item:
        raise InvalidInputError(f"{where}.url", "is required")
    _known_keys(item, where, SERVER_KEYS)
    token = None
    if "bearerTokenEnv" in item:
        token = _env_secret(item["bearerTokenEnv"], f"{where}.bearerTokenEnv", env)
    if "bearerTokenFile" in item:
        # Checked now so a wrong path fails at start-up; still re-read at each request.
        _file_secret(item["bearerTokenFile"], f"{where}.bearerTokenFile")
    basic = None
    if "basicAuth" in item:
        auth = item["basicAuth"]
        if not isinstance(auth, dict) or "username" not in auth:
            raise InvalidInputError(f"{where}.basicAuth", "needs username and passwordFile/Env")
        _known_keys(auth, f"{where}.basicAuth", ("username", "passwordFile", "passwordEnv"))
        if "passwordFile" in auth:
            password = _file_secret(auth["passwordFile"], f"{where}.basicAuth.passwordFile")
        elif "passwordEnv" in auth:
            password = _env_secret(auth["passwordEnv"], f"{where}.basicAuth.passwordEnv", env)
        else:
            raise InvalidInputError(f"{where}.basicAuth", "needs passwordFile or passwordEnv")
        basic = (str(auth["username"]), password)
    headers = _string_map(item.get("headers") or {}, f"{where}.headers")
    timeout = parse_duration(str(item.get("timeout", "10s")), f"{where}.timeout")
    retries = _int(item, "retries", 2, low=0, high=10, where=where)
    max_reply = _int(item, "maxReplyBytes", DEFAULT_MAX_REPLY_BYTES, low=1024, high=2**31,
                     where=where)
    concurrent = _int(item, "maxConcurrentQueries", DEFAULT_MAX_CONCURRENT_QUERIES, low=1,
                      high=MAX_CONCURRENT_QUERIES_LIMIT, where=where)
    skip_verify = _bool(item.get("insecureSkipVerify", False), f"{where}.insecureSkipVerify")
    try:
        return PrometheusServerConfig(
            url=str(item["url"]),
            bearer_token=token,
            bearer_token_file=item.get("bearerTokenFile"),
            basic_auth=basic,
            headers=headers,
            ca_file=item.get("caFile"),
            insecure_skip_verify=skip_verify,
            timeout_seconds=float(timeout),
            retries=retries,
            max_reply_bytes=max_reply,
            max_concurrent_queries=concurrent,
        )
    except InvalidInputError as exc:
        field_name = _SERVER_FIELDS.get(exc.field, exc.field)
        raise InvalidInputError(f"{where}.{field_name}", exc.reason) from exc


def _api(value: Any) -> ApiSettings:
    if value is None:
        return ApiSettings()
    if not isinstance(value, dict):
        raise InvalidInputError("api", f"must be a mapping, got {type(value).__name__}")
    _known_keys(value, "api", API_KEYS)
    return ApiSettings(
        allow_queries=_bool(value.get("allowQueries", False), "api.allowQueries"),
    )


def _tls(value: Any) -> TlsSettings | None:
    if value is None:
        return None
    if not isinstance(value, dict) or "certFile" not in value or "keyFile" not in value:
        raise InvalidInputError("tls", "needs certFile and keyFile (and optionally clientCAFile)")
    _known_keys(value, "tls", ("certFile", "keyFile", "clientCAFile"))
    for key in ("certFile", "keyFile", "clientCAFile"):
        if key in value and not Path(value[key]).is_file():
            raise InvalidInputError(f"tls.{key}", f"{value[key]!r} is not a readable file")
    return TlsSettings(value["certFile"], value["keyFile"], value.get("clientCAFile"))
