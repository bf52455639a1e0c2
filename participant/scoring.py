"""Scoring: a unit's per-document losses under every column the participant holds.

A unit with ``score_documents`` set asks the participant to measure, after training, how
well each of its columns models each of the unit's documents (DESIGN §3: the coordinator
routes documents "using the router and per-document losses that participants report in
scoring units"). The loss is the model's own LM loss (:func:`shared_model.losses.lm_loss`,
nats per token) over the document followed by ``<|endoftext|>`` — as in the training
stream — truncated to its first ``seq_len + 1`` tokens (``seq_len`` predictions), with the
document forced through column *c* exactly as column-mode training routes a sequence.

Cost: ``min(documents, MAX_SCORED_DOCUMENTS) × columns`` forward passes of one
``seq_len`` sequence each, batched, without gradients — small next to ``steps`` training
steps of ``batch_size`` sequences with a backward pass.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from shared_model.data import DocumentDataset
from shared_model.losses import lm_loss
from shared_model.model import PerspectiveModel
from shared_model.wire.perspective.v1 import federation_pb2

#: Most documents a unit scores (the first ones, in the unit's order): bounds its cost.
MAX_SCORED_DOCUMENTS = 64


def scoring_sequence(tokens: np.ndarray, eot_id: int, seq_len: int) -> torch.Tensor | None:
    """The ``[1, <= seq_len + 1]`` int64 sequence a document is scored on (None: too short)."""
    seq = np.concatenate([tokens[: seq_len + 1], np.array([eot_id], dtype=tokens.dtype)])
    seq = seq[: seq_len + 1].astype(np.int64)
    return torch.from_numpy(seq)[None, :] if len(seq) >= 2 else None


@torch.no_grad()
def document_losses(
    model: PerspectiveModel,
    data: DocumentDataset,
    doc_ids: Iterable[int],
    columns: list[int],
    *,
    seq_len: int,
    batch_size: int,
    device: torch.device,
) -> list[federation_pb2.DocumentLoss]:
    """Loss of each document under each of ``columns`` (one entry per pair).

    Args:
        model: the participant's model holding ``columns`` (left in its previous mode).
        data: the training documents.
        doc_ids: documents to score; the first :data:`MAX_SCORED_DOCUMENTS` distinct ones.
        columns: columns to score every document under.
        seq_len: predictions per document, at most.
        batch_size: sequences per forward pass.
        device: where ``model`` lives.
    """
    ids = list(dict.fromkeys(int(d) for d in doc_ids))[:MAX_SCORED_DOCUMENTS]
    by_length: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for doc, tokens in data.subset(ids).iter_documents():
        seq = scoring_sequence(tokens, data.eot_id, seq_len)
        if seq is not None:  # sequences of one length share a batch (no padding)
            by_length.setdefault(seq.shape[1], []).append((doc, seq))
    was_training = model.training
    model.eval()
    out = []
    try:
        for group in by_length.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                batch = torch.cat([seq for _, seq in chunk]).to(device)
                for c in columns:
                    out += _chunk_losses(model, batch, [d for d, _ in chunk], c)
    finally:
        model.train(was_training)
    return out


def _chunk_losses(model, batch: torch.Tensor, docs: list[int], column: int):
    cols = torch.full((batch.shape[0],), column, dtype=torch.long, device=batch.device)
    logits = model(batch[:, :-1], columns=cols).logits
    targets = batch[:, 1:]
    return [
        federation_pb2.DocumentLoss(
            doc=doc, column=column, loss=float(lm_loss(logits[i], targets[i]))
        )
        for i, doc in enumerate(docs)
    ]
