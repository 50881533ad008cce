"""load_settings: a YAML file, then FORECASTER_* variables, then flags; every bad setting is an
InvalidInputError naming where it is, and no secret reaches a repr."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from forecaster.cli import main
from forecaster.config import (
    ConfiguredTarget,
    EngineSettings,
    Settings,
    TlsSettings,
    load_settings,
    setting_name,
    whole_number,
)
from forecaster.errors import InvalidInputError
from forecaster.spec import TriggerLimits

BEARER = "bearer-from-file-0x1"
ENV_BEARER = "bearer-from-env-0x2"
PASSWORD = "basic-password-0x3"
API_TOKEN = "api-token-0x4"
HEADER_SECRET = "header-secret-0x5"
SECRETS = (BEARER, ENV_BEARER, PASSWORD, API_TOKEN, HEADER_SECRET)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Secret files, a CA and TLS files that exist (their content is not parsed here)."""
    paths = {
        "token": tmp_path / "token",
        "password": tmp_path / "password",
        "api": tmp_path / "api-token",
        "ca": tmp_path / "ca.crt",
        "cert": tmp_path / "tls.crt",
        "key": tmp_path / "tls.key",
        "client_ca": tmp_path / "client-ca.crt",
        "empty": tmp_path / "empty",
    }
    contents = {"token": f"{BEARER}\n", "password": PASSWORD, "api": f"{API_TOKEN}\n"}
    for name, path in paths.items():
        path.write_text(contents.get(name, "" if name == "empty" else "-----PEM-----\n"))
    return paths


ENV = {"PROM_TOKEN": ENV_BEARER}


def _full(files: dict[str, Path]) -> dict[str, Any]:
    return {
        "grpcPort": 6000,
        "httpPort": 6001,
        "host": "127.0.0.1",
        "refreshInterval": "15s",
        "refitInterval": "2h",
        "targetIdleTimeout": "30m",
        "maxTargets": 300,
        "fitWorkers": 3,
        "prometheus": [
            {
                "url": "https://mimir.example/prometheus/",
                "bearerTokenFile": str(files["token"]),
                "headers": {"X-Scope-OrgID": "team-a"},
                "caFile": str(files["ca"]),
                "timeout": "5s",
            },
            {"url": "http://thanos.example:9090", "bearerTokenEnv": "PROM_TOKEN",
             "insecureSkipVerify": True, "retries": 0},
            {
                "url": "http://vm.example:8428",
                "basicAuth": {"username": "reader", "passwordFile": str(files["password"])},
                "headers": {"X-Auth-Token": HEADER_SECRET},
            },
        ],
        "defaults": {"step": "10m", "historyWindow": "7d"},
        "targets": [
            {
                "namespace": "shop",
                "name": "web",
                "metadata": {
                    "serverAddress": "http://thanos.example:9090",
                    "query": "sum(rate(http_requests_total[2m]))",
                    "targetValue": 50,
                },
            }
        ],
        "tls": {
            "certFile": str(files["cert"]),
            "keyFile": str(files["key"]),
            "clientCAFile": str(files["client_ca"]),
        },
        "apiToken": {"file": str(files["api"])},
    }


def _write(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_a_full_config_file_is_read(files: dict[str, Path], tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path / "config.yaml", _full(files)), env=ENV)

    assert settings.engine == EngineSettings(
        refresh_seconds=15, refit_seconds=7200, idle_seconds=1800, max_targets=300,
        fit_workers=3,
    )
    assert (settings.grpc_port, settings.http_port, settings.host) == (6000, 6001, "127.0.0.1")
    mimir, thanos, vm = settings.servers
    assert mimir.url == "https://mimir.example/prometheus"  # the trailing slash is dropped
    assert mimir.bearer_token_file == str(files["token"])  # a path: re-read at each request
    assert mimir.bearer_token is None
    assert dict(mimir.headers) == {"X-Scope-OrgID": "team-a"}
    assert mimir.ca_file == str(files["ca"])
    assert not mimir.insecure_skip_verify
    assert mimir.timeout_seconds == 5.0
    assert mimir.retries == 2
    assert thanos.bearer_token == ENV_BEARER
    assert thanos.insecure_skip_verify
    assert thanos.timeout_seconds == 10.0
    assert thanos.retries == 0
    assert vm.basic_auth == ("reader", PASSWORD)
    assert dict(settings.defaults) == {"step": "10m", "historyWindow": "7d"}
    assert settings.targets == (
        ConfiguredTarget(
            "shop",
            "web",
            {
                "serverAddress": "http://thanos.example:9090",
                "query": "sum(rate(http_requests_total[2m]))",
                "targetValue": "50",  # every metadata value a string, as KEDA sends it
            },
        ),
    )
    assert settings.tls == TlsSettings(
        str(files["cert"]), str(files["key"]), str(files["client_ca"])
    )
    assert settings.api_token == API_TOKEN


def test_no_file_and_no_environment_give_the_defaults() -> None:
    assert load_settings(env={}) == Settings()


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_settings(path, env={}) == Settings()


def test_environment_overrides_the_file(files: dict[str, Path], tmp_path: Path) -> None:
    path = _write(tmp_path / "config.yaml", _full(files))
    other_token = tmp_path / "other-api-token"
    other_token.write_text("from-env-file")
    env = {
        **ENV,
        "FORECASTER_CONFIG": str(path),  # the file itself may come from the environment
        "FORECASTER_GRPC_PORT": "7000",
        "FORECASTER_HTTP_PORT": "7001",
        "FORECASTER_REFRESH_INTERVAL": "1m",
        "FORECASTER_REFIT_INTERVAL": "30m",
        "FORECASTER_TARGET_IDLE_TIMEOUT": "2h",
        "FORECASTER_FIT_WORKERS": "1",
        "FORECASTER_MAX_TARGETS": "40",
        "FORECASTER_API_TOKEN_FILE": str(other_token),
    }
    settings = load_settings(env=env)
    assert (settings.grpc_port, settings.http_port) == (7000, 7001)
    assert settings.engine == EngineSettings(
        refresh_seconds=60, refit_seconds=1800, idle_seconds=7200, max_targets=40,
        fit_workers=1,
    )
    assert settings.api_token == "from-env-file"
    assert len(settings.servers) == 3  # what the environment does not name, the file keeps


def test_flags_win_over_environment_and_file(files: dict[str, Path], tmp_path: Path) -> None:
    path = _write(tmp_path / "config.yaml", _full(files))
    env = {**ENV, "FORECASTER_GRPC_PORT": "7000", "FORECASTER_HTTP_PORT": "7001"}
    settings = load_settings(
        path, env=env, overrides={"grpcPort": 8000, "httpPort": None, "host": "::1"}
    )
    assert settings.grpc_port == 8000  # the flag
    assert settings.http_port == 7001  # no flag given (None): the environment
    assert settings.host == "::1"
    assert settings.engine.refresh_seconds == 15  # neither: the file


@pytest.mark.parametrize(("value", "size"), [
    (33554432, 32 * 2**20), ("64Mi", 64 * 2**20), ("1Gi", 2**30), ("2048Ki", 2 * 2**20),
])
def test_the_target_memory_budget_is_bytes_or_a_binary_unit(value: object, size: int) -> None:
    assert load_settings(env={}, overrides={"targetMemoryBytes": value}).engine == \
        EngineSettings(target_memory_bytes=size)
    env = {"FORECASTER_TARGET_MEMORY_BYTES": str(value)}
    assert load_settings(env=env).engine.target_memory_bytes == size


LIMITS_SET = {"maxStartup": "8h", "maxOutageHorizon": "12h", "maxHistoryWindow": "400d",
              "maxPointsPerTarget": 200000, "maxQueryBytes": "16Ki"}
LIMITS_READ = TriggerLimits(max_startup_seconds=8 * 3600, max_outage_horizon_seconds=12 * 3600,
                            max_history_seconds=400 * 86400, max_points=200_000,
                            max_query_bytes=16 * 1024)
LIMITS_ENV = {"FORECASTER_MAX_STARTUP": "28800", "FORECASTER_MAX_OUTAGE_HORIZON": "720m",
              "FORECASTER_MAX_HISTORY_WINDOW": "400d",
              "FORECASTER_MAX_POINTS_PER_TARGET": "200000",
              "FORECASTER_MAX_QUERY_BYTES": "16384"}


def test_the_trigger_limits_default_to_the_built_in_bounds_and_are_read_from_file_and_env(
    tmp_path: Path,
) -> None:
    assert load_settings(env={}).engine.trigger_limits == TriggerLimits()
    path = _write(tmp_path / "config.yaml", LIMITS_SET)
    assert load_settings(path, env={}).engine.trigger_limits == LIMITS_READ
    assert load_settings(env=LIMITS_ENV).engine.trigger_limits == LIMITS_READ
    ceilings = {"maxStartup": "24h", "maxOutageHorizon": "1d", "maxHistoryWindow": "730d",
                "maxPointsPerTarget": "1000000", "maxQueryBytes": "64Ki"}
    assert load_settings(env={}, overrides=ceilings).engine.trigger_limits == TriggerLimits(
        24 * 3600, 24 * 3600, 730 * 86400, 1_000_000, 64 * 1024)


@pytest.mark.parametrize(("key", "value", "words"), [
    ("maxStartup", "25h", "must be from '6h', the built-in bound, to '1d'"),
    ("maxStartup", "1h", "must be from '6h', the built-in bound, to '1d'"),
    ("maxStartup", "soon", "must be a duration"),
    ("maxOutageHorizon", "2d", "to '1d'"),
    ("maxHistoryWindow", "731d", "must be from '90d', the built-in bound, to '730d'"),
    ("maxPointsPerTarget", "1000001", "must be from '50,000', the built-in bound, to '1,000,000'"),
    ("maxPointsPerTarget", True, "must be a whole number"),
    ("maxPointsPerTarget", "lots", "must be a whole number"),
    ("maxQueryBytes", "65Ki", "must be from '8Ki', the built-in bound, to '64Ki'"),
    ("maxQueryBytes", "16KB", "Ki, Mi or Gi"),
])
def test_a_bad_trigger_limit_names_the_setting_and_its_bounds(
    key: str, value: object, words: str, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        load_settings(_write(tmp_path / "config.yaml", {key: value}), env={})
    assert caught.value.field == key
    assert words in caught.value.reason and repr(value) in caught.value.reason
    env_name = "FORECASTER_" + "".join(f"_{c}" if c.isupper() else c.upper() for c in key)
    with pytest.raises(InvalidInputError) as caught:
        load_settings(env={env_name: str(value)})
    assert caught.value.field == f"{env_name} ({key})"


def test_a_bad_trigger_limit_makes_serve_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def serve(service: object) -> None:
        raise AssertionError("a bad config must stop serve before it serves")

    monkeypatch.setattr("forecaster.service.run_until_signalled", serve)
    path = _write(tmp_path / "config.yaml", {"maxStartup": "2d"})
    code = main(["serve", "--config", str(path), "--grpc-port", "0", "--http-port", "0",
                 "--host", "127.0.0.1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert lines == ["forecaster: error: maxStartup: must be from '6h', the built-in bound, to "
                     "'1d': the most a trigger's startupSeconds may be (targetMemoryBytes still "
                     "holds each trigger); got '2d'"]


# a bad value in each kind of FORECASTER_* variable -> the name its error must give
BAD_ENVIRONMENT: list[tuple[dict[str, str], str]] = [
    ({"FORECASTER_GRPC_PORT": "fifty"}, "FORECASTER_GRPC_PORT (grpcPort)"),
    ({"FORECASTER_HTTP_PORT": "abc"}, "FORECASTER_HTTP_PORT (httpPort)"),
    ({"FORECASTER_FIT_WORKERS": "0"}, "FORECASTER_FIT_WORKERS (fitWorkers)"),
    ({"FORECASTER_REFIT_INTERVAL": "soon"}, "FORECASTER_REFIT_INTERVAL (refitInterval)"),
    ({"FORECASTER_DRY_RUN": "yes"}, "FORECASTER_DRY_RUN (dryRun)"),
    ({"FORECASTER_STATE_DIR": " "}, "FORECASTER_STATE_DIR (stateDir)"),
    ({"FORECASTER_PROMETHEUS_URL": "ftp://p"}, "FORECASTER_PROMETHEUS_URL (prometheus[0].url)"),
    ({"FORECASTER_API_TOKEN_FILE": "/nonexistent/token"},
     "FORECASTER_API_TOKEN_FILE (apiToken.file)"),
    ({"FORECASTER_METRICS_TOKEN_FILE": "/nonexistent/token"},
     "FORECASTER_METRICS_TOKEN_FILE (metricsToken.file)"),
    ({"FORECASTER_METRICS_TOKEN": " "}, "FORECASTER_METRICS_TOKEN (metricsToken.env)"),
    ({"FORECASTER_CONFIG": "/nonexistent/forecaster.yaml"}, "FORECASTER_CONFIG"),
]


@pytest.mark.parametrize(("env", "where"), BAD_ENVIRONMENT, ids=[w for _, w in BAD_ENVIRONMENT])
def test_a_bad_environment_value_names_the_variable_and_the_setting(
    env: dict[str, str], where: str
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        load_settings(env=env)
    assert caught.value.field == where
    assert str(caught.value).startswith(f"{where}: ")
    assert caught.value.reason


def test_the_server_a_variable_adds_is_named_after_the_file_s_servers(tmp_path: Path) -> None:
    path = _write(tmp_path / "config.yaml", {"prometheus": [{"url": "http://p:9090"}]})
    with pytest.raises(InvalidInputError) as caught:
        load_settings(path, env={"FORECASTER_PROMETHEUS_URL": "http://p:9090/"})
    assert caught.value.field == "FORECASTER_PROMETHEUS_URL (prometheus[1].url)"
    assert "already prometheus[0]" in caught.value.reason


def test_a_value_a_flag_replaced_is_not_blamed_on_its_variable(tmp_path: Path) -> None:
    """A flag wins over the variable, so an error in what the flag gave names the setting."""
    with pytest.raises(InvalidInputError) as caught:
        load_settings(env={"FORECASTER_STATE_DIR": "/var/lib/forecaster"},
                      overrides={"stateDir": " "})
    assert caught.value.field == "stateDir"
    # A bad file value under a good variable elsewhere names the file's key alone.
    path = _write(tmp_path / "config.yaml", {"httpPort": "abc"})
    with pytest.raises(InvalidInputError) as caught:
        load_settings(path, env={"FORECASTER_GRPC_PORT": "9000"})
    assert caught.value.field == "httpPort"


def test_setting_name_gives_the_variable_only_when_the_environment_set_it() -> None:
    assert setting_name("stateDir", {"FORECASTER_STATE_DIR": "/x"}) == \
        "FORECASTER_STATE_DIR (stateDir)"
    assert setting_name("stateDir", {}) == "stateDir"
    assert setting_name("host", {"FORECASTER_HOST": "x"}) == "host"  # no such variable is read


@pytest.mark.parametrize("text", ["1_0", "١٠", "10.0", "0x10", "", "1e3", "²"])
def test_a_whole_number_is_ascii_digits_only(text: str) -> None:
    """int() reads '1_0' as 10 and '١٠' (Arabic-Indic digits) as 10: neither is what a
    setting or a flag should take silently."""
    for key in ("httpPort", "maxTargets", "maxPointsPerTarget"):
        with pytest.raises(InvalidInputError, match="must be a whole number") as caught:
            load_settings(env={}, overrides={key: text})
        assert caught.value.field == key
    with pytest.raises(InvalidInputError, match="whole number"):
        whole_number(text, "n")


@pytest.mark.parametrize(("value", "number"), [("10", 10), (" 10\n", 10), ("-3", -3),
                                               ("+7", 7), (8080, 8080), ("007", 7)])
def test_a_whole_number_reads_signed_ascii_digits(value: object, number: int) -> None:
    assert whole_number(value, "n") == number


def _server(**extra: Any) -> dict[str, Any]:
    return {"prometheus": [{"url": "http://prometheus:9090", **extra}]}


def _target(**metadata: str | None) -> dict[str, Any]:
    given = {"serverAddress": "http://p:9090", "query": "up", "targetValue": "5", **metadata}
    return {"namespace": "shop", "name": "web",
            "metadata": {key: value for key, value in given.items() if value is not None}}


BAD_SETTINGS: list[tuple[dict[str, Any], str | None]] = [
    ({"grpcPort": "x"}, "grpcPort"),
    ({"grpcPort": 70000}, "grpcPort"),
    ({"httpPort": -1}, "httpPort"),
    ({"fitWorkers": 0}, "fitWorkers"),
    ({"refreshInterval": "soon"}, "refreshInterval"),
    ({"refreshInterval": "0s"}, "refreshInterval"),
    ({"refitInterval": "1.5h"}, "refitInterval"),
    ({"targetIdleTimeout": "-1m"}, "targetIdleTimeout"),
    ({"maxTargets": 0}, "maxTargets"),
    ({"maxTargets": "many"}, "maxTargets"),
    ({"targetMemoryBytes": "32MB"}, "targetMemoryBytes"),
    ({"targetMemoryBytes": "512Ki"}, "targetMemoryBytes"),  # below 1Mi
    ({"targetMemoryBytes": "65Gi"}, "targetMemoryBytes"),
    ({"targetMemoryBytes": True}, "targetMemoryBytes"),
    ({"grpcport": 1}, "grpcport"),  # unknown (misspelt) key
    ({"demo": "maybe"}, "demo"),
    ({"prometheus": {"url": "http://p:9090"}}, "prometheus"),
    ({"prometheus": ["http://p:9090"]}, "prometheus[0].url"),
    ({"prometheus": [{"bearerTokenEnv": "PROM_TOKEN"}]}, "prometheus[0].url"),
    (_server(url="prometheus:9090"), "prometheus[0].url"),
    (_server(url="ftp://prometheus"), "prometheus[0].url"),
    (_server(url="http://user:pw@prometheus:9090"), "prometheus[0].url"),
    (
        {"prometheus": [{"url": "http://p:9090"}, {"url": "http://q:9090"},
                        {"url": "http://p:9090/"}]},
        "prometheus[2].url",
    ),
    (_server(bearerTokenEnv="MISSING_TOKEN"), "prometheus[0].bearerTokenEnv"),
    (_server(bearerTokenFile="/nonexistent/token"), "prometheus[0].bearerTokenFile"),
    (_server(bearerTokenFile="{empty}"), "prometheus[0].bearerTokenFile"),
    (_server(bearerTokenEnv="PROM_TOKEN", bearerTokenFile="{token}"),
     "prometheus[0].bearerTokenFile"),
    (_server(basicAuth={"passwordFile": "{password}"}), "prometheus[0].basicAuth"),
    (_server(basicAuth={"username": "u"}), "prometheus[0].basicAuth"),
    (_server(basicAuth={"username": "u", "passwordFile": "/nonexistent"}),
     "prometheus[0].basicAuth.passwordFile"),
    (_server(basicAuth={"username": "u", "passwordEnv": "MISSING"}),
     "prometheus[0].basicAuth.passwordEnv"),
    (_server(basicAuth={"username": "u", "password": "inline"}),
     "prometheus[0].basicAuth.password"),
    (_server(bearerTokenFil="{token}"), "prometheus[0].bearerTokenFil"),  # a typo, not ignored
    (_server(headers=["X-Scope-OrgID"]), "prometheus[0].headers"),
    (_server(bearerTokenEnv="PROM_TOKEN", headers={"Authorization": "Bearer x"}),
     "prometheus[0].headers"),
    (_server(caFile="{ca}", insecureSkipVerify=True), "prometheus[0].insecureSkipVerify"),
    (_server(insecureSkipVerify="no"), "prometheus[0].insecureSkipVerify"),
    (_server(timeout="ten seconds"), "prometheus[0].timeout"),
    (_server(timeout="0s"), "prometheus[0].timeout"),
    (_server(retries="many"), "prometheus[0].retries"),
    ({"defaults": ["step=5m"]}, "defaults"),
    ({"targets": {"namespace": "shop"}}, "targets"),
    ({"targets": ["shop/web"]}, "targets[0]"),
    ({"targets": [{"namespace": "shop", "metadata": {}}]}, "targets[0].name"),
    ({"targets": [{"namespace": "shop", "name": "web"}]}, "targets[0].metadata"),
    ({"targets": [{"namespace": "shop", "name": "web", "metadata": "query: up"}]},
     "targets[0].metadata"),
    ({"targets": [{"namespace": "s", "name": "w", "metadata": {}, "replicas": 3}]},
     "targets[0].replicas"),
    ({"targets": [{"namespace": "", "name": "web", "metadata": {}}]}, "targets[0].namespace"),
    ({"targets": [_target(query=None)]}, "targets[0].metadata.query"),
    ({"targets": [_target(step="soon")]}, "targets[0].metadata.step"),
    ({"targets": [_target(model="prophet")]}, "targets[0].metadata.model"),
    ({"defaults": {"step": "soon"}, "targets": [_target()]}, "defaults.step"),
    ({"targets": [_target(step="10s", historyWindow="1d", startupSeconds="3600")]},
     "targets[0].metadata.startupSeconds"),  # over the memory budget
    ({"defaults": {"step": "10s", "historyWindow": "1d", "startupSeconds": "3600"},
      "targets": [_target()]}, "defaults.startupSeconds"),
    ({"targetMemoryBytes": "2Gi",
      "targets": [_target(step="10s", historyWindow="1d", startupSeconds="3600")]}, None),
    ({"defaults": {"step": "soon"}, "targets": [_target(step="5m")]}, None),  # the target wins
    ({"targets": [_target(startupSeconds="28800", model="holt_winters")]},
     "targets[0].metadata.startupSeconds"),
    ({"maxStartup": "8h", "targets": [_target(startupSeconds="28800", model="holt_winters")]},
     None),  # raised
    ({"defaults": {"outageHorizon": "12h"}, "targets": [_target()]}, "defaults.outageHorizon"),
    ({"maxOutageHorizon": "12h", "defaults": {"outageHorizon": "12h"}, "targets": [_target()]},
     None),
    ({"maxHistoryWindow": "730d", "maxPointsPerTarget": 1000000,
      "targets": [_target(step="1m", historyWindow="600d")]},
     "targets[0].metadata.historyWindow"),  # raised bounds, still held by the memory budget
    ({"prometheus": [{"url": "http://p:9090"}],
      "targets": [_target(serverAddress="http://elsewhere:9090")]},
     "targets[0].metadata.serverAddress"),
    ({"prometheus": [{"url": "http://p:9090"}], "targets": [_target(serverAddress="http://p:9090/")]},
     None),  # the same server, with a trailing slash
    ({"tls": {"certFile": "{cert}"}}, "tls"),
    ({"tls": {"certFile": "/nonexistent/tls.crt", "keyFile": "{key}"}}, "tls.certFile"),
    ({"tls": {"certFile": "{cert}", "keyFile": "{key}", "clientCAFile": "/nonexistent"}},
     "tls.clientCAFile"),
    ({"tls": {"certFile": "{cert}", "keyFile": "{key}", "clientCaFile": "{ca}"}},
     "tls.clientCaFile"),  # a typo that would silently turn mutual TLS off
    ({"apiToken": API_TOKEN}, "apiToken"),  # never inline
    ({"apiToken": {"env": "MISSING_API_TOKEN"}}, "apiToken.env"),
    ({"apiToken": {"file": "/nonexistent/api-token"}}, "apiToken.file"),
]


def _fill(value: Any, files: dict[str, Path]) -> Any:
    """Put the fixture's paths into "{name}" placeholders."""
    if isinstance(value, dict):
        return {key: _fill(item, files) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, files) for item in value]
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return str(files[value[1:-1]])
    return value


@pytest.mark.parametrize(("raw", "where"), BAD_SETTINGS, ids=[str(w) for _, w in BAD_SETTINGS])
def test_every_bad_setting_names_its_path(
    raw: dict[str, Any], where: str | None, files: dict[str, Path], tmp_path: Path
) -> None:
    path = _write(tmp_path / "config.yaml", _fill(raw, files))
    if where is None:  # a near miss that is fine
        load_settings(path, env=ENV)
        return
    with pytest.raises(InvalidInputError) as caught:
        load_settings(path, env=ENV)
    assert caught.value.field == where
    assert str(caught.value).startswith(f"{where}: ")
    assert caught.value.reason  # and says what is wrong
    for secret in SECRETS:
        assert secret not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (None, ["cannot read"]),
        ("grpcPort: [1,\n", ["not valid YAML"]),
        ("- grpcPort: 1\n", ["mapping"]),
    ],
)
def test_an_unusable_config_file_is_invalid_input(
    text: str | None, words: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(InvalidInputError) as caught:
        load_settings(path, env={})
    assert caught.value.field == "config"
    assert str(path) in str(caught.value)
    for word in words:
        assert word in str(caught.value)


def test_reprs_never_show_secrets(files: dict[str, Path], tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path / "config.yaml", _full(files)), env=ENV)
    texts = [repr(settings), str(settings), *(repr(server) for server in settings.servers)]
    for text in texts:
        for secret in SECRETS:
            assert secret not in text
    assert "***" in repr(settings)  # masked, not dropped: one can see a secret is set
    assert "mimir.example" in repr(settings)  # the useful parts stay
    assert "team-a" in repr(settings.servers[0])
