"""A history source for targets fed by hand (fold_in): any read is a test's mistake."""

from __future__ import annotations

import pandas as pd


class NoSource:
    """A source that is never read: the target it serves is fed by fold_in."""

    def query_range(self, *args: object) -> pd.Series:
        raise AssertionError("not read")

    def query_instant(self, *args: object) -> tuple[object, float]:
        raise AssertionError("not read")
