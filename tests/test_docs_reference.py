"""docs/deploy.md against the code it describes: every FORECASTER_* variable the config reads,
every metric the service exports, every trigger key, config key and flag is in the guide, and
its reference tables name nothing the code lacks. The names come from the code itself (the
config's own lookups, the telemetry's registry, the spec's and the CLI's tables), so a
setting added without its documentation fails here."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from forecaster.cli import main
from forecaster.config import (
    API_KEYS,
    ENV_PREFIX,
    KNOWN_KEYS,
    SERVER_KEYS,
    EngineSettings,
    load_settings,
)
from forecaster.engine import Engine
from forecaster.spec import METADATA_KEYS
from forecaster.telemetry import Telemetry

ROOT = Path(__file__).parent.parent
GUIDE = ROOT / "docs" / "deploy.md"
SCALED_OBJECT = ROOT / "keda" / "scaledobject.yaml"
# How prometheus_client exposes a family's samples: a counter's as <name>_total, an info's as
# <name>_info; gauges and histograms under their own name (a histogram's with suffixes).
EXPOSED_SUFFIX = {"counter": "_total", "info": "_info"}


def _guide() -> str:
    return GUIDE.read_text(encoding="utf-8")


def _section(title: str) -> str:
    """The guide's text under the heading `title`, up to the next heading of any level."""
    text = _guide()
    found = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", text, re.M | re.S)
    assert found, f"docs/deploy.md has no section {title!r}"
    return found[1]


def _first_column(table_text: str) -> list[str]:
    """Each backticked name in the first column of the markdown table rows in `table_text`."""
    names = []
    for row in re.findall(r"^\| ([^|]*) \|", table_text, re.M):
        names += re.findall(r"`([^`]+)`", row)
    return names


class RecordingEnv(Mapping[str, str]):
    """An empty environment that records each variable name looked up in it."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _variables_read() -> set[str]:
    env = RecordingEnv()
    load_settings(None, env=env)
    return {name for name in env.asked if name.startswith(ENV_PREFIX)}


def _exported_metrics() -> set[str]:
    """Every metric family a service's registry exposes, by its exposed name."""
    registry = CollectorRegistry()
    telemetry = Telemetry(registry, process_metrics=False)
    engine = Engine(EngineSettings(fit_workers=1))
    try:
        telemetry.track(engine)
        return {family.name + EXPOSED_SUFFIX.get(family.type, "")
                for family in registry.collect()}
    finally:
        engine.stop()


def _flags(command: str, capsys: pytest.CaptureFixture[str]) -> set[str]:
    """The long options `forecaster <command> --help` lists."""
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return set(re.findall(r"(--[a-z][a-z-]+)", capsys.readouterr().out)) - {"--help"}


def test_the_config_reads_variables_and_the_guide_names_each() -> None:
    variables = _variables_read()
    # The recording sees the lookups: the ports, the bounds, the state, the tokens, the file.
    assert {"FORECASTER_CONFIG", "FORECASTER_STATE_DIR", "FORECASTER_PROMETHEUS_URL"} <= variables
    guide = _guide()
    missing = sorted(name for name in variables if f"`{name}`" not in guide)
    assert not missing, f"docs/deploy.md does not name {missing}"


def test_every_exported_metric_is_in_the_guides_metric_table() -> None:
    exported = _exported_metrics()
    assert {"forecaster_planned_load", "forecaster_requests_total",
            "forecaster_target_info"} <= exported
    listed = _first_column(_section("Every metric"))
    assert len(listed) == len(set(listed)), "a metric is listed twice"
    assert not exported - set(listed), f"not in the table: {sorted(exported - set(listed))}"
    assert not set(listed) - exported, f"not exported: {sorted(set(listed) - exported)}"


def test_every_trigger_key_has_a_row_in_the_guides_metadata_table() -> None:
    rows = set(_first_column(_section("4. Point a ScaledObject at forecaster")))
    missing = sorted(set(METADATA_KEYS) - rows)
    assert not missing, f"trigger keys with no row in section 4: {missing}"


def test_the_settings_tables_match_the_config_keys() -> None:
    section = _section("Every setting")
    settings_table, server_table = section.split("Each entry of `prometheus:`")
    keys = {key for key in _first_column(settings_table) if not key.startswith("-")}
    known = set(KNOWN_KEYS) - {"api"} | {f"api.{key}" for key in API_KEYS}
    assert keys == known, (f"missing: {sorted(known - keys)}, unknown: {sorted(keys - known)}")
    assert set(_first_column(server_table)) == set(SERVER_KEYS)


@pytest.mark.parametrize("command", ["serve", "backtest", "export"])
def test_every_flag_is_in_the_guide(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    flags = _flags(command, capsys)
    assert "--max-under-provisioned" in flags or command != "backtest"
    assert "--bearer-token-file" in flags or command != "export"
    guide = _guide()
    missing = sorted(flag for flag in flags if not re.search(rf"`{flag}\b", guide))
    assert not missing, f"{command} flags docs/deploy.md does not name: {missing}"


def test_the_guides_scaled_object_shows_the_shipped_trigger() -> None:
    """Section 4's snippet says it is keda/scaledobject.yaml: each metadata value it shows is
    the file's, and it shows every key the file sets."""
    section = _section("4. Point a ScaledObject at forecaster")
    snippet = re.search(r"```yaml\n(spec:.*?)```", section, re.S)
    assert snippet, "section 4 shows no ScaledObject spec"
    shown = yaml.safe_load(snippet[1])["spec"]["triggers"][0]["metadata"]
    shipped = yaml.safe_load(SCALED_OBJECT.read_text(encoding="utf-8"))["spec"]["triggers"][0]
    assert shown == shipped["metadata"]


# -- the operational sections' numbers, read from the code and the manifests ---------------

STATEFULSET = ROOT / "keda" / "forecaster" / "statefulset.yaml"
GEN_CERTS = ROOT / "keda" / "examples" / "tls" / "gen-certs.sh"


def _prose(title: str) -> str:
    """A section's text with its line breaks and indentation folded into single spaces."""
    return " ".join(_section(title).split())


def _pod_spec() -> dict[str, Any]:
    return yaml.safe_load(STATEFULSET.read_text(encoding="utf-8"))["spec"]["template"]["spec"]


def test_saved_state_names_the_stores_bounds_and_refusals() -> None:
    from forecaster.state import REFUSAL_REASONS, SHUTDOWN_SECONDS, file_stem

    text = _prose("Saved state")
    assert f"for at most {SHUTDOWN_SECONDS:g} s" in text
    assert len(file_stem("shop/web/load")) == 32 and "first 32 hex digits" in text
    assert "|".join(f'"{reason}"' for reason in REFUSAL_REASONS) in text
    grace = _pod_spec()["terminationGracePeriodSeconds"]
    assert f"`terminationGracePeriodSeconds: {grace}`" in text


def test_the_shutdown_fits_in_the_grace_period_the_guide_states() -> None:
    """The pod's grace period holds the preStop pause, the gRPC grace and the state's save."""
    import inspect

    from forecaster.scaler.bridge import ScalerBridge
    from forecaster.state import SHUTDOWN_SECONDS

    pod = _pod_spec()
    container = pod["containers"][0]
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grpc_grace = inspect.signature(ScalerBridge.stop).parameters["grace_seconds"].default
    assert pause + grpc_grace + SHUTDOWN_SECONDS < pod["terminationGracePeriodSeconds"]
    text = _prose("Saved state")
    assert (f"the {pause} s `preStop` pause, the gRPC front's {grpc_grace:g} s grace and these "
            f"{SHUTDOWN_SECONDS:g} s") in text
    replicas = _prose("Two replicas")
    assert f"pauses for {pause} s (`preStop: sleep`)" in replicas
    assert f"(up to {grpc_grace:g} s)" in replicas


def test_two_replicas_states_the_plan_half_life_and_the_rollout_pacing() -> None:
    from forecaster.spec import DEFAULT_PLAN_HALF_LIFE_SECONDS

    text = _prose("Two replicas")
    assert f"({DEFAULT_PLAN_HALF_LIFE_SECONDS // 60} minutes by default)" in text
    manifest = yaml.safe_load(STATEFULSET.read_text(encoding="utf-8"))["spec"]
    assert f"`minReadySeconds: {manifest['minReadySeconds']}`" in text
    storage = manifest["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    assert f"a {storage} volume" in text


def test_the_fallback_block_states_the_serving_bounds() -> None:
    from forecaster.config import EngineSettings, load_settings
    from forecaster.scaler.servicer import DEADLINE_MARGIN_SECONDS
    from forecaster.spec import (
        DEFAULT_OUTAGE_HORIZON_SECONDS,
        DEFAULT_TARGET_MEMORY_BYTES,
        MAX_TARGET_VALUE,
        MIN_TARGET_VALUE,
    )
    from forecaster.target import OUTAGE_MARGIN, OUTAGE_QUANTILE

    text = _prose("The fallback block")
    engine = EngineSettings()
    assert f"the default {engine.refresh_seconds:g} s refresh" in text
    assert f"`outageHorizon` ({DEFAULT_OUTAGE_HORIZON_SECONDS // 60}m by default" in text
    assert f"the {OUTAGE_QUANTILE} quantile" in text and f"e^{OUTAGE_MARGIN}" in text
    assert f"[{MIN_TARGET_VALUE}, {MAX_TARGET_VALUE:.0e}]".replace("e+", "e") in text
    assert f"ends {DEADLINE_MARGIN_SECONDS} s before it" in text
    assert f"`maxTargets` ({engine.max_targets:,} by default" in text
    assert f"({DEFAULT_TARGET_MEMORY_BYTES // 2**20}Mi by default" in text
    server = load_settings(None, env={"FORECASTER_PROMETHEUS_URL": "http://p:9090"}).servers[0]
    assert (f"`retries: {server.retries}` and `timeout: {server.timeout_seconds:g}s` by "
            "default") in text


def test_securing_the_http_side_states_the_api_bounds() -> None:
    from forecaster.api import adhoc, auth
    from forecaster.api.server import CONNECTION_LIMIT

    text = _prose("Securing the HTTP side")
    assert f"`{auth.SESSION_COOKIE}`" in text
    assert f"{auth.SESSION_SECONDS // 3600} hours" in text
    assert adhoc.SLOTS == 2 and "up to two worker processes" in text
    assert adhoc.IDLE_SECONDS == 60 and "after a minute without work" in text
    assert f"`Retry-After: {adhoc.BUSY_RETRY_AFTER_SECONDS}`" in text
    assert f"at {CONNECTION_LIMIT} open connections" in text
    assert all(f"`{path}`" in text for path in auth.OPEN_PATHS)


def test_mutual_tls_states_the_certificates_validity() -> None:
    days = re.search(r'days="\$\{DAYS:-(\d+)\}"', GEN_CERTS.read_text(encoding="utf-8"))
    assert days, "gen-certs.sh sets no default validity"
    assert f"valid for {days[1]} days" in _prose("Mutual TLS between KEDA and forecaster")
