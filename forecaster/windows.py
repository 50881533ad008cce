"""Fixed time windows a user names per target: spans kept out of training (an incident, a load
test) and spans with a scheduled minimum of replicas (a release, a campaign).

Written as ISO 8601 intervals, comma-separated, the way a KEDA trigger's metadata carries them
(every value a string)::

    excludeFromTraining: "2026-11-20T10:00Z/2026-11-20T14:30Z"
    scheduledMinReplicas: "2026-12-24T08:00/2026-12-24T20:00=12"

A time without an offset is read in the target's time zone (its `timeZone`), so an event
written in local time stays at its local hour across a daylight-saving change.
"""

from __future__ import annotations

import reprlib
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from forecaster.errors import InvalidInputError

MAX_WINDOWS = 100


@dataclass(frozen=True)
class Window:
    """[start, end) in epoch seconds; `replicas` is the scheduled minimum, when there is one."""

    start: float
    end: float
    replicas: int | None = None

    def overlaps(self, start: float, end: float) -> bool:
        return self.start < end and start < self.end


def parse_windows(
    text: str, key: str, time_zone: str, *, with_replicas: bool
) -> tuple[Window, ...]:
    """`START/END[=N],...` into windows; InvalidInputError names `key`, the window and why."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if len(items) > MAX_WINDOWS:
        raise InvalidInputError(key, f"at most {MAX_WINDOWS} windows; got {len(items)}")
    zone = zoneinfo.ZoneInfo(time_zone)
    form = "START/END=REPLICAS" if with_replicas else "START/END"
    windows = []
    for number, item in enumerate(items, start=1):
        where = f"window {number} ({reprlib.repr(item)})"
        span, replicas = item, None
        if with_replicas:
            span, equals, count = item.rpartition("=")
            count = count.strip()
            if not equals or not count.isascii() or not count.isdecimal() or int(count) < 1:
                raise InvalidInputError(
                    key, f"{where} must be {form} with REPLICAS a whole number >= 1, such as "
                    f"'2026-12-24T08:00Z/2026-12-24T20:00Z=12'",
                )
            replicas = int(count)
        start_text, slash, end_text = span.partition("/")
        if not slash:
            raise InvalidInputError(key, f"{where} must be {form}, two ISO 8601 times")
        start = _instant(start_text, zone, key, where)
        end = _instant(end_text, zone, key, where)
        if end <= start:
            raise InvalidInputError(key, f"{where} must end after it starts")
        windows.append(Window(start, end, replicas))
    return tuple(sorted(windows, key=lambda w: w.start))


def _instant(text: str, zone: zoneinfo.ZoneInfo, key: str, where: str) -> float:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInputError(
            key, f"{where}: {reprlib.repr(text.strip())} is not an ISO 8601 time such as "
            "'2026-11-20T10:00Z' or '2026-11-20T11:00' (in the target's timeZone)",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return moment.timestamp()


def scheduled_minimum(windows: Sequence[Window], start: float, end: float) -> int | None:
    """The highest scheduled minimum of replicas over [start, end), or None."""
    found = [w.replicas for w in windows if w.replicas is not None and w.overlaps(start, end)]
    return max(found) if found else None
