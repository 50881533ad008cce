"""A target's record of its judged intervals: their starts kept as steps between them."""

from __future__ import annotations

import numpy as np
import pandas as pd

from forecaster.models.calibration import ScoreWindow
from forecaster.spec import TriggerSpec
from forecaster.target import SHARE_WINDOWS, ShareKeeper, Target
from tests.support.sources import NoSource

STEP = 300
START = pd.Timestamp("2026-11-01T00:00Z")



def _fed(demand: np.ndarray) -> tuple[ShareKeeper, list[float]]:
    """A target's keeper fed `demand` a point at a time (NaN: none read), and the starts
    (epoch seconds) of the points its controller judged, seen from its count of them."""
    spec = TriggerSpec(server_address="http://replay.demo", query="q", target_value=10.0,
                       max_under_provisioned=0.1, startup_seconds=300, model="naive")
    target = Target("t/t/m", spec, NoSource())  # type: ignore[arg-type]
    judged = []
    for position, value in enumerate(demand):
        if np.isnan(value):
            continue  # not read: the next refresh adds the bins between as a gap
        stamp = START + position * pd.Timedelta(seconds=STEP)
        keeper = target.share_keeper
        assert keeper is not None
        before = keeper.controller.intervals
        with target.lock:
            target.fold_in(pd.Series([value], index=[stamp]), (stamp.timestamp(), value), 1e9)
        if keeper.controller.intervals > before:
            judged.append(stamp.timestamp())
    assert target.share_keeper is not None
    return target.share_keeper, judged


def test_the_starts_of_judged_intervals_skip_the_bins_that_were_not_judged() -> None:
    demand = np.random.default_rng(3).uniform(20.0, 120.0, 300)
    demand[100:140] = np.nan  # not read: a gap of unjudged bins, longer than a held one
    keeper, judged = _fed(demand)
    starts, shortfalls = keeper.history()
    assert shortfalls.size == len(judged) > 200
    np.testing.assert_array_equal(starts, judged)
    assert np.diff(starts).max() > STEP  # the gap is there


def _saved_before(keeper: ShareKeeper, offsets: bool) -> dict[str, object]:
    """The keeper's state as saved when each start was kept as seconds after the first
    (`offsets`), or as epoch seconds."""
    starts, _ = keeper.history()
    state = {k: v for k, v in vars(keeper).items() if k not in ("judged_gaps", "judged_last")}
    times = ScoreWindow(SHARE_WINDOWS["7d"] // STEP, np.int32 if offsets else np.float64)
    times.extend(starts - starts[0] if offsets else starts)
    state["judged_times"] = times
    if offsets:
        state["judged_origin"] = float(starts[0])
    return state


def test_a_keeper_saved_with_the_starts_themselves_loads_with_the_same_history() -> None:
    demand = np.random.default_rng(4).uniform(20.0, 120.0, 400)
    demand[200:260] = np.nan
    keeper, judged = _fed(demand)
    starts, shortfalls = keeper.history()
    np.testing.assert_array_equal(starts, judged)
    for offsets in (True, False):
        loaded = ShareKeeper.__new__(ShareKeeper)
        loaded.__setstate__(_saved_before(keeper, offsets))
        loaded_starts, loaded_shortfalls = loaded.history()
        np.testing.assert_array_equal(loaded_starts, starts)
        np.testing.assert_array_equal(loaded_shortfalls, shortfalls)
