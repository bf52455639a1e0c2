"""Document features, the column assignment, and the initial assignment of a stage.

At the start of a federated stage every expert is a clone of the same FFN, so losses
cannot tell columns apart yet: documents are clustered instead (capacity-balanced
k-means over their mean token embedding under the stage-2 model), which is the
c-BTM recipe. Validation documents are routed to a column by the same
:class:`~coordinator.routing.assign.CentroidRouter` (:mod:`coordinator.validation`);
participants' losses refine the training documents' labels later
(:mod:`coordinator.routing.rescoring`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coordinator.routing.assign import CentroidRouter, balanced_kmeans
from shared_model.data import DocumentDataset
from shared_model.model import PerspectiveModel


def document_features(emb: np.ndarray, dataset: DocumentDataset) -> np.ndarray:
    """Mean of ``emb`` rows over each document's tokens, ``[D, d_model]`` (float64).

    ``emb`` is the stage-2 input embedding, frozen in the :class:`ColumnAssignment` so
    that features of new documents stay comparable with the centroids while training
    moves the model's own embedding.
    """
    return np.stack(
        [emb[tokens.astype(np.int64)].mean(0) for _, tokens in dataset.iter_documents()]
    )


@dataclass
class ColumnAssignment:
    """Training documents per column plus the router for unseen documents."""

    doc_ids: np.ndarray  # [D] training document ids
    labels: np.ndarray  # [D] column per training document
    router: CentroidRouter
    embedding: np.ndarray  # [V, d] frozen feature embedding

    def route(self, dataset: DocumentDataset) -> np.ndarray:
        """Column of every document of ``dataset`` (e.g. validation documents)."""
        return self.router.route(document_features(self.embedding, dataset))

    def documents(self, column: int) -> list[int]:
        """Training document ids assigned to ``column``."""
        return [int(d) for d in self.doc_ids[self.labels == column]]


def initial_assignment(
    model: PerspectiveModel, train: DocumentDataset, n_columns: int, seed: int = 0
) -> ColumnAssignment:
    """Cluster training documents into ``n_columns`` balanced groups."""
    emb = model.tok_emb.weight.detach().double().numpy().copy()
    labels, router = balanced_kmeans(document_features(emb, train), n_columns, seed=seed)
    return ColumnAssignment(train.doc_ids.copy(), labels, router, emb)
