"""Per-target time windows: excluded from training, or with a scheduled minimum of replicas."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from forecaster.errors import InvalidInputError
from forecaster.series import mask_windows
from forecaster.spec import parse_trigger_metadata
from forecaster.windows import Window, parse_windows, scheduled_minimum

REQUIRED = {"serverAddress": "http://prometheus:9090", "query": "up", "targetValue": "50"}


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_utc_windows_are_read_and_sorted() -> None:
    windows = parse_windows(
        "2026-11-27T00:00Z/2026-11-27T02:00Z, 2026-11-20T10:00Z/2026-11-20T14:30Z",
        "excludeFromTraining", "UTC", with_replicas=False,
    )
    assert windows == (
        Window(_epoch("2026-11-20T10:00"), _epoch("2026-11-20T14:30")),
        Window(_epoch("2026-11-27T00:00"), _epoch("2026-11-27T02:00")),
    )


def test_times_without_an_offset_are_local_to_the_target_and_follow_daylight_saving() -> None:
    # 08:00 in Paris is 07:00 UTC in winter and 06:00 UTC in summer.
    winter, summer = (
        parse_windows(f"{day}T08:00/{day}T20:00=12", "scheduledMinReplicas", "Europe/Paris",
                      with_replicas=True)[0]
        for day in ("2026-12-24", "2026-07-14")
    )
    assert winter == Window(_epoch("2026-12-24T07:00"), _epoch("2026-12-24T19:00"), 12)
    assert summer.start == _epoch("2026-07-14T06:00")


@pytest.mark.parametrize(
    ("text", "with_replicas", "reason"),
    [
        ("2026-11-20T10:00Z", False, "must be START/END"),
        ("2026-11-20T10:00Z/later", False, "is not an ISO 8601 time"),
        ("2026-11-20T14:00Z/2026-11-20T10:00Z", False, "must end after it starts"),
        ("2026-11-20T10:00Z/2026-11-20T10:00Z", False, "must end after it starts"),
        ("2026-11-20T10:00Z/2026-11-20T14:00Z", True, "REPLICAS a whole number"),
        ("2026-11-20T10:00Z/2026-11-20T14:00Z=0", True, "REPLICAS a whole number"),
        ("2026-11-20T10:00Z/2026-11-20T14:00Z=two", True, "REPLICAS a whole number"),
        ("2026-11-20T10:00Z/2026-11-20T14:00Z=\u00b2", True, "REPLICAS a whole number"),
        (",".join(["2026-11-20T10:00Z/2026-11-20T14:00Z"] * 101), False, "at most 100"),
    ],
)
def test_bad_windows_name_the_key_the_window_and_the_reason(
    text: str, with_replicas: bool, reason: str
) -> None:
    key = "scheduledMinReplicas" if with_replicas else "excludeFromTraining"
    with pytest.raises(InvalidInputError) as caught:
        parse_windows(text, key, "UTC", with_replicas=with_replicas)
    assert caught.value.field == key
    assert reason in caught.value.reason


@pytest.mark.parametrize("key", ["excludeFromTraining", "scheduledMinReplicas"])
def test_trigger_metadata_reads_both_keys_in_the_trigger_time_zone(key: str) -> None:
    value = "2026-12-24T08:00/2026-12-24T20:00" + ("=3" if key == "scheduledMinReplicas" else "")
    spec, unknown = parse_trigger_metadata(
        {**REQUIRED, key: value, "timeZone": "America/New_York"}, known_models=()
    )
    assert unknown == []
    windows = spec.exclude_from_training or spec.scheduled_min_replicas
    assert windows[0].start == _epoch("2026-12-24T13:00")  # 08:00 EST


def test_a_bad_window_in_trigger_metadata_names_its_key() -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_trigger_metadata(
            {**REQUIRED, "scheduledMinReplicas": "2026-12-24T08:00Z/2026-12-24T20:00Z"},
            known_models=(),
        )
    assert caught.value.field == "scheduledMinReplicas"


def test_masking_hides_every_bin_that_overlaps_a_window_and_nothing_else() -> None:
    index = pd.date_range("2026-11-20T09:00Z", periods=12, freq="30min")
    series = pd.Series(np.arange(12.0), index=index)
    # 10:10-11:00 overlaps the bins starting 10:00 and 10:30.
    window = Window(_epoch("2026-11-20T10:10"), _epoch("2026-11-20T11:00"))
    masked = mask_windows(series, 1800, [window])
    hidden = masked.index[masked.isna()]
    assert list(hidden) == list(pd.to_datetime(["2026-11-20T10:00Z", "2026-11-20T10:30Z"]))
    kept = masked.notna()
    assert (masked[kept] == series[kept]).all()
    assert series.notna().all()  # the input is not changed


def test_the_highest_overlapping_scheduled_minimum_applies() -> None:
    windows = (Window(100.0, 200.0, 3), Window(150.0, 300.0, 8), Window(400.0, 500.0, 20))
    assert scheduled_minimum(windows, 0.0, 99.0) is None
    assert scheduled_minimum(windows, 90.0, 120.0) == 3
    assert scheduled_minimum(windows, 190.0, 250.0) == 8
    assert scheduled_minimum(windows, 300.0, 400.0) is None  # windows are half-open
