"""Stage jobs: a small state machine with its legal transitions enforced here."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.errors import Conflict, IllegalTransition, InvalidArgument, NotFound
from coordinator.db.events import log_event
from coordinator.db.models import StageJob
from coordinator.db.pagination import Page, check_page
from coordinator.db.types import StageJobState, utcnow

S = StageJobState
# done and cancelled are final; a failed job may be queued again (stages are resumable).
LEGAL_TRANSITIONS: dict[StageJobState, frozenset[StageJobState]] = {
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED}),
    S.RUNNING: frozenset({S.PAUSED, S.DONE, S.FAILED, S.CANCELLED}),
    S.PAUSED: frozenset({S.RUNNING, S.CANCELLED}),
    S.FAILED: frozenset({S.QUEUED}),
    S.DONE: frozenset(),
    S.CANCELLED: frozenset(),
}


def check_transition(current: StageJobState | str, target: StageJobState | str) -> None:
    """Raise :class:`IllegalTransition` unless ``current -> target`` is allowed."""
    current, target = StageJobState(current), StageJobState(target)
    if target not in LEGAL_TRANSITIONS[current]:
        allowed = ", ".join(sorted(s.value for s in LEGAL_TRANSITIONS[current])) or "none"
        raise IllegalTransition(
            f"stage job cannot go from {current.value} to {target.value} "
            f"(allowed from {current.value}: {allowed})"
        )


def create_stage_job(
    session: Session, *, stage: str, config: dict[str, Any], only_one_live: bool = False
) -> StageJob:
    """Queue a new job for ``stage`` with its JSON ``config``.

    Raises:
        InvalidArgument: empty stage name.
        Conflict: ``only_one_live`` and the stage already has a queued/running/paused job.
    """
    if not stage:
        raise InvalidArgument("stage name must be non-empty")
    if only_one_live and (live := live_stage_job(session, stage=stage)) is not None:
        raise Conflict(
            f"stage {stage} already has job {live.id} ({live.state}): pause, resume or "
            "cancel that one"
        )
    job = StageJob(stage=stage, config=dict(config), state=StageJobState.QUEUED, progress={})
    session.add(job)
    session.flush()
    log_event(
        session,
        kind="stage.queued",
        message=f"stage {stage} job {job.id} queued",
        data={"job_id": job.id},
    )
    return job


def live_stage_job(session: Session, *, stage: str) -> StageJob | None:
    """The newest queued, running or paused job of ``stage`` (locked), if any."""
    live = (StageJobState.QUEUED, StageJobState.RUNNING, StageJobState.PAUSED)
    query = select(StageJob).where(StageJob.stage == stage, StageJob.state.in_(live))
    return session.scalars(query.order_by(StageJob.id.desc()).limit(1).with_for_update()).first()


def get_stage_job(session: Session, *, job_id: int) -> StageJob:
    """The job with this id; raises :class:`NotFound`."""
    job = session.get(StageJob, job_id, with_for_update=True)
    if job is None:
        raise NotFound(f"no stage job with id {job_id}")
    return job


def transition_stage_job(
    session: Session,
    *,
    job_id: int,
    to: StageJobState,
    reason: str | None = None,
    progress: dict[str, Any] | None = None,
) -> StageJob:
    """Move a job to state ``to`` if legal; record ``reason`` and merge ``progress``.

    Raises:
        NotFound: no such job.
        IllegalTransition: the state machine forbids the move.
    """
    job = get_stage_job(session, job_id=job_id)
    check_transition(job.state, to)
    previous = job.state
    job.state = StageJobState(to)
    job.reason = reason
    if progress:
        job.progress = {**job.progress, **progress}
    job.updated_at = utcnow()
    session.flush()
    log_event(
        session,
        kind=f"stage.{job.state}",
        message=f"stage {job.stage} job {job.id}: {previous} -> {job.state}"
        + (f" ({reason})" if reason else ""),
        data={"job_id": job.id, "from": previous, "to": job.state},
    )
    return job


def update_stage_progress(session: Session, *, job_id: int, progress: dict[str, Any]) -> StageJob:
    """Merge ``progress`` into a running or paused job's progress JSON."""
    job = get_stage_job(session, job_id=job_id)
    if job.state not in (StageJobState.RUNNING, StageJobState.PAUSED):
        raise IllegalTransition(
            f"stage job {job_id} is {job.state}; only running or paused jobs report progress"
        )
    job.progress = {**job.progress, **progress}
    job.updated_at = utcnow()
    session.flush()
    return job


def list_stage_jobs(
    session: Session,
    *,
    stage: str | None = None,
    state: StageJobState | None = None,
    offset: int = 0,
    limit: int = 100,
) -> Page[StageJob]:
    """Jobs, newest first, optionally filtered by stage and state."""
    check_page(offset, limit)
    query = select(StageJob)
    if stage is not None:
        query = query.where(StageJob.stage == stage)
    if state is not None:
        query = query.where(StageJob.state == StageJobState(state))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(StageJob.id.desc()).offset(offset).limit(limit))
    return Page(items=list(rows.all()), total=total, offset=offset, limit=limit)
