"""KEDA trigger metadata parsing, and the duration helpers it uses."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forecaster.durations import format_duration, parse_duration
from forecaster.errors import InvalidInputError
from forecaster.spec import (
    LIMIT_CEILINGS,
    TriggerLimits,
    TriggerSpec,
    check_object_ref,
    default_metric_name,
    metric_spec,
    parse_trigger_metadata,
)

KNOWN_MODELS = ("seasonal_naive", "ets", "mstl")
SERVER = "http://prometheus.monitoring:9090"
QUERY = 'sum(rate(http_requests_total{service="web"}[2m]))'
REQUIRED = {"serverAddress": SERVER, "query": QUERY, "targetValue": "50"}


def parse(**overrides: str) -> tuple[TriggerSpec, list[str]]:
    return parse_trigger_metadata({**REQUIRED, **overrides}, known_models=KNOWN_MODELS)


def error_for(metadata: dict[str, str]) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as caught:
        parse_trigger_metadata(metadata, known_models=KNOWN_MODELS)
    return caught.value


# --- required keys -----------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(REQUIRED))
def test_each_required_key_missing_is_named(key: str) -> None:
    metadata = {k: v for k, v in REQUIRED.items() if k != key}
    error = error_for(metadata)
    assert error.field == key
    assert "is required" in error.reason


@pytest.mark.parametrize("key", sorted(REQUIRED))
@pytest.mark.parametrize("blank", ["", "   "])
def test_each_required_key_blank_is_rejected(key: str, blank: str) -> None:
    error = error_for({**REQUIRED, key: blank})
    assert error.field == key
    assert "is required" in error.reason


def test_missing_key_with_wrong_case_gets_a_hint() -> None:
    metadata = {"serverAddress": SERVER, "query": QUERY, "TargetValue": "50"}
    error = error_for(metadata)
    assert error.field == "targetValue"
    assert "'TargetValue'" in error.reason
    assert "case-sensitive" in error.reason


def test_non_string_value_is_rejected() -> None:
    error = error_for({**REQUIRED, "targetValue": 50})  # type: ignore[dict-item]
    assert error.field == "targetValue"
    assert "must be a string" in error.reason


# --- malformed fields --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("targetValue", "abc", "must be a finite decimal number"),
        ("targetValue", "1_000", "must be a finite decimal number"),
        ("targetValue", "nan", "must be a finite decimal number"),
        ("targetValue", "inf", "must be a finite decimal number"),
        ("targetValue", "1e999", "must be a finite decimal number"),
        ("targetValue", "0", "must be > 0"),
        ("targetValue", "-5", "must be > 0"),
        ("startupSeconds", "abc", "whole number of seconds"),
        ("startupSeconds", "5m", "whole number of seconds"),
        ("startupSeconds", "300s", "whole number of seconds"),
        ("startupSeconds", "1.5", "whole number of seconds"),
        ("startupSeconds", "-1", "must be >= 0"),
        ("quantile", "0.4", "must be in [0.5, 1)"),
        ("quantile", "1.0", "must be in [0.5, 1)"),
        ("quantile", "1", "must be in [0.5, 1)"),
        ("quantile", "abc", "must be a finite decimal number"),
        ("historyWindow", "two weeks", "must be a duration"),
        ("historyWindow", "14 d", "must be a duration"),
        ("historyWindow", "1.5d", "must be a duration"),
        ("historyWindow", "-14d", "must be a duration"),
        ("historyWindow", "0", "must be at least 1s"),
        ("step", "5min", "must be a duration"),
        ("step", "1h30m", "must be a duration"),
        ("step", "0s", "must be from '10s' to '1h'"),
        ("activationValue", "-1", "must be >= 0"),
        ("activationValue", "x", "must be a finite decimal number"),
        ("timeZone", "Mars/Phobos", "IANA time zone"),
        ("timeZone", "utc", "IANA time zone"),
        ("timeZone", "../etc/passwd", "IANA time zone"),
        ("timeZone", "/etc/localtime", "IANA time zone"),
        ("metricName", "my metric", "letters, digits"),
        ("metricName", "a.b", "letters, digits"),
        ("metricName", "a/b", "letters, digits"),
        ("serverAddress", "prometheus:9090", "http(s)://host[:port][/path]"),
        ("serverAddress", "ftp://prometheus:9090", "http(s)://host[:port][/path]"),
        ("serverAddress", "http://", "http(s)://host[:port][/path]"),
        ("serverAddress", "http://prometheus:99999", "http(s)://host[:port][/path]"),
        ("serverAddress", "http://prometheus:0", "http(s)://host[:port][/path]"),
        ("serverAddress", "http://prometheus:port", "http(s)://host[:port][/path]"),
        ("serverAddress", "http://[::1", "http(s)://host[:port][/path]"),
        ("serverAddress", "http://prometheus:9090/?x=1", "no query, fragment or spaces"),
        ("serverAddress", "http://prometheus:9090/#top", "no query, fragment or spaces"),
        ("serverAddress", "http://prom etheus:9090", "no query, fragment or spaces"),
    ],
)
def test_malformed_field_names_key_and_quotes_value(key: str, value: str, expected: str) -> None:
    error = error_for({**REQUIRED, key: value})
    assert error.field == key
    assert expected in error.reason
    assert repr(value) in error.reason
    assert str(error) == f"{key}: {error.reason}"


def test_unknown_model_lists_the_accepted_ones() -> None:
    error = error_for({**REQUIRED, "model": "prophet"})
    assert error.field == "model"
    assert "'prophet'" in error.reason
    for name in ("auto", *KNOWN_MODELS):
        assert name in error.reason


@pytest.mark.parametrize("model", ["auto", *KNOWN_MODELS])
def test_known_models_and_auto_are_accepted(model: str) -> None:
    spec, _ = parse(model=model)
    assert spec.model == model


def test_history_must_hold_ten_steps() -> None:
    error = error_for({**REQUIRED, "historyWindow": "1h", "step": "10m"})
    assert error.field == "historyWindow"
    assert "'1h'" in error.reason
    assert "'10m'" in error.reason
    assert "'100m'" in error.reason
    spec, _ = parse(historyWindow="100m", step="10m")
    assert spec.history_window_seconds == 6000


def test_step_larger_than_the_history_allows_is_reported() -> None:
    error = error_for({**REQUIRED, "step": "1h", "historyWindow": "9h"})
    assert error.field == "historyWindow"
    assert "'10h'" in error.reason


def test_credentials_in_server_address_are_never_echoed() -> None:
    for address in ("http://admin:s3cret@prometheus:9090", "ftp://admin:s3cret@prometheus"):
        error = error_for({**REQUIRED, "serverAddress": address})
        assert error.field == "serverAddress"
        assert "s3cret" not in str(error)
        assert "***@" in error.reason
    # Where credentials go instead: KEDA gives an external scaler none of its own.
    error = error_for({**REQUIRED, "serverAddress": "http://admin:s3cret@prometheus:9090"})
    assert "prometheus: bearerTokenFile or basicAuth" in error.reason


def test_long_values_are_length_capped_in_errors() -> None:
    error = error_for({**REQUIRED, "targetValue": "x" * 10_000})
    assert len(str(error)) < 300


# --- keys that are not ours --------------------------------------------------------------


def test_keda_keys_are_ignored_and_unknown_keys_returned_sorted() -> None:
    spec, unknown = parse(
        scalerAddress="forecaster.autoscaling:9090",
        enableTLS="true",
        unsafeSsl="false",
        tokenFromEnv="TOKEN",
        zeta="1",
        alpha="2",
        Quantile="0.95",
    )
    assert unknown == ["Quantile", "alpha", "zeta"]
    assert spec.quantile == 0.9


def test_from_env_keys_are_read_as_their_key() -> None:
    # KEDA resolves xFromEnv from the workload's environment and sends the value under xFromEnv.
    metadata = {**REQUIRED}
    del metadata["query"], metadata["targetValue"]
    spec, unknown = parse_trigger_metadata(
        {**metadata, "queryFromEnv": "sum(rate(x[1m]))", "targetValueFromEnv": "12.5"},
        known_models=KNOWN_MODELS,
    )
    assert (spec.query, spec.target_value, unknown) == ("sum(rate(x[1m]))", 12.5, [])


def test_a_key_and_its_from_env_twin_together_name_both() -> None:
    error = error_for({**REQUIRED, "queryFromEnv": "up"})
    assert error.field == "queryFromEnv"
    assert "'query'" in error.reason and "both set" in error.reason


def test_no_unknown_keys_gives_an_empty_list() -> None:
    _, unknown = parse()
    assert unknown == []


# --- defaults and values -----------------------------------------------------------------


def test_defaults() -> None:
    spec, _ = parse()
    assert spec == TriggerSpec(
        server_address=SERVER,
        query=QUERY,
        target_value=50.0,
        startup_seconds=300,
        quantile=0.9,
        history_window_seconds=14 * 86_400,
        step_seconds=300,
        model="auto",
        activation_value=0.0,
        metric_name=default_metric_name(SERVER, QUERY),
        time_zone="UTC",
    )


def test_every_optional_key_is_read() -> None:
    spec, unknown = parse(
        startupSeconds="120",
        quantile="0.95",
        historyWindow="36h",
        step="1m",
        model="ets",
        activationValue="0.5",
        metricName="web_rps-forecast",
        timeZone="Europe/Paris",
    )
    assert unknown == []
    assert (spec.startup_seconds, spec.quantile) == (120, 0.95)
    assert (spec.history_window_seconds, spec.step_seconds) == (36 * 3600, 60)
    assert (spec.model, spec.activation_value) == ("ets", 0.5)
    assert (spec.metric_name, spec.time_zone) == ("web_rps-forecast", "Europe/Paris")
    assert spec.effective_metric_name == "web_rps-forecast"


def test_values_are_stripped_and_address_canonical() -> None:
    spec, _ = parse(serverAddress=f"  {SERVER}/ ", query=f"\n{QUERY}\n", targetValue=" 2.5 ")
    assert spec.server_address == SERVER
    assert spec.query == QUERY
    assert spec.target_value == 2.5
    assert spec.metric_name == default_metric_name(SERVER, QUERY)


def test_address_with_path_and_https_is_kept() -> None:
    spec, _ = parse(serverAddress="https://thanos.example.com:443/prometheus/")
    assert spec.server_address == "https://thanos.example.com:443/prometheus"


def test_zero_values_allowed_where_documented() -> None:
    spec, _ = parse(startupSeconds="0", activationValue="0", quantile="0.5")
    assert (spec.startup_seconds, spec.activation_value, spec.quantile) == (0, 0.0, 0.5)


def test_default_metric_name_is_stable_and_short() -> None:
    name = default_metric_name(SERVER, QUERY)
    assert re.fullmatch(r"fc-[0-9a-f]{12}", name)
    assert len(name) == 15
    # A fixed value: the name must survive restarts and releases, or KEDA's HPA loses its metric.
    assert default_metric_name("http://prometheus:9090", "up") == "fc-8a2ffca1845a"
    assert default_metric_name(SERVER, QUERY) == name
    assert default_metric_name(SERVER, QUERY + " ") != name
    assert default_metric_name(SERVER + "/x", QUERY) != name


def test_spec_without_metric_name_falls_back_to_default() -> None:
    spec = TriggerSpec(server_address=SERVER, query=QUERY, target_value=1.0)
    assert spec.effective_metric_name == default_metric_name(SERVER, QUERY)


# --- durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("36h", 129_600),
        ("14d", 1_209_600),
        ("1w", 604_800),
        ("300", 300),
        ("0", 0),
        (" 90m ", 5400),
    ],
)
def test_parse_duration_accepted_forms(text: str, seconds: int) -> None:
    assert parse_duration(text, "step") == seconds


@pytest.mark.parametrize(
    "text", ["", "5M", "1.5h", "-5m", "5 m", "1h30m", "1y", "PT5M", "9" * 13, "五m"]
)
def test_parse_duration_rejects_other_forms(text: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_duration(text, "step")
    assert caught.value.field == "step"
    assert "'30s', '5m', '1h', '14d', '1w'" in caught.value.reason
    assert f"got {text!r}"[:20] in caught.value.reason


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (1, "1s"),
        (59, "59s"),
        (60, "1m"),
        (5400, "90m"),
        (86_400, "1d"),
        (1_209_600, "2w"),
    ],
)
def test_format_duration_uses_the_largest_exact_unit(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_format_duration_rejects_non_whole_or_negative(bad: object) -> None:
    with pytest.raises(ValueError, match="whole number >= 0"):
        format_duration(bad)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=10**11))
def test_duration_round_trip(seconds: int) -> None:
    text = format_duration(seconds)
    assert parse_duration(text, "step") == seconds
    assert format_duration(parse_duration(text, "step")) == text


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from("smhdw"))
def test_duration_canonical_form_parses_to_the_same_seconds(number: int, unit: str) -> None:
    seconds = parse_duration(f"{number}{unit}", "step")
    assert parse_duration(format_duration(seconds), "step") == seconds


# --- the metric spec from the metadata alone ---------------------------------------------


def test_the_default_name_is_todays_hash_while_every_setting_is_at_its_default() -> None:
    spelled_out = {**REQUIRED, "step": "5m", "startupSeconds": "300", "model": "auto",
                   "quantile": "0.9", "historyWindow": "2w", "scalerAddress": "x:1"}
    for metadata in (REQUIRED, spelled_out):
        assert metric_spec(metadata).metric_name == default_metric_name(SERVER, QUERY)
        spec, _ = parse_trigger_metadata(metadata, known_models=KNOWN_MODELS)
        assert spec.metric_name == default_metric_name(SERVER, QUERY)


@pytest.mark.parametrize(
    ("key", "value"),
    [("step", "1m"), ("startupSeconds", "600"), ("model", "ets"), ("quantile", "0.95"),
     ("timeZone", "Europe/Paris"), ("excludeFromTraining", "2026-11-20T10:00Z/2026-11-20T11:00Z")],
)
def test_each_setting_that_differs_from_its_default_names_another_metric(
    key: str, value: str
) -> None:
    differing = {**REQUIRED, key: value}
    name = metric_spec(differing).metric_name
    assert name != default_metric_name(SERVER, QUERY)
    spec, _ = parse_trigger_metadata(differing, known_models=KNOWN_MODELS)
    assert spec.metric_name == name  # the front and the engine name it alike
    # against the config's defaults instead: the same value there is no difference
    assert metric_spec(REQUIRED, {key: value}).metric_name == metric_spec(differing, {key: value}) \
        .metric_name == default_metric_name(SERVER, QUERY)


def test_the_metric_spec_needs_only_a_readable_target_value() -> None:
    broken = {"targetValue": "20", "quantile": "2", "step": "soon", "metricName": "bad name!"}
    spec = metric_spec(broken)
    assert spec.target_value == 20.0 and spec.metric_name.startswith("fc-")
    assert metric_spec(broken) == spec  # stable, so GetMetrics can check the name it gets
    for metadata, words in (
        ({**REQUIRED, "targetValue": ""}, "is required"),
        ({"query": QUERY}, "is required"),
        ({**REQUIRED, "targetValue": "lots"}, "finite decimal"),
        ({**REQUIRED, "targetValue": "0.0005"}, "at least 0.001"),
        ({**REQUIRED, "targetValue": "1e16"}, "at most 1e+15"),
    ):
        with pytest.raises(InvalidInputError) as caught:
            metric_spec(metadata)
        assert caught.value.field == "targetValue" and words in caught.value.reason
    assert metric_spec({**REQUIRED, "targetValue": "0.001"}).target_value == 0.001


# --- bounds: each error names the key and the bound ---------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        ({"startupSeconds": "21601"}, "startupSeconds",
         "at most 21600 (6h, the maxStartup setting)"),
        ({"historyWindow": "91d"}, "historyWindow", "at most '90d' (the maxHistoryWindow setting)"),
        ({"historyWindow": "999999999999w"}, "historyWindow", "at most '90d'"),
        ({"step": "9s"}, "step", "from '10s' to '1h'"),
        ({"step": "2h"}, "step", "from '10s' to '1h'"),
        ({"historyWindow": "60d", "step": "10s"}, "historyWindow",
         "at most 50,000 steps (the maxPointsPerTarget setting)"),
        ({"outageHorizon": "7h"}, "outageHorizon", "at most '6h' (the maxOutageHorizon setting)"),
        ({"query": "x" * 8193}, "query", "at most 8192 bytes (the maxQueryBytes setting)"),
        ({"metricName": "m" * 129}, "metricName", "at most 128 characters"),
        ({"timeZone": "x" * 9000}, "timeZone", "IANA time zone"),
    ],
)
def test_each_bound_is_named_in_its_error(
    overrides: dict[str, str], key: str, words: str
) -> None:
    error = error_for({**REQUIRED, **overrides})
    assert error.field == key
    assert words in error.reason
    assert len(str(error)) < 300  # a short prefix of the value, never all of it


def test_the_bounds_themselves_are_accepted() -> None:
    spec, _ = parse(startupSeconds="21600", historyWindow="90d", step="1h", query="x" * 8192,
                    metricName="m" * 128)
    assert (spec.startup_seconds, spec.history_window_seconds) == (21_600, 90 * 86_400)
    spec, _ = parse(step="10s", historyWindow=f"{50_000 * 10}s")
    assert spec.step_seconds == 10


# Each raisable bound: a trigger just over its default, the limits raised to let it through,
# and what the raised bound's error says just past it.
RAISED = [
    ({"startupSeconds": "21601"}, TriggerLimits(max_startup_seconds=8 * 3_600),
     {"startupSeconds": "28801"}, "startupSeconds", "at most 28800 (8h, the maxStartup setting)"),
    ({"outageHorizon": "7h"}, TriggerLimits(max_outage_horizon_seconds=12 * 3_600),
     {"outageHorizon": "13h"}, "outageHorizon", "at most '12h' (the maxOutageHorizon setting)"),
    ({"historyWindow": "91d", "step": "1h"}, TriggerLimits(max_history_seconds=400 * 86_400),
     {"historyWindow": "401d", "step": "1h"}, "historyWindow",
     "at most '400d' (the maxHistoryWindow setting)"),
    ({"historyWindow": f"{50_001 * 60}s", "step": "1m"}, TriggerLimits(max_points=60_000),
     {"historyWindow": f"{60_001 * 60}s", "step": "1m"}, "historyWindow",
     "at most 60,000 steps (the maxPointsPerTarget setting)"),
    ({"query": "x" * 8193}, TriggerLimits(max_query_bytes=16 * 1_024),
     {"query": "x" * (16 * 1_024 + 1)}, "query", "at most 16384 bytes (the maxQueryBytes setting)"),
]


@pytest.mark.parametrize(("over", "limits", "beyond", "key", "words"), RAISED,
                         ids=[case[3] + "-" + str(i) for i, case in enumerate(RAISED)])
def test_a_raised_bound_lets_the_trigger_through_and_names_itself_past_it(
    over: dict[str, str], limits: TriggerLimits, beyond: dict[str, str], key: str, words: str
) -> None:
    assert error_for({**REQUIRED, **over}).field == key  # over the default bound
    spec, _ = parse_trigger_metadata({**REQUIRED, **over}, known_models=KNOWN_MODELS,
                                     limits=limits)
    assert spec == parse_trigger_metadata({**REQUIRED, **over}, known_models=KNOWN_MODELS,
                                          limits=LIMIT_CEILINGS)[0]
    with pytest.raises(InvalidInputError) as caught:
        parse_trigger_metadata({**REQUIRED, **beyond}, known_models=KNOWN_MODELS, limits=limits)
    assert caught.value.field == key and words in caught.value.reason


@pytest.mark.parametrize(("key", "one", "other"), [
    ("startupSeconds", "21601", "021601"), ("outageHorizon", "7h", "420m"),
    ("historyWindow", "91d", "13w"),
])
def test_a_value_over_a_default_bound_names_one_metric_in_any_spelling(
    key: str, one: str, other: str
) -> None:
    names = {metric_spec({**REQUIRED, key: value}).metric_name for value in (one, other)}
    assert len(names) == 1  # GetMetricSpec's name, whatever the config's limits
    spec, _ = parse_trigger_metadata({**REQUIRED, key: other}, known_models=KNOWN_MODELS,
                                     limits=LIMIT_CEILINGS)
    assert names == {spec.metric_name}


@pytest.mark.parametrize(
    ("namespace", "name", "key"),
    [
        ("", "web", "scaledObjectRef.namespace"),
        ("Shop", "web", "scaledObjectRef.namespace"),
        ("s" * 64, "web", "scaledObjectRef.namespace"),
        ("shop", "", "scaledObjectRef.name"),
        ("shop", "web\nforged log line", "scaledObjectRef.name"),
        ("shop", "w" * 254, "scaledObjectRef.name"),
    ],
)
def test_object_refs_are_kubernetes_names(namespace: str, name: str, key: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        check_object_ref(namespace, name)
    assert caught.value.field == key
    assert "\n" not in str(caught.value).replace("\\n", "")
    check_object_ref("shop", "web.v2-canary")


# --- maxUnderProvisioned against quantile ------------------------------------------------


def test_the_share_is_held_by_default_and_a_quantile_fixes_the_level() -> None:
    assert parse()[0].max_under_provisioned == 0.05
    assert parse(maxUnderProvisioned="0.01")[0].max_under_provisioned == 0.01
    fixed, _ = parse(quantile="0.95")
    assert (fixed.max_under_provisioned, fixed.quantile) == (None, 0.95)
    assert parse(scaleDownStabilization="10m")[0].scale_down_stabilization_seconds == 600


def test_a_triggers_explicit_key_beats_the_other_from_the_defaults() -> None:
    def spec(metadata: dict[str, str], defaults: dict[str, str]) -> TriggerSpec:
        return parse_trigger_metadata({**REQUIRED, **metadata}, known_models=KNOWN_MODELS,
                                      defaults=defaults)[0]

    assert spec({"quantile": "0.8"}, {"maxUnderProvisioned": "0.1"}).max_under_provisioned is None
    held = spec({"maxUnderProvisioned": "0.02"}, {"quantile": "0.8"})
    assert (held.max_under_provisioned, held.quantile) == (0.02, 0.9)
    assert spec({}, {"quantile": "0.8"}).max_under_provisioned is None
    assert spec({}, {"maxUnderProvisioned": "0.2"}).max_under_provisioned == 0.2


@pytest.mark.parametrize(
    ("metadata", "defaults"),
    [({"quantile": "0.9", "maxUnderProvisioned": "0.05"}, {}),
     ({}, {"quantile": "0.9", "maxUnderProvisioned": "0.05"})],
)
def test_both_keys_in_one_place_are_refused_naming_both(
    metadata: dict[str, str], defaults: dict[str, str]
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_trigger_metadata({**REQUIRED, **metadata}, known_models=KNOWN_MODELS,
                               defaults=defaults)
    assert caught.value.field == "maxUnderProvisioned" and "'quantile'" in caught.value.reason


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [("maxUnderProvisioned", "0.5", "(0, 0.5)"), ("maxUnderProvisioned", "0", "(0, 0.5)"),
     ("maxUnderProvisioned", "lots", "finite decimal"),
     ("scaleDownStabilization", "2h", "at most '1h'")],
)
def test_share_and_stabilization_bounds(key: str, value: str, words: str) -> None:
    error = error_for({**REQUIRED, key: value})
    assert error.field == key and words in error.reason
