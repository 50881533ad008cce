"""CompactForest predicts what scikit-learn's regressor predicts, in less memory."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingRegressor

from forecaster.models.forest import CompactForest


def _fitted(
    loss: str, seed: int, **params: object
) -> tuple[HistGradientBoostingRegressor, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(2000, 8))
    X[rng.random(X.shape) < 0.05] = np.nan  # missing values on both sides of splits
    X[:300, 5] = np.nan  # one feature often missing in training
    y = np.nan_to_num(X[:, 0]) * 3 + np.nan_to_num(X[:, 1]) ** 2 + rng.normal(size=2000)
    model = HistGradientBoostingRegressor(
        loss=loss, quantile=0.9 if loss == "quantile" else None, max_iter=40,
        max_leaf_nodes=15, min_samples_leaf=20, early_stopping=False, random_state=0, **params,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X, y)
    test = rng.normal(size=(3000, 8)) * 2
    test[rng.random(test.shape) < 0.1] = np.nan
    return model, test


@pytest.mark.parametrize("loss", ["squared_error", "quantile", "absolute_error"])
@pytest.mark.parametrize("seed", [0, 1])
def test_predictions_are_identical_to_scikit_learn(loss: str, seed: int) -> None:
    model, test = _fitted(loss, seed)
    forest = CompactForest.from_sklearn(model)
    np.testing.assert_array_equal(forest.predict(test), model.predict(test))
    np.testing.assert_array_equal(forest.predict(test[:1]), model.predict(test[:1]))


def test_a_feature_missing_only_at_prediction_goes_where_scikit_learn_sends_it() -> None:
    model, test = _fitted("squared_error", 2)
    test[:, 0] = np.nan  # never missing in training
    forest = CompactForest.from_sklearn(model)
    np.testing.assert_array_equal(forest.predict(test), model.predict(test))


def test_it_survives_pickling_and_is_a_fraction_of_the_regressor() -> None:
    model, test = _fitted("squared_error", 3)
    forest = CompactForest.from_sklearn(model)
    copy = pickle.loads(pickle.dumps(forest))
    np.testing.assert_array_equal(copy.predict(test), model.predict(test))
    assert len(pickle.dumps(forest)) * 3 < len(pickle.dumps(model))


def test_what_it_cannot_hold_is_refused() -> None:
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.integers(0, 4, 500), rng.normal(size=500)])
    y = X[:, 0] + rng.normal(size=500)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        categorical = HistGradientBoostingRegressor(
            categorical_features=[0], max_iter=5, early_stopping=False
        ).fit(X, y)
        poisson = HistGradientBoostingRegressor(loss="poisson", max_iter=5, early_stopping=False)
        poisson.fit(X, np.abs(y))
    with pytest.raises(ValueError, match="categorical"):
        CompactForest.from_sklearn(categorical)
    with pytest.raises(ValueError, match="link"):
        CompactForest.from_sklearn(poisson)


def _feature_layout(forest: CompactForest) -> tuple[np.ndarray, ...]:
    """The arrays of the layout saved before: a feature per node (-1 for a leaf), the right
    child's index (a leaf's own), and each split's missing-left flag."""
    here = np.arange(forest.value.size)
    column = forest.column.astype(np.int64)
    leaf = column == forest.features
    missing_left = column > forest.features
    feature = np.where(leaf, -1, np.where(missing_left, column - forest.features - 1, column))
    return feature, (here + forest.skip).astype(np.int16), missing_left, leaf


def test_a_forest_saved_with_a_feature_per_node_loads_and_predicts_the_same() -> None:
    model, test = _fitted("squared_error", 5)
    forest = CompactForest.from_sklearn(model)
    feature, right, missing_left, _ = _feature_layout(forest)
    assert missing_left.any() and (~missing_left & (feature >= 0)).any()
    saved = [forest.baseline, forest.roots, feature.astype(np.int8), forest.value, right,
             missing_left, forest.depth]
    loaded = CompactForest.__new__(CompactForest)
    loaded.__setstate__(saved)
    np.testing.assert_array_equal(loaded.predict(test), model.predict(test))
    assert loaded.nbytes <= forest.nbytes


def test_a_forest_saved_with_both_children_of_each_node_loads_and_predicts_the_same() -> None:
    model, test = _fitted("squared_error", 4)
    forest = CompactForest.from_sklearn(model)
    # The layout saved before that: both children of each node, a leaf pointing at itself
    # twice, reading feature 0, with whatever missing-left flag scikit-learn gave it.
    feature, right, missing_left, leaf = _feature_layout(forest)
    here = np.arange(forest.value.size)
    children = np.column_stack([np.where(leaf, here, here + 1), right]).astype(np.int16)
    saved = [forest.baseline, forest.roots, np.where(leaf, 0, feature).astype(np.int8),
             forest.value, children, missing_left | leaf, forest.depth]
    loaded = CompactForest.__new__(CompactForest)
    loaded.__setstate__(saved)
    np.testing.assert_array_equal(loaded.predict(test), model.predict(test))
    assert loaded.skip.ndim == 1 and loaded.nbytes <= forest.nbytes


def test_a_node_takes_ten_bytes() -> None:
    model, _ = _fitted("squared_error", 6)
    forest = CompactForest.from_sklearn(model)
    assert forest.nbytes == 10 * forest.value.size + 2 * forest.roots.size
