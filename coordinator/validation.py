"""Validation of a published model in column mode: exactly what a participant's column sees.

Validation documents are routed to a column by the assignment's centroid router
(:meth:`~coordinator.routing.assignment.ColumnAssignment.route`) and each sequence is run
through its document's column only.
"""

from __future__ import annotations

import numpy as np
import torch

from coordinator.routing.assignment import ColumnAssignment
from shared_model.data import DocumentDataset
from shared_model.model import PerspectiveModel

EVAL_SEED = 1_000_003


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
