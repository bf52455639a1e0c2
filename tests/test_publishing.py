"""Publishing versions (coordinator.publishing): error feedback and what a version holds."""

from __future__ import annotations

import torch

from coordinator.aggregation import ColumnAggregator, OuterOptimizer, SharedAggregator
from coordinator.publishing import Publisher
from shared_model.blobs import BlobStore
from shared_model.wire.perspective.v1 import control_pb2


def test_publish_error_feedback_keeps_unsent_part(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    columns = ColumnAggregator(
        {0: {"w": torch.zeros(3)}, 1: {"w": torch.zeros(3)}}, version=0, max_staleness=8,
        staleness_grace=0,
    )  # fmt: skip
    shared = SharedAggregator(
        {"s": torch.zeros(2)}, buffer_size=2, outer=OuterOptimizer(1.0, 0.0), trim=0,
        staleness_grace=0,
    )  # fmt: skip
    publisher = Publisher(
        store,
        columns,
        shared,
        version=0,
        codec="ternary",
        column_codec="ternary",
        shared_threshold=0.7,
        checkpoint_every=10,
    )
    columns.apply(0, {"w": torch.tensor([1.0, 0.1, -1.0])}, 0, 0)

    # Ternary is lossy here: tau = 0.7 * mean|w| = 0.49 drops the 0.1.
    assert publisher.publish() == 1
    manifest = control_pb2.VersionManifest.FromString(store.get(publisher.manifests[1].content_id))
    assert list(manifest.columns) == [0]  # only the changed column is sent
    assert columns.changed() == []
    assert torch.allclose(columns.published(0)["w"], torch.tensor([1.0, 0.0, -1.0]))
    # The unsent 0.1 is still in master - published and goes with a later version.
    assert torch.allclose(
        columns.masters[0]["w"] - columns.published(0)["w"], torch.tensor([0, 0.1, 0])
    )
