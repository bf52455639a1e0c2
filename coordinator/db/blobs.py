"""Blob bookkeeping: which content ids the coordinator relies on, with refcounts.

The bytes live in the content-addressed blob store (``shared_model.blobs``); this
table says which blobs are still referenced (versions, results, shards), so garbage
collection never deletes something a published version needs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.errors import Conflict, InvalidArgument, NotFound
from coordinator.db.models import Blob


def register_blob(session: Session, *, content_id: str, size: int, kind: str) -> Blob:
    """Record a blob (idempotent); raises :class:`Conflict` if the size disagrees."""
    if size < 0:
        raise InvalidArgument(f"blob size must be >= 0, got {size}")
    row = session.get(Blob, content_id)
    if row is not None:
        if row.size != size:
            raise Conflict(f"blob {content_id} is recorded with size {row.size}, not {size}")
        return row
    row = Blob(content_id=content_id, size=size, kind=kind, refcount=0)
    session.add(row)
    session.flush()
    return row


def change_refs(session: Session, *, content_ids: Iterable[str], delta: int) -> None:
    """Add ``delta`` (+1 reference, -1 release) to each blob's refcount.

    Raises:
        NotFound: a content id was never registered.
        Conflict: a refcount would go negative.
    """
    for content_id in content_ids:
        row = session.get(Blob, content_id, with_for_update=True)
        if row is None:
            raise NotFound(f"blob {content_id} is not registered; call register_blob first")
        if row.refcount + delta < 0:
            raise Conflict(f"blob {content_id} has refcount {row.refcount}; cannot add {delta}")
        row.refcount += delta
    session.flush()


def unreferenced_blobs(session: Session, *, older_than: dt.datetime) -> list[Blob]:
    """Blobs with refcount 0 created before ``older_than`` (candidates for GC)."""
    query = select(Blob).where(Blob.refcount == 0, Blob.created_at < older_than)
    return list(session.scalars(query.order_by(Blob.created_at)).all())


def forget_blob(session: Session, *, content_id: str) -> None:
    """Delete an unreferenced blob's row (after the store deleted the bytes)."""
    row = session.get(Blob, content_id)
    if row is None:
        return
    if row.refcount:
        raise Conflict(f"blob {content_id} is still referenced {row.refcount} time(s)")
    session.delete(row)
    session.flush()
