"""Document-level routing: capacity-balanced assignment of documents to expert columns.

In the federated regime (DESIGN §3) the coordinator assigns every training document to
one expert column, so a participant needs only the shared layers plus its own columns.
The assignment is capacity-balanced — no column gets more than ``ceil(D / C · slack)``
documents — which *is* the balance term of the federated stages.

Two sources of preference are supported, both solved by the same greedy balanced
assignment:

* **features** (start of stage 3, when all experts are still identical): balanced
  k-means over document feature vectors (mean token embedding of the document);
* **losses** (later): per-document losses of each column, measured by participants
  in scoring units; a document goes to the column that predicts it best, subject to
  capacity.

The :class:`CentroidRouter` routes unseen documents (validation, new data) to the
nearest column centroid. The federation loop refines training documents' labels from
participants' losses incrementally (:mod:`coordinator.routing.rescoring`); it does not refit the
router (``CentroidRouter.fit`` could, given the training features).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class RoutingError(ValueError):
    """The routing inputs are inconsistent (shapes, empty columns, non-finite values)."""


def balanced_assign(cost: np.ndarray, slack: float = 1.0) -> np.ndarray:
    """Assign each row (document) to a column minimising cost under equal capacities.

    Greedy by regret: documents whose best column is much better than their second
    best choose first; each column accepts at most ``ceil(D / C * slack)`` documents.

    Args:
        cost: ``[D, C]`` finite costs (lower is better).
        slack: capacity multiplier, >= 1.

    Returns:
        ``[D]`` int64 column index per document.
    """
    if cost.ndim != 2 or cost.shape[1] == 0:
        raise RoutingError(f"cost must be [documents, columns] with >= 1 column, got {cost.shape}")
    if not np.isfinite(cost).all():
        raise RoutingError("cost contains NaN or infinite values")
    if slack < 1.0:
        raise RoutingError(f"slack must be >= 1, got {slack}")
    n_docs, n_cols = cost.shape
    capacity = max(1, math.ceil(n_docs / n_cols * slack))
    order = np.argsort(cost, axis=1, kind="stable")
    if n_cols > 1:
        sorted_cost = np.take_along_axis(cost, order[:, :2], axis=1)
        regret = sorted_cost[:, 1] - sorted_cost[:, 0]
    else:
        regret = np.zeros(n_docs)
    load = np.zeros(n_cols, dtype=np.int64)
    out = np.empty(n_docs, dtype=np.int64)
    for doc in np.argsort(-regret, kind="stable"):
        for col in order[doc]:
            if load[col] < capacity:
                out[doc] = col
                load[col] += 1
                break
    return out


@dataclass
class CentroidRouter:
    """Routes a document to the column whose centroid is nearest to its features."""

    centroids: np.ndarray  # [C, F]

    def route(self, features: np.ndarray) -> np.ndarray:
        """Column per document for ``features`` of shape ``[D, F]``."""
        return np.argmin(_sq_dist(features, self.centroids), axis=1)

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, n_columns: int) -> CentroidRouter:
        """Centroid of each column's documents (empty columns keep the global mean)."""
        centroids = np.repeat(features.mean(axis=0, keepdims=True), n_columns, axis=0)
        for col in range(n_columns):
            members = features[labels == col]
            if len(members):
                centroids[col] = members.mean(axis=0)
        return cls(centroids=centroids)


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return (x * x).sum(1, keepdims=True) - 2.0 * x @ c.T + (c * c).sum(1)[None, :]


def balanced_kmeans(
    features: np.ndarray, n_columns: int, *, iters: int = 20, seed: int = 0, slack: float = 1.0
) -> tuple[np.ndarray, CentroidRouter]:
    """Capacity-balanced k-means: every column gets about ``D / C`` documents.

    Returns:
        ``(labels [D], router)``.
    """
    if features.ndim != 2 or len(features) < n_columns:
        raise RoutingError(
            f"need [documents, features] with at least {n_columns} documents, got {features.shape}"
        )
    features = features.astype(np.float64)
    rng = np.random.default_rng(seed)
    centroids = features[rng.choice(len(features), n_columns, replace=False)].copy()
    labels = np.full(len(features), -1)
    for _ in range(iters):
        new = balanced_assign(_sq_dist(features, centroids), slack)
        if np.array_equal(new, labels):
            break
        labels = new
        centroids = CentroidRouter.fit(features, labels, n_columns).centroids
    return labels, CentroidRouter.fit(features, labels, n_columns)


def reassign_by_loss(losses: np.ndarray, slack: float = 1.1) -> np.ndarray:
    """Documents to the columns that model them best (loss matrix ``[D, C]``), balanced."""
    return balanced_assign(losses, slack)
