"""A target holds its maxUnderProvisioned in the live engine: the controller judges each
decision when the demand of the interval it was ready for arrives, with no look-ahead, and its
level lives with the target, not the model."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from forecaster.config import EngineSettings
from forecaster.engine import Engine
from forecaster.policy import HpaState, ScalingPolicy, hpa_step
from forecaster.slo import ShareScorer
from forecaster.sources.replay import ReplaySource
from forecaster.spec import TriggerSpec
from forecaster.target import Target
from tests.support.sources import NoSource
from tests.support.waiting import wait_for

DATA = Path(__file__).parent.parent / "data"
STEP = 300
START = pd.Timestamp("2026-11-01T00:00Z")



def _spec(**changes: object) -> TriggerSpec:
    base = dict(server_address="http://replay.demo", query="q", target_value=10.0,
                max_under_provisioned=0.1, startup_seconds=300, model="naive")
    return TriggerSpec(**{**base, **changes})  # type: ignore[arg-type]


def _feed(target: Target, demand: np.ndarray) -> list[float]:
    """One grid point per interval, the current value equal to it, as a refresh folds them
    in; returns the load served after each."""
    served = []
    for position, value in enumerate(demand):
        stamp = START + position * pd.Timedelta(seconds=STEP)
        with target.lock:
            target.fold_in(pd.Series([value], index=[stamp]), (stamp.timestamp(), value), 1e9)
        assert target.snapshot.planned is not None
        served.append(target.snapshot.planned.value)
    return served


def _shortfall(served: list[float], demand: np.ndarray, lead: int, target: float) -> float:
    """The share of intervals short of the replicas an HPA fed `served` had ready: the
    reference arithmetic, decision t ready in t + 1 + lead."""
    policy = ScalingPolicy(target_per_replica=target)
    state, replicas = HpaState(), []
    for value in served:
        state = hpa_step(state, value, policy)
        replicas.append(state.replicas)
    short = [demand[t + 1 + lead] > replicas[t] * target for t in range(len(served) - 1 - lead)]
    return float(np.mean(short))


def test_a_reactive_plan_is_raised_until_the_asked_share_holds() -> None:
    rng = np.random.default_rng(7)
    steps = 2_016 + 300
    wave = 100 * (1 + 0.4 * np.sin(np.arange(steps) * 2 * np.pi / 288))
    demand = np.maximum(wave * rng.lognormal(0, 0.15, steps), 1.0)
    target = Target("t/t/m", _spec(), NoSource())  # type: ignore[arg-type]
    served = _feed(target, demand)
    share = target.snapshot.share
    assert share is not None and share.asked == 0.1
    # The first 300 intervals find the level; the last week holds the share.
    assert share.judged["7d"] == 2_016
    assert abs(share.achieved["7d"] - 0.1) <= 0.015, share  # type: ignore[operator]
    assert share.level > 0.05  # the bare current value runs short far more often than 10%
    # The controller's own count agrees with the HPA arithmetic replayed independently.
    tail = slice(len(served) - 2_016 - 2, None)
    assert abs(_shortfall(served[tail], demand[tail], 1, 10.0) - share.achieved["7d"]) < 0.005


def test_the_share_history_lists_each_judged_interval_at_its_start() -> None:
    rng = np.random.default_rng(11)
    demand = rng.uniform(20.0, 120.0, 400)
    target = Target("t/t/m", _spec(), NoSource())  # type: ignore[arg-type]
    _feed(target, demand)
    assert target.share_keeper is not None
    starts, shortfalls = target.share_keeper.history()
    share = target.snapshot.share
    assert share is not None
    assert starts.size == shortfalls.size == share.judged["7d"] > 300
    # Consecutive intervals on the grid, the newest one being the newest point fed.
    assert np.all(np.diff(starts) == STEP)
    assert starts[-1] == (START + (len(demand) - 1) * pd.Timedelta(seconds=STEP)).timestamp()
    assert set(np.unique(shortfalls)) <= {0.0, 1.0}
    assert math.isclose(float(shortfalls.mean()), share.achieved["7d"])  # type: ignore[arg-type]


def test_a_fixed_quantile_has_no_controller() -> None:
    target = Target("t/t/m", _spec(max_under_provisioned=None), NoSource())  # type: ignore[arg-type]
    demand = np.full(20, 50.0)
    assert _feed(target, demand)[-1] == 50.0
    assert target.snapshot.share is None and target.snapshot.planned is not None
    assert target.snapshot.planned.slo_level is None


def test_a_restated_plan_between_two_points_is_not_a_second_decision() -> None:
    target = Target("t/t/m", _spec(), NoSource())  # type: ignore[arg-type]
    _feed(target, np.full(10, 50.0))
    assert target.share_keeper is not None
    pending = target.share_keeper.controller.intervals
    stamp = START + 9 * pd.Timedelta(seconds=STEP)
    for seconds in (30, 60, 90):  # refreshes that bring the current value, no new point
        with target.lock:
            target.fold_in(pd.Series(dtype=float), (stamp.timestamp() + seconds, 80.0), 1e9)
    assert target.share_keeper.controller.intervals == pending
    planned = target.snapshot.planned
    assert planned is not None and planned.slo_level is not None
    assert math.isclose(planned.value, 80.0 * math.exp(planned.slo_level))


def test_the_level_survives_a_refit_and_a_change_of_model() -> None:
    engine = Engine(EngineSettings(refresh_seconds=3600), fit_pool=ThreadPoolExecutor(1))
    try:
        spec = TriggerSpec(server_address="http://replay.demo",
                           query="nasa_http_1995_requests_per_minute", target_value=10.0,
                           model="seasonal_naive")
        target = engine.ensure_target("demo/nasa/m", spec, ReplaySource.from_folder(DATA))
        wait_for(lambda: target.model is not None, timeout=60, what="the first fit")
        assert target.share_keeper is not None
        controller = target.share_keeper.controller
        controller.level = 0.3  # as if it had learned that much
        first_model = target.model
        engine.refit_now("demo/nasa/m")
        engine.start()
        wait_for(lambda: target.model is not first_model, timeout=60, what="the refit")
        assert target.share_keeper.controller is controller and controller.level == 0.3
    finally:
        engine.stop()


def test_a_refit_ranks_auto_by_the_targets_own_share_and_arithmetic() -> None:
    """The fit worker is sent the scorer of the target's controller (share, targetValue,
    scaleDownStabilization, lead) and planHalfLife; a fixed quantile sends none."""
    spec = _spec(max_under_provisioned=0.02, scale_down_stabilization_seconds=900,
                 plan_half_life_seconds=1200, startup_seconds=600)
    target = Target("t/t/m", spec, NoSource())  # type: ignore[arg-type]
    _feed(target, np.full(3, 50.0))
    with target.lock:
        scorer = target.fit_request().scorer
    assert scorer == ShareScorer(0.02, ScalingPolicy(10.0, stabilization_steps=3), 2, 1200.0)
    fixed = Target("t/t/m", _spec(max_under_provisioned=None), NoSource())  # type: ignore[arg-type]
    _feed(fixed, np.full(3, 50.0))
    with fixed.lock:
        assert fixed.fit_request().scorer is None
