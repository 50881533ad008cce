"""A fitted gradient-boosting regressor kept as a few flat arrays.

scikit-learn keeps each tree as a Python object over a 56-byte node record (counts, gains,
bins: what fitting needs). The service holds one model per target between refits, so that
costs: two 60-tree regressors took 377 KB and 271 objects for the garbage collector to walk,
per target. `CompactForest` keeps only what prediction reads (13 bytes a node, five arrays
per forest) and predicts the same values bit for bit: the same comparisons, and the trees'
values added in scikit-learn's order.

>>> forest = CompactForest.from_sklearn(regressor)   # doctest: +SKIP
>>> forest.predict(X)                                # == regressor.predict(X)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sklearn.ensemble import HistGradientBoostingRegressor


@dataclass(frozen=True, slots=True)
class CompactForest:
    """The trees of a numeric-feature HistGradientBoostingRegressor with an identity link
    (squared error, quantile), as flat node arrays.

    Node i tests feature `feature[i]` against `value[i]` and goes to `children[i, 0]` (left:
    below or equal, or missing when `missing_left[i]`) or `children[i, 1]`. A leaf's value is
    its prediction and its children point at itself, so every row can take the same number
    of steps (`depth`) through every tree at once.
    """

    baseline: float
    roots: np.ndarray
    feature: np.ndarray
    value: np.ndarray
    children: np.ndarray
    missing_left: np.ndarray
    depth: int

    @classmethod
    def from_sklearn(cls, model: HistGradientBoostingRegressor) -> CompactForest:
        """The fitted `model`'s trees; ValueError for what this form does not hold."""
        if model.n_trees_per_iteration_ != 1:
            raise ValueError("only single-output regressors can be made compact")
        if getattr(model, "is_categorical_", None) is not None and model.is_categorical_.any():
            raise ValueError("categorical features cannot be made compact")
        if type(model._loss.link).__name__ != "IdentityLink":
            raise ValueError(f"loss {model.loss!r} has a link function")
        nodes = [predictors[0].nodes for predictors in model._predictors]
        sizes = np.array([len(n) for n in nodes])
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        every = np.concatenate(nodes)
        leaf = every["is_leaf"].astype(bool)
        shift = np.repeat(offsets, sizes)
        here = np.arange(len(every))
        children = np.column_stack([every["left"] + shift, every["right"] + shift])
        children[leaf] = here[leaf, None]
        feature = np.where(leaf, 0, every["feature_idx"])
        value = np.where(leaf, every["value"], every["num_threshold"])
        # the narrowest integers that hold every index: 13 bytes a node for the service's
        # forests (60 trees of at most 29 nodes, a few dozen features)
        index = np.int16 if len(every) < 2**15 else np.int32
        return cls(
            baseline=float(np.asarray(model._baseline_prediction).ravel()[0]),
            roots=offsets.astype(index),
            feature=feature.astype(np.int8 if feature.max(initial=0) < 2**7 else np.int32),
            value=value.astype(np.float64),
            children=children.astype(index),
            missing_left=every["missing_go_to_left"].astype(bool),
            depth=int(every["depth"].max(initial=0)),
        )

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predictions for the rows of X (n, features), as the regressor's predict gives."""
        X = np.asarray(X, dtype=np.float64)
        rows = np.arange(X.shape[0])[:, None]
        node = np.broadcast_to(self.roots, (X.shape[0], self.roots.size))
        for _ in range(self.depth):
            x = X[rows, self.feature[node]]
            missing = np.isnan(x)
            left = np.where(missing, self.missing_left[node], x <= self.value[node])
            node = self.children[node, (~left).view(np.int8)]
        leaves = self.value[node]
        # scikit-learn adds the trees one after another to the baseline: the same order
        # gives the same rounding (cumsum adds sequentially).
        ordered = np.column_stack([np.full(X.shape[0], self.baseline), leaves])
        return np.cumsum(ordered, axis=1)[:, -1]

    @property
    def nbytes(self) -> int:
        arrays = (self.roots, self.feature, self.value, self.children, self.missing_left)
        return sum(a.nbytes for a in arrays)
