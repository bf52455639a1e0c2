"""Document features, the initial column assignment, and validation in column mode.

At the start of a federated stage every expert is a clone of the same FFN, so losses
cannot tell columns apart yet: documents are clustered instead (capacity-balanced
k-means over their mean token embedding under the stage-2 model), which is the
c-BTM recipe. Validation documents are routed to a column by the same
:class:`~coordinator.routing.CentroidRouter`, and the validation loss of the published
model is measured in column mode — exactly what a participant's column sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from coordinator.routing import CentroidRouter, balanced_kmeans
from shared_model.data import DocumentDataset
from shared_model.model import PerspectiveModel

EVAL_SEED = 1_000_003


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


@torch.no_grad()
def column_val_loss(
    model: PerspectiveModel,
    val: DocumentDataset,
    assignment: ColumnAssignment,
    *,
    batch_size: int,
    seq_len: int,
    batches: int,
) -> float:
    """Validation LM loss with each validation document routed to one column.

    Sequences are drawn per column in proportion to that column's validation tokens, with
    a fixed seed, so successive evaluations of different versions compare like for like.
    """
    cols = assignment.route(val)
    by_col = {}
    for c in np.unique(cols):
        ids = [int(d) for d, col in zip(val.doc_ids, cols, strict=True) if col == c]
        subset = val.subset(ids)
        if subset.n_tokens > seq_len + 1:
            by_col[int(c)] = subset
    if not by_col:
        raise ValueError("no validation column has enough tokens for one sequence")
    weights = np.array([ds.n_tokens for ds in by_col.values()], dtype=np.float64)
    order = list(by_col)
    rng = np.random.default_rng(EVAL_SEED)
    model.eval()
    losses = []
    for i in range(batches):
        picks = rng.choice(len(order), size=batch_size, p=weights / weights.sum())
        rows = [
            by_col[order[p]].batch(i * batch_size + j, 1, seq_len, EVAL_SEED)
            for j, p in enumerate(picks)
        ]
        batch = torch.cat(rows)
        columns = torch.tensor([order[p] for p in picks], dtype=torch.long)
        out = model(batch[:, :-1], targets=batch[:, 1:], columns=columns)
        losses.append(float(out.loss))
    return float(np.mean(losses))
