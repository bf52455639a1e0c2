"""Stage jobs: create, start, pause, resume, cancel (the state machine decides)."""

from __future__ import annotations

from fastapi import APIRouter

from coordinator.api.deps import DbSession, Operator, Reader
from coordinator.api.routes import IdPath, Limit, Offset, page_out
from coordinator.api.schemas import PageOut, ReasonIn, StageJobCreate, StageJobOut
from coordinator.db import IllegalTransition, StageJobState
from coordinator.db.stage_jobs import (
    create_stage_job,
    get_stage_job,
    list_stage_jobs,
    transition_stage_job,
)

router = APIRouter(prefix="/stage-jobs", tags=["stage jobs"])

# action -> (states it applies to, target). start and resume both lead to running, but
# each only from its own state, so a client cannot resume a job it meant to start.
ACTIONS: dict[str, tuple[frozenset[StageJobState], StageJobState]] = {
    "start": (frozenset({StageJobState.QUEUED}), StageJobState.RUNNING),
    "pause": (frozenset({StageJobState.RUNNING}), StageJobState.PAUSED),
    "resume": (frozenset({StageJobState.PAUSED}), StageJobState.RUNNING),
    "retry": (frozenset({StageJobState.FAILED}), StageJobState.QUEUED),
    "cancel": (
        frozenset({StageJobState.QUEUED, StageJobState.RUNNING, StageJobState.PAUSED}),
        StageJobState.CANCELLED,
    ),
}


@router.get("", response_model=PageOut[StageJobOut], dependencies=[Reader])
def jobs(
    session: DbSession,
    stage: str | None = None,
    state: StageJobState | None = None,
    offset: Offset = 0,
    limit: Limit = 100,
) -> PageOut[StageJobOut]:
    """Stage jobs, newest first."""
    page = list_stage_jobs(session, stage=stage, state=state, offset=offset, limit=limit)
    return page_out(page, StageJobOut)


@router.get("/{job_id}", response_model=StageJobOut, dependencies=[Reader])
def job(session: DbSession, job_id: IdPath) -> StageJobOut:
    """One stage job."""
    return StageJobOut.model_validate(get_stage_job(session, job_id=job_id))


@router.post(
    "",
    response_model=StageJobOut,
    status_code=201,
    dependencies=[Operator],
    responses={409: {"description": "the stage already has a live job"}},
)
def create(session: DbSession, body: StageJobCreate) -> StageJobOut:
    """Queue a job for federated stage ``stage3`` or ``stage4`` (one live job per stage);
    with ``start: true`` it is moved to running at once. ``coordinator serve`` runs the
    stage as this job: pausing it stops new leases, cancelling it ends the stage."""
    row = create_stage_job(session, stage=body.stage, config=body.config, only_one_live=True)
    if body.start:
        row = transition_stage_job(session, job_id=row.id, to=StageJobState.RUNNING)
    return StageJobOut.model_validate(row)


def _act(session: DbSession, job_id: int, action: str, body: ReasonIn | None) -> StageJobOut:
    sources, target = ACTIONS[action]
    row = get_stage_job(session, job_id=job_id)
    if StageJobState(row.state) not in sources:
        allowed = ", ".join(sorted(s.value for s in sources))
        raise IllegalTransition(
            f"cannot {action} stage job {job_id}: it is {row.state} ({action} needs {allowed})"
        )
    reason = body.reason if body else None
    return StageJobOut.model_validate(
        transition_stage_job(session, job_id=job_id, to=target, reason=reason)
    )


def _route(action: str) -> None:
    def handler(session: DbSession, job_id: IdPath, body: ReasonIn | None = None) -> StageJobOut:
        return _act(session, job_id, action, body)

    handler.__name__ = f"{action}_job"
    handler.__doc__ = f"{action.capitalize()} a stage job (409 if its state does not allow it)."
    router.post(
        f"/{{job_id}}/{action}",
        response_model=StageJobOut,
        dependencies=[Operator],
        summary=f"{action.capitalize()} a stage job",
        responses={409: {"description": "illegal transition"}},
    )(handler)


for _action in ACTIONS:
    _route(_action)
