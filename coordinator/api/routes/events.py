"""The audit log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from coordinator.api.deps import DbSession, Reader
from coordinator.api.routes import MAX_ID, Limit, Offset
from coordinator.api.schemas import EventOut, EventPageOut
from coordinator.db.events import list_events

router = APIRouter(tags=["events"], dependencies=[Reader])


@router.get("/events", response_model=EventPageOut)
def events(
    session: DbSession,
    after_id: Annotated[int | None, Query(ge=0, le=MAX_ID, description="cursor")] = None,
    kind: Annotated[str | None, Query(max_length=64)] = None,
    participant_id: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
    offset: Offset = 0,
    limit: Limit = 100,
) -> EventPageOut:
    """Events in id order; pass the returned ``next_after_id`` as ``after_id`` to go on."""
    page = list_events(
        session,
        after_id=after_id,
        kind=kind,
        participant_id=participant_id,
        offset=offset,
        limit=limit,
    )
    items = [EventOut.model_validate(e) for e in page.items]
    return EventPageOut(
        items=items,
        total=page.total,
        offset=page.offset,
        limit=page.limit,
        next_after_id=items[-1].id if items else after_id,
    )
