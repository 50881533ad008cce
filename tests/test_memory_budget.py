"""A trigger's memory estimate and the per-target budget: what the estimate follows, the one
key its refusal names, and that its windows are the models' own."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forecaster.errors import InvalidInputError
from forecaster.models import MODEL_FACTORIES, ets, gbm, mstl, naive
from forecaster.models.calibration import CALIBRATION_WINDOW
from forecaster.models.selection import VALIDATION
from forecaster.spec import (
    CALIBRATION_SECONDS,
    DEFAULT_TARGET_MEMORY_BYTES,
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
    TriggerSpec,
    check_memory,
    memory_estimate,
)

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
