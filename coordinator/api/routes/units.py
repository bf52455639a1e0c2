"""Work units (leases) and results."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from coordinator.api.deps import DbSession, Reader
from coordinator.api.routes import MAX_ID, Limit, Offset, page_out
from coordinator.api.schemas import PageOut, ResultOut, UnitDetailOut, UnitOut
from coordinator.db import NotFound, RejectReason, ResultState, UnitState
from coordinator.db.stats import find_unit, list_results, list_units

router = APIRouter(tags=["units"], dependencies=[Reader])


@router.get("/units", response_model=PageOut[UnitOut])
def units(
    session: DbSession,
    state: UnitState | None = None,
    participant_id: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
    stage: str | None = None,
    offset: Offset = 0,
    limit: Limit = 100,
) -> PageOut[UnitOut]:
    """Work units, newest first, filtered by state, participant and stage."""
    page = list_units(
        session, state=state, participant_id=participant_id, stage=stage, offset=offset, limit=limit
    )
    return page_out(page, UnitOut)


@router.get("/units/{unit_id}", response_model=UnitDetailOut)
def unit(session: DbSession, unit_id: Annotated[str, Path(max_length=64)]) -> UnitDetailOut:
    """One work unit with its documents and stage parameters."""
    row = find_unit(session, unit_id=unit_id)
    if row is None:
        raise NotFound(f"no work unit {unit_id!r}")
    return UnitDetailOut.model_validate(row)


@router.get("/results", response_model=PageOut[ResultOut])
def results(
    session: DbSession,
    state: ResultState | None = None,
    participant_id: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
    reason: RejectReason | None = None,
    offset: Offset = 0,
    limit: Limit = 100,
) -> PageOut[ResultOut]:
    """Stored results, newest first (``state=rejected`` lists rejections with reasons)."""
    page = list_results(
        session,
        state=state,
        participant_id=participant_id,
        reject_reason=None if reason is None else reason.value,
        offset=offset,
        limit=limit,
    )
    return page_out(page, ResultOut)
