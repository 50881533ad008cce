"""The scaling policy: HPA arithmetic against a reference written from Kubernetes' own rules.

What hpa_step does, precisely. With desired replicas r (None before the first value), a
metric value v and a target T:
  1. NaN: nothing changes (the state, its window included, is returned as is).
  2. recommendation = r if r > 0 and |v / (r·T) - 1| <= tolerance, else max(1, ceil(v / T)).
  3. The window keeps the last `stabilization_steps` recommendations, this one included.
  4. As in the HPA controller's stabilizeRecommendationWithBehaviors, with no scale-up window:
     up = the recommendation, down = the highest recommendation in the window;
     r' = up if r < up, down if r > down, else r (and the recommendation if r is None).
  5. r' is clamped to [min_replicas, max_replicas].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from forecaster.errors import InvalidInputError
from forecaster.policy import (
    HpaState,
    ScalingPolicy,
    hpa_replay,
    hpa_step,
    oracle_replicas,
    planned_load,
    recommend,
)

NAN = float("nan")


@dataclass
class Reference:
    """Kubernetes' HPA rules in exact arithmetic; `ambiguous` marks a value that lands exactly
    on the tolerance boundary, where float rounding (here as in Kubernetes) decides."""

    policy: ScalingPolicy
    replicas: int | None = None
    ambiguous: bool = False

    def __post_init__(self) -> None:
        self.window: list[int] = []
        self.recommendations: list[int | None] = []

    def recommendation(self, value: float) -> int:
        target = Fraction(self.policy.target_per_replica)
        v = Fraction(value)
        current = self.replicas
        if current:
            distance = abs(v - current * target)
            allowed = Fraction(self.policy.tolerance) * current * target
            if abs(distance - allowed) <= allowed * Fraction(1, 10**9):
                self.ambiguous = True
            if distance <= allowed:
                return current
        return max(1, math.ceil(v / target))

    def step(self, value: float) -> int | None:
        if math.isnan(value):
            self.recommendations.append(None)
            return self.replicas
        rec = self.recommendation(value)
        self.recommendations.append(rec)
        self.window = [*self.window, rec][-self.policy.stabilization_steps :]
        up, down = rec, max(self.window)
        current = self.replicas
        if current is None:
            desired = rec
        elif current < up:
            desired = up
        elif current > down:
            desired = down
        else:
            desired = current
        desired = max(desired, self.policy.min_replicas)
        if self.policy.max_replicas is not None:
            desired = min(desired, self.policy.max_replicas)
        self.replicas = desired
        return desired


# Quarter units keep v / T exact enough that ceil() never meets a rounding question.
quarters = st.integers(0, 4000).map(lambda k: k / 4)
load_values = st.one_of(quarters, quarters, quarters, st.just(NAN))


@st.composite
def policies(draw: st.DrawFn) -> ScalingPolicy:
    min_replicas = draw(st.integers(0, 6))
    max_replicas = draw(st.one_of(st.none(), st.integers(max(1, min_replicas), 60)))
    return ScalingPolicy(
        target_per_replica=draw(st.integers(1, 200)) / 4,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        tolerance=draw(st.sampled_from([0.0, 0.1, 0.1, 0.25])),
        stabilization_steps=draw(st.integers(1, 6)),
    )


def run(values: list[float], policy: ScalingPolicy) -> list[int | None]:
    state, out = HpaState(), []
    for value in values:
        state = hpa_step(state, value, policy)
        out.append(state.replicas)
    return out


@given(st.lists(load_values, min_size=1, max_size=60), policies())
@settings(max_examples=100, deadline=None)
def test_hpa_step_matches_the_reference(values: list[float], policy: ScalingPolicy) -> None:
    reference = Reference(policy)
    expected = [reference.step(v) for v in values]
    assume(not reference.ambiguous)
    assert run(values, policy) == expected


@given(st.lists(load_values, min_size=1, max_size=60), policies())
@settings(max_examples=100, deadline=None)
def test_replicas_stay_within_bounds(values: list[float], policy: ScalingPolicy) -> None:
    for replicas in run(values, policy):
        if replicas is None:
            continue
        assert replicas >= max(1, policy.min_replicas)
        if policy.max_replicas is not None:
            assert replicas <= policy.max_replicas


@given(st.lists(load_values, min_size=1, max_size=60), policies())
@settings(max_examples=100, deadline=None)
def test_a_scale_down_waits_for_the_whole_window(
    values: list[float], policy: ScalingPolicy
) -> None:
    reference = Reference(policy)
    for v in values:
        reference.step(v)
    assume(not reference.ambiguous)
    replicas = run(values, policy)
    recs = [r for r in reference.recommendations if r is not None]
    seen = 0  # recommendations made so far
    previous: int | None = None
    for value, now in zip(values, replicas, strict=True):
        if not math.isnan(value):
            seen += 1
        if previous is not None and now is not None and now < previous:
            window = recs[max(0, seen - policy.stabilization_steps) : seen]
            assert all(rec <= now for rec in window), (window, now)
        previous = now


@given(st.lists(load_values, min_size=2, max_size=60), policies())
@settings(max_examples=100, deadline=None)
def test_a_rise_applies_at_once(values: list[float], policy: ScalingPolicy) -> None:
    state = HpaState()
    for value in values:
        before = state.replicas
        state = hpa_step(state, value, policy)
        if math.isnan(value) or before is None:
            continue
        needed = max(1, math.ceil(Fraction(value) / Fraction(policy.target_per_replica)))
        outside = abs(value / (before * policy.target_per_replica) - 1) > policy.tolerance + 1e-9
        if needed > before and outside:
            cap = policy.max_replicas if policy.max_replicas is not None else needed
            assert state.replicas == min(max(needed, policy.min_replicas), cap)


@given(
    st.integers(1, 50),
    st.integers(1, 200).map(lambda k: k / 4),
    st.floats(-0.0999, 0.0999),
    st.lists(st.integers(1, 50), max_size=5),
)
@settings(max_examples=100, deadline=None)
def test_a_value_within_ten_percent_of_capacity_keeps_the_count(
    replicas: int, target: float, offset: float, window: list[int]
) -> None:
    policy = ScalingPolicy(target_per_replica=target, stabilization_steps=1)
    value = replicas * target * (1 + offset)
    state = hpa_step(HpaState(replicas, tuple(window)), value, policy)
    assert state.replicas == replicas
    assert recommend(value, replicas, policy) == replicas


@pytest.mark.parametrize(("value", "expected"), [(111.0, 12), (89.0, 9), (109.9, 10), (90.1, 10)])
def test_tolerance_edges_against_ten_replicas(value: float, expected: int) -> None:
    policy = ScalingPolicy(target_per_replica=10.0)
    assert hpa_step(HpaState(10), value, policy).replicas == expected


@given(
    st.integers(1, 50), st.lists(st.integers(1, 50), max_size=5), policies()
)
@settings(max_examples=50, deadline=None)
def test_nan_holds_the_state(replicas: int, window: list[int], policy: ScalingPolicy) -> None:
    state = HpaState(replicas, tuple(window))
    assert hpa_step(state, NAN, policy) is state
    assert hpa_step(HpaState(), NAN, policy) == HpaState()


def test_the_first_value_sets_the_count_and_the_docstring_example() -> None:
    policy = ScalingPolicy(target_per_replica=50.0, max_replicas=20)
    assert hpa_step(HpaState(), 180.0, policy).replicas == 4
    assert hpa_step(HpaState(), 0.0, policy).replicas == 1
    assert hpa_step(HpaState(), 5000.0, policy).replicas == 20


def test_a_fall_waits_for_the_window_then_takes_its_highest_recommendation() -> None:
    policy = ScalingPolicy(target_per_replica=1.0, stabilization_steps=3)
    assert run([10, 3, 5, 2, 2, 2, 1], policy) == [10, 10, 10, 5, 5, 2, 2]


# --- planned load and the reactive floor ----------------------------------------------------

finite_loads = st.floats(0, 1e6, allow_nan=False)


@given(finite_loads, finite_loads)
@settings(max_examples=100, deadline=None)
def test_the_reactive_floor_plans_at_least_the_current_demand(
    forecast: float, demand: float
) -> None:
    assert planned_load(forecast, demand, True) == max(forecast, demand)
    assert planned_load(forecast, demand, True) >= demand
    assert planned_load(forecast, demand, False) == forecast


@given(finite_loads)
@settings(max_examples=30, deadline=None)
def test_missing_inputs_to_the_planned_load(load: float) -> None:
    assert planned_load(NAN, load, True) == load
    assert planned_load(NAN, load, False) == load  # no forecast: plan for what is there
    assert planned_load(load, NAN, True) == load  # no current demand: no floor
    assert math.isnan(planned_load(NAN, NAN, True))


@given(st.integers(0, 4000).map(lambda k: k / 4), st.integers(1, 200).map(lambda k: k / 4))
@settings(max_examples=100, deadline=None)
def test_oracle_replicas_are_just_enough(demand: float, target: float) -> None:
    replicas = oracle_replicas(demand, target)
    assert replicas >= 1
    assert replicas * target >= demand
    assert replicas == 1 or (replicas - 1) * target < demand


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target_per_replica": 0.0}, "target"),
        ({"target_per_replica": -5.0}, "target"),
        ({"target_per_replica": NAN}, "target"),
        ({"target_per_replica": float("inf")}, "target"),
        ({"min_replicas": -1}, "min_replicas"),
        ({"max_replicas": 0}, "max_replicas"),
        ({"min_replicas": 5, "max_replicas": 4}, "max_replicas"),
        ({"tolerance": 1.0}, "tolerance"),
        ({"tolerance": -0.1}, "tolerance"),
        ({"stabilization_steps": 0}, "stabilization"),
    ],
)
def test_policy_validation_names_the_field(kwargs: dict[str, float], field: str) -> None:
    arguments: dict[str, float] = {"target_per_replica": 10.0, **kwargs}
    with pytest.raises(InvalidInputError) as caught:
        ScalingPolicy(**arguments)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_a_valid_policy_keeps_its_values() -> None:
    policy = ScalingPolicy(10.0, min_replicas=0, max_replicas=1, tolerance=0.0)
    assert (policy.min_replicas, policy.max_replicas, policy.tolerance) == (0, 1, 0.0)


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.floats(0.0, 5_000.0), st.just(math.nan)), max_size=60
    ),
    target=st.floats(0.5, 100.0),
    stabilization=st.integers(1, 6),
    min_replicas=st.integers(0, 3),
    extra=st.one_of(st.none(), st.integers(0, 40)),
    tolerance=st.sampled_from([0.0, 0.1, 0.3]),
)
def test_a_replay_gives_the_replicas_of_hpa_step_at_each_evaluation(
    values: list[float], target: float, stabilization: int, min_replicas: int,
    extra: int | None, tolerance: float,
) -> None:
    policy = ScalingPolicy(
        target_per_replica=target, min_replicas=min_replicas,
        max_replicas=None if extra is None else max(1, min_replicas) + extra,
        tolerance=tolerance, stabilization_steps=stabilization,
    )
    state, stepped = HpaState(), []
    for value in values:
        state = hpa_step(state, value, policy)
        stepped.append(state.replicas)
    assert hpa_replay(values, policy) == stepped
