"""Audit log: append events, read them back page by page."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.errors import InvalidArgument
from coordinator.db.models import Event
from coordinator.db.pagination import Page, check_page


def log_event(
    session: Session,
    *,
    kind: str,
    message: str,
    participant_id: int | None = None,
    unit_id: str | None = None,
    data: dict[str, Any] | None = None,
) -> Event:
    """Append one event to the audit log (in the caller's transaction).

    Args:
        session: open session.
        kind: short dotted kind, e.g. ``"lease.expired"``.
        message: human-readable line for the dashboard.
        participant_id: participant concerned, if any.
        unit_id: work unit concerned, if any.
        data: JSON-serialisable details.

    Returns:
        The new (flushed) event.
    """
    if not kind:
        raise InvalidArgument("event kind must be a non-empty string such as 'lease.expired'")
    event = Event(
        kind=kind,
        message=message,
        participant_id=participant_id,
        unit_id=unit_id,
        data=dict(data or {}),
    )
    session.add(event)
    session.flush()
    return event


def list_events(
    session: Session,
    *,
    after_id: int | None = None,
    offset: int = 0,
    limit: int = 100,
    kind: str | None = None,
    participant_id: int | None = None,
) -> Page[Event]:
    """Events in id order, filtered, paginated by ``after_id`` (cursor) or ``offset``.

    Args:
        session: open session.
        after_id: only events with a larger id (cursor pagination; combine with limit).
        offset: rows to skip (offset pagination).
        limit: page size, 1..1000.
        kind: only events of this kind.
        participant_id: only events about this participant.

    Returns:
        A :class:`Page`; ``total`` counts all rows matching the filters (not the cursor).
    """
    check_page(offset, limit)
    query = select(Event)
    if kind is not None:
        query = query.where(Event.kind == kind)
    if participant_id is not None:
        query = query.where(Event.participant_id == participant_id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    if after_id is not None:
        query = query.where(Event.id > after_id)
    rows = session.scalars(query.order_by(Event.id).offset(offset).limit(limit)).all()
    return Page(items=list(rows), total=total, offset=offset, limit=limit)
