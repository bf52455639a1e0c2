"""Participants: listing, detail, credit leaderboard, revocation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from coordinator.api.deps import DbSession, Operator, Reader, Settings
from coordinator.api.routes import IdPath, Limit, Offset, page_out
from coordinator.api.schemas import (
    ErrorOut,
    NodeReportIn,
    NodeReportOut,
    PageOut,
    ParticipantActionOut,
    ParticipantDetailOut,
    ParticipantOut,
    ReasonIn,
)
from coordinator.db import ParticipantState, UnitState
from coordinator.db.participants import (
    get_participant,
    held_columns,
    list_participants,
    revoke_participant,
)
from coordinator.db.stats import credit_leaderboard, list_units, reject_counts
from coordinator.node_reports import record_node_report

router = APIRouter(prefix="/participants", tags=["participants"])


@router.get("", response_model=PageOut[ParticipantOut], dependencies=[Reader])
def list_(
    session: DbSession,
    state: ParticipantState | None = None,
    offset: Offset = 0,
    limit: Limit = 100,
) -> PageOut[ParticipantOut]:
    """Participants ordered by id, optionally only those in ``state``."""
    page = list_participants(session, state=state, offset=offset, limit=limit)
    return page_out(page, ParticipantOut)


@router.get("/leaderboard", response_model=list[ParticipantOut], dependencies=[Reader])
def leaderboard(
    session: DbSession, limit: Annotated[int, Query(ge=1, le=1000)] = 20
) -> list[ParticipantOut]:
    """Participants with the most credit (tokens in accepted results), best first."""
    return [ParticipantOut.model_validate(p) for p in credit_leaderboard(session, limit=limit)]


@router.get("/{participant_id}", response_model=ParticipantDetailOut, dependencies=[Reader])
def detail(session: DbSession, participant_id: IdPath) -> ParticipantDetailOut:
    """One participant with its columns, rejections by reason and units in flight."""
    row = get_participant(session, participant_id=participant_id)
    leased = list_units(session, participant_id=row.id, state=UnitState.LEASED, limit=1)
    base = ParticipantOut.model_validate(row).model_dump()
    return ParticipantDetailOut(
        **base,
        max_params=row.max_params,
        columns=held_columns(session, participant_id=row.id),
        rejected_by_reason=reject_counts(session, participant_id=row.id),
        units_in_flight=leased.total,
    )


@router.post(
    "/{participant_id}/revoke", response_model=ParticipantActionOut, dependencies=[Operator]
)
def revoke(
    session: DbSession, participant_id: IdPath, body: ReasonIn | None = None
) -> ParticipantActionOut:
    """Revoke a participant: it gets no more work, its results are refused and its leases
    expire at once (their units are queued for others)."""
    reason = (body.reason if body else None) or "revoked by operator"
    row = revoke_participant(session, participant_id=participant_id, reason=reason)
    return ParticipantActionOut(participant=ParticipantOut.model_validate(row))


@router.post(
    "/{participant_id}/reports",
    response_model=NodeReportOut,
    status_code=201,
    responses={
        429: {
            "model": ErrorOut,
            "description": "this participant sent a report of this kind too recently",
            "headers": {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}},
        }
    },
)
def report(
    session: DbSession, settings: Settings, participant_id: IdPath, body: NodeReportIn
) -> NodeReportOut:
    """A volunteer's daemon reports why its node was refused (signed by its node key).

    Needs no API token: the signature by the enrolled key is the credential. A revoked
    participant's report is refused (409 ``participant_revoked``) and not recorded.
    """
    event = record_node_report(
        session,
        participant_id=participant_id,
        min_interval_s=settings.report_interval_s,
        **body.model_dump(),
    )
    session.flush()
    state = get_participant(session, participant_id=participant_id).state
    return NodeReportOut(event_id=event.id, participant_state=str(state))
