"""Training outliers clipped, so that one-off spikes and outages do not poison a profile.

A seasonal model learns each time of day from a handful of past days: one spike at 10:00 on
Tuesday can come back as a bump at 10:00 every day. The MSTL model trains its profiles on
history clipped to a robust band around a rolling median; demand itself is never clipped
(the reactive floor and every score see what happened).

Measured and not adopted: the ensemble's Holt-Winters members trained on clipped history
lowered the plain ensemble's cost to hold 5% on Twitter AAPL (1.57 to 1.53), but under `auto`
their narrower intervals left Twitter's 80% interval covering 71% and the three-trace mean
cost ratio went from 0.942 to 0.945.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CLIP_WINDOW = pd.Timedelta(hours=1)
CLIP_MADS = 5.0


def clip_outliers(values: np.ndarray, window: int, mads: float = CLIP_MADS) -> np.ndarray:
    """`values` clipped to a rolling median +- `mads` robust standard deviations of the
    deviations from it (the median absolute deviation, scaled to a normal's sigma)."""
    series = pd.Series(values)
    centre = series.rolling(window, center=True, min_periods=1).median().to_numpy()
    deviation = values - centre
    finite = deviation[np.isfinite(deviation)]
    if finite.size == 0:
        return values
    scale = 1.4826 * float(np.median(np.abs(finite - np.median(finite))))
    if scale <= 0:
        return values
    return np.clip(values, centre - mads * scale, centre + mads * scale)
