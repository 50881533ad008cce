"""A trigger's memory estimate and the per-target budget: what the estimate follows, the one
key its refusal names, that its windows are the models' own, and that it still holds a trigger
once the operator raises the bounds on its metadata (a real service, over real gRPC)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from forecaster.errors import InvalidInputError
from forecaster.models import MODEL_FACTORIES, ets, gbm, mstl, naive
from forecaster.models.calibration import CALIBRATION_WINDOW
from forecaster.models.selection import VALIDATION
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.service import Service
from forecaster.spec import (
    CALIBRATION_SECONDS,
    DEFAULT_TARGET_MEMORY_BYTES,
    LIMIT_CEILINGS,
    MAX_HISTORY_SECONDS,
    MAX_OUTAGE_HORIZON_SECONDS,
    MAX_POINTS,
    MAX_STARTUP_SECONDS,
    MAX_STEP_SECONDS,
    MEMORY_HEAVY_MODELS,
    MIN_STEP_SECONDS,
    MIN_STEPS_IN_HISTORY,
    RESIDUAL_SAMPLES,
    RESIDUAL_SECONDS,
    VALIDATION_SECONDS,
    TriggerLimits,
    TriggerSpec,
    check_memory,
    memory_estimate,
)
from tests.support.prometheus import PrometheusServer
from tests.support.rest import make_blocks
from tests.support.scaler import refusals, scaled_object_ref, scaler_settings

MIB = 2**20
DEFAULT = TriggerSpec(server_address="http://p:9090", query="up", target_value=10.0)


def test_the_default_trigger_is_well_within_the_default_budget() -> None:
    assert memory_estimate(DEFAULT).total < DEFAULT_TARGET_MEMORY_BYTES / 2
    assert check_memory(DEFAULT, DEFAULT_TARGET_MEMORY_BYTES) == memory_estimate(DEFAULT)


def test_the_estimates_windows_are_the_models() -> None:
    assert CALIBRATION_WINDOW.total_seconds() == CALIBRATION_SECONDS
    assert VALIDATION.total_seconds() == VALIDATION_SECONDS
    for model in (ets, mstl, naive):
        assert model.RESIDUAL_WINDOW.total_seconds() == RESIDUAL_SECONDS
    assert gbm.RESIDUALS == RESIDUAL_SAMPLES


# Models measured to hold less than `auto` at every size: a fit of one model, no scores kept
# per forecast step, no candidates validated (bench/README.md, "Target memory").
LIGHT_MODELS = {"naive", "seasonal_naive", "holt_winters", "holt_winters_damped",
                "holt_winters_sqrt", "mstl", "mstl_sqrt"}


def test_every_model_is_counted_in_full_or_as_measured_light() -> None:
    assert set(MODEL_FACTORIES) == set(MEMORY_HEAVY_MODELS) | LIGHT_MODELS


@st.composite
def specs(draw: st.DrawFn) -> TriggerSpec:
    step = draw(st.integers(MIN_STEP_SECONDS, MAX_STEP_SECONDS))
    history = draw(st.integers(MIN_STEPS_IN_HISTORY * step,
                               min(MAX_POINTS * step, MAX_HISTORY_SECONDS)))
    return replace(
        DEFAULT, step_seconds=step, history_window_seconds=history,
        startup_seconds=draw(st.integers(0, MAX_STARTUP_SECONDS)),
        outage_horizon_seconds=draw(st.integers(0, MAX_OUTAGE_HORIZON_SECONDS)),
    )


@given(specs(), st.sampled_from(["history_window_seconds", "startup_seconds",
                                 "outage_horizon_seconds"]), st.integers(1, 86_400))
def test_more_of_any_key_it_names_never_lowers_the_estimate(
    spec: TriggerSpec, field: str, more: int
) -> None:
    larger = replace(spec, **{field: getattr(spec, field) + more})
    assert memory_estimate(larger).total >= memory_estimate(spec).total


@given(specs(), st.sampled_from(sorted(LIGHT_MODELS)))
def test_a_single_model_is_never_estimated_above_auto(spec: TriggerSpec, model: str) -> None:
    assert memory_estimate(replace(spec, model=model)).total <= memory_estimate(spec).total


@given(specs(), st.integers(1, 600))
def test_a_coarser_step_never_raises_the_estimate(spec: TriggerSpec, more: int) -> None:
    coarser = replace(spec, step_seconds=min(MAX_STEP_SECONDS, spec.step_seconds + more))
    assert memory_estimate(coarser).total <= memory_estimate(spec).total


@pytest.mark.parametrize(("changes", "key", "count"), [
    ({"step_seconds": 10, "startup_seconds": 3_600, "history_window_seconds": 86_400},
     "startupSeconds", "361 forecast steps of 25,920 error samples each"),
    ({"step_seconds": 10, "startup_seconds": 0, "outage_horizon_seconds": 6 * 3_600,
      "history_window_seconds": 86_400}, "outageHorizon", "an outage forecast of 2,163 steps"),
    ({"step_seconds": 60, "startup_seconds": 0, "outage_horizon_seconds": 0,
      "history_window_seconds": MAX_POINTS * 60}, "historyWindow", "50,000 history points"),
])
def test_over_the_budget_names_the_key_to_lower_the_estimate_and_the_budget(
    changes: dict[str, int], key: str, count: str
) -> None:
    spec = replace(DEFAULT, **changes)
    budget = memory_estimate(spec).total - 1
    with pytest.raises(InvalidInputError) as caught:
        check_memory(spec, budget)
    assert caught.value.field == key
    reason = caught.value.reason
    estimate = f"about {memory_estimate(spec).total / MIB:,.0f} MiB"
    assert estimate in reason and f"{budget / MIB:,.0f} MiB a target may hold" in reason
    assert "(targetMemoryBytes)" in reason and count in reason
    assert "historyWindow, step, startupSeconds, outageHorizon and model drive it" in reason
    assert f"lower {key} (now " in reason and "or raise step (now " in reason
    assert reason.endswith("or name one model such as 'holt_winters' (now 'auto')")
    assert check_memory(spec, budget + 1).total == budget + 1  # at the budget: accepted


def test_the_largest_triggers_the_bounds_allow_are_left_to_the_estimate() -> None:
    largest = replace(DEFAULT, step_seconds=MIN_STEP_SECONDS, startup_seconds=MAX_STARTUP_SECONDS,
                      outage_horizon_seconds=MAX_OUTAGE_HORIZON_SECONDS,
                      history_window_seconds=MAX_POINTS * MIN_STEP_SECONDS)
    with pytest.raises(InvalidInputError) as caught:
        check_memory(largest, DEFAULT_TARGET_MEMORY_BYTES)
    assert caught.value.field == "startupSeconds"


def test_the_largest_triggers_the_raised_bounds_allow_are_left_to_the_estimate() -> None:
    ceiling = LIMIT_CEILINGS
    largest = replace(DEFAULT, step_seconds=MIN_STEP_SECONDS,
                      startup_seconds=ceiling.max_startup_seconds,
                      outage_horizon_seconds=ceiling.max_outage_horizon_seconds,
                      history_window_seconds=ceiling.max_points * MIN_STEP_SECONDS)
    for model in ("auto", "holt_winters"):
        with pytest.raises(InvalidInputError) as caught:
            check_memory(replace(largest, model=model), DEFAULT_TARGET_MEMORY_BYTES)
        assert "(targetMemoryBytes)" in caught.value.reason


# --- the bounds in a running service ---------------------------------------------------------

# Each over a default bound: 8h of start-up (6h), and 100 days at 10 s (90 days, 50,000 points).
OVER_STARTUP = {"startupSeconds": "28800", "historyWindow": "1d"}
OVER_HISTORY = {"step": "10s", "historyWindow": "100d", "outageHorizon": "0"}
RAISED = TriggerLimits(max_startup_seconds=8 * 3_600, max_history_seconds=100 * 86_400,
                       max_points=864_000)


@pytest.fixture(scope="module")
def live_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    root = tmp_path_factory.mktemp("budget")
    with PrometheusServer(blocks_dir=make_blocks(root), workdir=root / "prom") as server:
        yield server


@pytest.fixture
def serve(
    live_prometheus: PrometheusServer,
) -> Iterator[Callable[[TriggerLimits], tuple[Service, pb_grpc.ExternalScalerStub]]]:
    started: list[tuple[Service, grpc.Channel]] = []

    def start(limits: TriggerLimits) -> tuple[Service, pb_grpc.ExternalScalerStub]:
        settings = scaler_settings(live_prometheus.url)
        settings = replace(settings, engine=replace(settings.engine, trigger_limits=limits))
        service = Service(settings, fit_pool=ThreadPoolExecutor(1))
        service.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}")
        started.append((service, channel))
        return service, pb_grpc.ExternalScalerStub(channel)

    yield start
    for service, channel in started:
        channel.close()
        service.stop()


def _refused_with(
    stub: pb_grpc.ExternalScalerStub, ref: pb.ScaledObjectRef, start: str
) -> list[str]:
    """GetMetricSpec served, then GetMetrics and IsActive refused: their details, each
    checked to be INVALID_ARGUMENT beginning with `start`."""
    name = stub.GetMetricSpec(ref, timeout=10).metricSpecs[0].metricName
    details = []
    for error in refusals(stub, ref, name):
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert error.details().startswith(start), error.details()
        details.append(error.details())
    return details


def test_with_the_default_limits_a_trigger_over_a_bound_is_refused_naming_key_and_bound(
    serve: Callable[[TriggerLimits], tuple[Service, pb_grpc.ExternalScalerStub]],
    live_prometheus: PrometheusServer,
) -> None:
    service, stub = serve(TriggerLimits())
    _refused_with(stub, scaled_object_ref(live_prometheus.url, **OVER_STARTUP),
                  "startupSeconds: must be at most 21600 (6h, the maxStartup setting): ")
    _refused_with(stub, scaled_object_ref(live_prometheus.url, **OVER_HISTORY),
                  "historyWindow: must be at most '90d' (the maxHistoryWindow setting); ")
    assert len(service.engine) == 0


def test_with_the_limits_raised_the_trigger_is_served_and_the_budget_still_holds(
    serve: Callable[[TriggerLimits], tuple[Service, pb_grpc.ExternalScalerStub]],
    live_prometheus: PrometheusServer,
) -> None:
    service, stub = serve(RAISED)
    ref = scaled_object_ref(live_prometheus.url, **OVER_STARTUP)
    name = stub.GetMetricSpec(ref, timeout=10).metricSpecs[0].metricName
    response = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName=name),
                               timeout=15)
    (value,) = response.metricValues
    assert value.metricName == name and value.metricValueFloat > 0
    (target,) = service.engine.targets()
    assert target.spec.startup_seconds == 8 * 3_600
    # Within every raised bound, and held by targetMemoryBytes with its own message.
    (details, _) = _refused_with(stub, scaled_object_ref(live_prometheus.url, **OVER_HISTORY),
                                 "historyWindow: this trigger would hold about ")
    assert "over the 32 MiB a target may hold (targetMemoryBytes)" in details
    assert "864,000 history points" in details
    assert len(service.engine) == 1
