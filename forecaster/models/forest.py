"""A fitted gradient-boosting regressor kept as a few flat arrays.

scikit-learn keeps each tree as a Python object over a 56-byte node record (counts, gains,
bins: what fitting needs). The service holds one model per target between refits, so that
costs: two 60-tree regressors took 377 KB and 271 objects for the garbage collector to walk,
per target. `CompactForest` keeps only what prediction reads (10 bytes a node, four arrays
per forest) and predicts the same values bit for bit: the same comparisons, and the trees'
values added in scikit-learn's order.

>>> forest = CompactForest.from_sklearn(regressor)   # doctest: +SKIP
>>> forest.predict(X)                                # == regressor.predict(X)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sklearn.ensemble import HistGradientBoostingRegressor


@dataclass(frozen=True, slots=True)
class CompactForest:
    """The trees of a numeric-feature HistGradientBoostingRegressor with an identity link
    (squared error, quantile), as flat node arrays.

    Nodes are in scikit-learn's order, depth first, so a split's left child is the node after
    it. Node i compares column `column[i]` of the rows, widened (see `widened`), with
    `value[i]` and goes to i + 1 (below or equal) or to i + `skip[i]`. Column f is feature f
    as given, so a missing value (NaN) goes right; column F + 1 + f is feature f with NaN as
    -inf, so that it goes left: a split that sends missing values left reads that one. A
    leaf's value is its prediction; it reads column F (all NaN) and skips 0 to itself, so
    every row can take the same number of steps (`depth`) through every tree at once.
    """

    baseline: float
    roots: np.ndarray
    column: np.ndarray
    value: np.ndarray
    skip: np.ndarray
    features: int
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
        shift = np.repeat(offsets, sizes)
        return cls._of(
            baseline=float(np.asarray(model._baseline_prediction).ravel()[0]),
            roots=offsets,
            leaf=every["is_leaf"].astype(bool),
            feature=every["feature_idx"],
            value=np.where(every["is_leaf"], every["value"], every["num_threshold"]),
            children=np.column_stack([every["left"] + shift, every["right"] + shift]),
            missing_left=every["missing_go_to_left"].astype(bool),
            depth=int(every["depth"].max(initial=0)),
            features=int(model.n_features_in_),
        )

    @classmethod
    def _of(
        cls, *, baseline: float, roots: np.ndarray, leaf: np.ndarray, feature: np.ndarray,
        value: np.ndarray, children: np.ndarray, missing_left: np.ndarray, depth: int,
        features: int,
    ) -> CompactForest:
        here = np.arange(len(leaf))
        if not np.array_equal(children[~leaf, 0], here[~leaf] + 1):
            raise ValueError("the trees' nodes are not in depth-first order")
        # the narrowest integers that hold every index: 10 bytes a node for the service's
        # forests (60 trees of at most 29 nodes, a few dozen features)
        index = np.int16 if len(leaf) < 2**15 else np.int32
        column = np.where(leaf, features, np.where(missing_left, features + 1 + feature, feature))
        skip = np.where(leaf, 0, children[:, 1] - here)
        return cls(
            baseline=baseline,
            roots=roots.astype(index),
            column=column.astype(np.int8 if column.max(initial=0) < 2**7 else np.int32),
            value=value.astype(np.float64),
            skip=skip.astype(np.uint8 if skip.max(initial=0) < 2**8 else index),
            features=features,
            depth=depth,
        )

    def __getstate__(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __setstate__(self, state: dict[str, Any] | list[Any]) -> None:
        if isinstance(state, list):  # pickled in the layout before, a feature per node
            state = self._from_feature_layout(state)
        for name, value in state.items():
            object.__setattr__(self, name, value)

    @staticmethod
    def _from_feature_layout(state: list[Any]) -> dict[str, Any]:
        """A forest pickled with `feature`, `right` (or both children) and `missing_left`
        per node, in this layout; the features counted from the largest one read."""
        fields = ("baseline", "roots", "feature", "value", "right", "missing_left", "depth")
        kept = dict(zip(fields, state, strict=True))
        children = kept.pop("right")
        here = np.arange(len(children))
        if children.ndim == 2:  # both children kept, a leaf its own
            leaf = (children[:, 0] == here) & (children[:, 1] == here)
        else:
            leaf = kept["feature"] == -1
            children = np.column_stack([here + 1, children])
        features = int(kept["feature"].max(initial=0)) + 1
        converted = CompactForest._of(leaf=leaf, children=children, features=features, **kept)
        return {name: getattr(converted, name) for name in CompactForest.__slots__}

    def widened(self, X: np.ndarray) -> np.ndarray:
        """The columns the nodes read: X's features, a column of NaN, and those features
        with NaN as -inf."""
        X = np.asarray(X, dtype=np.float64)[:, : self.features]
        return np.column_stack([X, np.full(X.shape[0], np.nan), np.where(np.isnan(X), -np.inf, X)])

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predictions for the rows of X (n, features), as the regressor's predict gives."""
        X = self.widened(X)
        rows = np.arange(X.shape[0])[:, None]
        node = np.broadcast_to(self.roots, (X.shape[0], self.roots.size))
        for _ in range(self.depth):
            # NaN compares false (right); -inf, a missing value sent left, true
            left = X[rows, self.column[node]] <= self.value[node]
            node = np.where(left, node + 1, node + self.skip[node])
        leaves = self.value[node]
        # scikit-learn adds the trees one after another to the baseline: the same order
        # gives the same rounding (cumsum adds sequentially).
        ordered = np.column_stack([np.full(X.shape[0], self.baseline), leaves])
        return np.cumsum(ordered, axis=1)[:, -1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.roots, self.column, self.value, self.skip))
