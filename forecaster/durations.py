"""Durations as people write them ("30s", "5m", "1h", "14d", "1w") and as whole seconds.

>>> parse_duration("14d", "historyWindow")
1209600
>>> format_duration(5400)
'90m'
"""

from __future__ import annotations

import re
import reprlib

from forecaster.errors import InvalidInputError

__all__ = ["ACCEPTED_DURATION_FORMS", "format_duration", "parse_duration"]

# Largest first: format_duration picks the largest unit that divides the value exactly.
_UNIT_SECONDS: dict[str, int] = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}
# At most 12 digits: far beyond any sensible window, and int() never meets its digit limit.
_DURATION = re.compile(r"(?P<number>[0-9]{1,12})(?P<unit>[wdhms]?)")

ACCEPTED_DURATION_FORMS = (
    "a whole number with one unit s, m, h, d or w (such as '30s', '5m', '1h', '14d', '1w') "
    "or a plain whole number of seconds (such as '300')"
)


def parse_duration(text: str, field: str) -> int:
    """Parse a duration such as "5m" or "300" into whole seconds (>= 0).

    Raises InvalidInputError naming ``field`` when ``text`` is not one of the accepted forms.
    """
    match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise InvalidInputError(
            field, f"must be a duration, {ACCEPTED_DURATION_FORMS}; got {reprlib.repr(text)}"
        )
    return int(match["number"]) * _UNIT_SECONDS[match["unit"] or "s"]


def format_duration(seconds: int) -> str:
    """Format whole seconds with the largest unit that divides them exactly: 5400 -> "90m"."""
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 0:
        raise ValueError(f"seconds must be a whole number >= 0, got {seconds!r}")
    if seconds == 0:
        return "0s"
    for unit, size in _UNIT_SECONDS.items():
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    raise AssertionError("unreachable: every whole number is a multiple of 1s")
