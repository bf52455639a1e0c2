"""Document routing: balanced assignment, balanced k-means, centroid router, unit documents."""

import math

import numpy as np
import pytest

from coordinator.routing import unit_documents
from coordinator.routing.assign import (
    CentroidRouter,
    RoutingError,
    balanced_assign,
    balanced_kmeans,
    reassign_by_loss,
)


def test_balanced_assign_respects_capacity_and_preference():
    rng = np.random.default_rng(0)
    cost = rng.random((100, 4))
    cost[:, 0] -= 1.0  # everyone prefers column 0
    labels = balanced_assign(cost)
    counts = np.bincount(labels, minlength=4)
    assert counts.max() <= math.ceil(100 / 4)
    assert counts.sum() == 100
    # The preferred column is filled to capacity, with the documents that prefer it most.
    assert counts[0] == math.ceil(100 / 4)
    advantage = np.sort(cost[:, 1:], axis=1)[:, 0] - cost[:, 0]
    assert advantage[labels == 0].mean() > advantage[labels != 0].mean()
    # And it costs less than any of 20 random balanced assignments.
    total = cost[np.arange(100), labels].sum()
    for _ in range(20):
        random_labels = rng.permutation(np.arange(100) % 4)
        assert total < cost[np.arange(100), random_labels].sum()


def test_balanced_assign_gives_free_choice_when_capacity_allows():
    cost = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    assert balanced_assign(cost).tolist() == [0, 1, 0, 1]


def test_balanced_kmeans_recovers_clusters():
    rng = np.random.default_rng(1)
    centers = np.array([[0, 0], [10, 0], [0, 10]], dtype=float)
    truth = np.repeat(np.arange(3), 30)
    feats = centers[truth] + rng.normal(0, 0.5, (90, 2))
    labels, router = balanced_kmeans(feats, 3, seed=0)
    # Same partition up to relabelling.
    for c in range(3):
        assert len(set(labels[truth == c])) == 1
    assert (router.route(feats) == labels).all()


def test_reassign_by_loss_picks_lowest_loss_column():
    losses = np.array([[3.0, 1.0], [1.0, 3.0], [2.0, 2.5], [2.5, 2.0]])
    assert reassign_by_loss(losses).tolist() == [1, 0, 0, 1]


def test_centroid_router_fit_keeps_empty_columns_finite():
    feats = np.array([[0.0, 0.0], [1.0, 1.0]])
    router = CentroidRouter.fit(feats, np.array([0, 0]), 3)
    assert np.isfinite(router.centroids).all()


@pytest.mark.parametrize(
    "cost", [np.zeros((3, 0)), np.array([[np.nan, 1.0]]), np.zeros(3)], ids=["nocol", "nan", "1d"]
)
def test_bad_inputs_raise_routing_error(cost):
    with pytest.raises(RoutingError):
        balanced_assign(cost)


def test_unit_documents_round_trip_between_lease_row_and_wire():
    stored = unit_documents.stored([(3, 11), (5, 2)])
    assert stored == ["3:11", "5:2"]  # the form work_units.docs has always held
    assert unit_documents.pairs(stored) == [(3, 11), (5, 2)]
    assert [(r.column, r.doc) for r in unit_documents.refs(stored)] == [(3, 11), (5, 2)]
    with pytest.raises(unit_documents.UnitDocumentsError, match="'<column>:<doc>'"):
        unit_documents.pairs(["doc-7"])
