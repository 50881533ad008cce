"""Outlier clipping for training: spikes go, ordinary and missing values stay."""

from __future__ import annotations

import numpy as np

from forecaster.models.robust import clip_outliers


def test_clipping_keeps_ordinary_values_and_missing_ones() -> None:
    values = np.array([10.0, 11.0, np.nan, 9.0, 500.0, 10.0, 12.0, 11.0])
    clipped = clip_outliers(values, 5)  # a lone spike is under half of any window
    assert np.isnan(clipped[2])
    assert clipped[4] < 100
    ordinary = [0, 1, 3, 5, 6, 7]
    np.testing.assert_array_equal(clipped[ordinary], values[ordinary])
