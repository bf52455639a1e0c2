"""Storage of document routing: per-document losses and document -> column epochs.

The assignment itself is computed by :mod:`coordinator.routing`; this module stores
its inputs (losses reported by participants in scoring units) and its outputs (one
assignment per routing epoch), so routing survives a restart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.errors import Conflict, InvalidArgument
from coordinator.db.models import DocLoss, DocumentAssignment


def record_doc_losses(
    session: Session,
    *,
    losses: Iterable[tuple[str, int, float]],
    version: int,
    unit_id: str | None = None,
    participant_id: int | None = None,
) -> int:
    """Store ``(doc_id, column, loss)`` triples measured on model ``version``."""
    count = 0
    for doc_id, column, loss in losses:
        if not loss == loss or loss in (float("inf"), float("-inf")):
            raise InvalidArgument(f"loss of document {doc_id} column {column} is {loss}")
        session.add(
            DocLoss(
                doc_id=doc_id,
                column=int(column),
                loss=float(loss),
                version=version,
                unit_id=unit_id,
                participant_id=participant_id,
            )
        )
        count += 1
    session.flush()
    return count


def latest_epoch(session: Session) -> int | None:
    """The newest routing epoch, or ``None`` if documents were never assigned."""
    return session.scalar(select(func.max(DocumentAssignment.epoch)))


def save_assignment(
    session: Session,
    *,
    epoch: int,
    assignment: Mapping[str, int],
    scores: Mapping[str, float] | None = None,
) -> int:
    """Store a complete document -> column assignment as routing ``epoch``.

    Raises:
        Conflict: the epoch already exists (epochs are immutable; use a new one).
    """
    exists = session.scalar(
        select(func.count())
        .select_from(DocumentAssignment)
        .where(DocumentAssignment.epoch == epoch)
    )
    if exists:
        raise Conflict(f"routing epoch {epoch} already stored; save under epoch {epoch + 1}")
    scores = scores or {}
    session.add_all(
        DocumentAssignment(epoch=epoch, doc_id=doc, column=int(col), score=scores.get(doc))
        for doc, col in assignment.items()
    )
    session.flush()
    return len(assignment)


def assignment_of(session: Session, *, epoch: int) -> dict[str, int]:
    """The complete document -> column assignment stored as routing ``epoch``."""
    query = select(DocumentAssignment.doc_id, DocumentAssignment.column).where(
        DocumentAssignment.epoch == epoch
    )
    return {doc: int(col) for doc, col in session.execute(query)}


def latest_measurements(session: Session) -> dict[str, dict[int, float]]:
    """Per document, the losses of its newest scoring unit (every column it was scored on).

    Losses of one unit were measured together on one model, so they compare like for like;
    an older unit's losses of the same document are dropped, not mixed in.
    """
    query = select(DocLoss.doc_id, DocLoss.column, DocLoss.loss, DocLoss.unit_id).order_by(
        DocLoss.version, DocLoss.id
    )
    rows: dict[str, dict[int, float]] = {}
    source: dict[str, str | None] = {}
    for doc, column, loss, unit_id in session.execute(query):
        if source.get(doc, "") != unit_id:  # a newer unit: start the document's row again
            rows[doc], source[doc] = {}, unit_id
        rows[doc][int(column)] = float(loss)
    return rows
