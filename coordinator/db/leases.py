"""Work-unit (lease) rows: create, hand out queued ones, expire, fail, re-issue, check.

A re-issued unit is a *copy* with a new ``unit_id`` (``attempt + 1``,
``reissued_from`` = the original), never the original re-opened: a late answer to
the original is judged as the original's (and withdraws the copy if it is still queued),
never confused with the new lease.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.errors import IllegalTransition, InvalidArgument, NotFound
from coordinator.db.events import log_event
from coordinator.db.models import ColumnLineage, Participant, WorkUnit
from coordinator.db.types import ParticipantState, RejectReason, UnitState, utcnow

FINAL_STATES = frozenset({UnitState.DONE, UnitState.REJECTED, UnitState.EXPIRED, UnitState.FAILED})


def _check_unit_fields(columns: Sequence[int], steps: int, base_version: int) -> None:
    if not columns or any(int(c) < 0 for c in columns):
        raise InvalidArgument(f"columns must be a non-empty list of indices >= 0, got {columns}")
    if len(set(columns)) != len(columns):
        raise InvalidArgument(f"columns contain duplicates: {columns}")
    if steps < 1:
        raise InvalidArgument(f"steps must be >= 1, got {steps}")
    if base_version < 0:
        raise InvalidArgument(f"base_version must be >= 0, got {base_version}")


def find_unit(session: Session, *, unit_id: str) -> WorkUnit | None:
    """The unit with this id (row-locked on PostgreSQL), or ``None``."""
    return session.get(WorkUnit, unit_id, with_for_update=True)


def get_unit(session: Session, *, unit_id: str) -> WorkUnit:
    """The unit with this id (row-locked on PostgreSQL); raises :class:`NotFound`."""
    unit = find_unit(session, unit_id=unit_id)
    if unit is None:
        raise NotFound(f"no work unit {unit_id!r}")
    return unit


def lease_problem(
    unit: WorkUnit, *, base_version: int | None, now: dt.datetime, newest: int | None = None
) -> tuple[RejectReason, str] | None:
    """Why a result cannot answer ``unit`` now, or ``None``: the lease is live, same base.

    ``EXPIRED_LEASE`` when the unit is no longer leased (done, failed, rejected) or its
    lease expired and the result states no usable base; ``BASE_MISMATCH`` when the result
    was built on another version (``None``: unknown) than the lease's, or, with ``newest``
    (a unit that syncs to the newest version when it starts:
    ``WorkUnit.start_from_newest``), on one outside the lease's base ``..`` ``newest``. An
    expired lease answered on a usable base is judged like a live one
    (:func:`withdraw_copy` then drops its queued copy).
    """
    late = unit.state == UnitState.EXPIRED or (
        unit.state == UnitState.LEASED and unit.deadline is not None and unit.deadline < now
    )
    usable = base_version is not None and (
        base_version == unit.base_version
        or (newest is not None and unit.base_version < base_version <= newest)
    )
    if late and usable:
        # Issue 16: a result that arrives after its lease expired (the coordinator was down,
        # or the node was slow) is still judged; the payload checks decide whether its base
        # is usable (the staleness bound).
        return None
    if unit.state not in (UnitState.LEASED, UnitState.EXPIRED):
        return RejectReason.EXPIRED_LEASE, f"unit is {unit.state}, no longer leased"
    if late:
        return RejectReason.EXPIRED_LEASE, "lease expired and the result states no usable base"
    if base_version is None or usable:
        return None
    allowed = f"{unit.base_version}..{newest}" if newest is not None else str(unit.base_version)
    return (
        RejectReason.BASE_MISMATCH,
        f"result built on version {base_version}, the lease allows {allowed}",
    )


def create_lease(
    session: Session,
    *,
    participant_id: int,
    stage: str,
    base_version: int,
    columns: Sequence[int],
    docs: Sequence[str],
    steps: int,
    params: dict[str, Any],
    lease_seconds: float,
    now: dt.datetime | None = None,
) -> WorkUnit:
    """Insert a new unit already leased to ``participant_id`` until now + lease_seconds."""
    _check_unit_fields(columns, steps, base_version)
    now = now or utcnow()
    unit = WorkUnit(
        unit_id=str(uuid.uuid4()),
        participant_id=participant_id,
        stage=stage,
        base_version=base_version,
        columns=[int(c) for c in columns],
        docs=list(docs),
        steps=steps,
        params=dict(params),
        state=UnitState.LEASED,
        created_at=now,
        leased_at=now,
        deadline=now + dt.timedelta(seconds=lease_seconds),
        attempt=1,
        excluded_participants=[],
    )
    session.add(unit)
    session.flush()
    log_event(
        session,
        kind="lease.created",
        message=f"{stage} unit, columns {unit.columns}",
        participant_id=participant_id,
        unit_id=unit.unit_id,
        data={"base_version": base_version, "steps": steps},
    )
    return unit


def _in_flight(participant_id: int, now: dt.datetime) -> tuple:
    return (
        WorkUnit.participant_id == participant_id,
        WorkUnit.state == UnitState.LEASED,
        WorkUnit.deadline >= now,
    )


def count_in_flight(session: Session, *, participant_id: int, now: dt.datetime) -> int:
    """Units leased to the participant whose deadline has not passed."""
    query = select(func.count()).select_from(WorkUnit).where(*_in_flight(participant_id, now))
    return session.scalar(query) or 0


def steps_in_flight(session: Session, *, participant_id: int, now: dt.datetime) -> list[int]:
    """Inner steps of each unit leased to the participant whose deadline has not passed."""
    query = select(WorkUnit.steps).where(*_in_flight(participant_id, now))
    return [int(steps) for steps in session.scalars(query)]


def requeue_copy(
    session: Session, *, unit: WorkUnit, reason: str, max_attempts: int, exclude_holder: bool = True
) -> WorkUnit | None:
    """Queue a copy of ``unit``, or ``None`` past max_attempts.

    With ``exclude_holder`` the copy is for another participant (the holder failed it or
    let it expire). Without, the failure was not the holder's doing (its Flower run was
    lost, its node missed a heartbeat): the holder may take the copy back, and others
    leave it to the holder for a while (:func:`lease_queued`): it holds the unit's
    columns, anyone else downloads them (in stage 4 also their teacher).
    """
    if unit.attempt >= max_attempts:
        log_event(
            session,
            kind="unit.abandoned",
            message=f"unit gave up after {unit.attempt} attempts: {reason}",
            participant_id=unit.participant_id,
            unit_id=unit.unit_id,
        )
        return None
    excluded = list(unit.excluded_participants or [])
    if exclude_holder and unit.participant_id is not None and unit.participant_id not in excluded:
        excluded.append(unit.participant_id)
    copy = WorkUnit(
        unit_id=str(uuid.uuid4()),
        participant_id=None,
        stage=unit.stage,
        base_version=unit.base_version,
        columns=list(unit.columns),
        docs=list(unit.docs),
        steps=unit.steps,
        params=dict(unit.params),
        state=UnitState.QUEUED,
        attempt=unit.attempt + 1,
        reissued_from=unit.unit_id,
        excluded_participants=excluded,
    )
    session.add(copy)
    session.flush()
    log_event(
        session,
        kind="unit.requeued",
        message=f"re-queued as {copy.unit_id}: {reason}",
        participant_id=unit.participant_id,
        unit_id=unit.unit_id,
        data={"new_unit_id": copy.unit_id, "attempt": copy.attempt},
    )
    return copy


def withdraw_copy(session: Session, *, unit: WorkUnit) -> WorkUnit | None:
    """The late answer of expired ``unit`` was accepted: its re-queued copy, if nobody has
    leased it yet, is not needed any more (marked ``failed``, reason given). A copy already
    leased is left alone (its documents are then trained twice).

    Returns:
        The withdrawn copy, or ``None``.
    """
    copy = session.scalar(
        select(WorkUnit)
        .where(WorkUnit.reissued_from == unit.unit_id, WorkUnit.state == UnitState.QUEUED)
        .with_for_update()
    )
    if copy is None:
        return None
    copy.state, copy.finished_at = UnitState.FAILED, utcnow()
    copy.state_reason = f"withdrawn: the expired lease {unit.unit_id} was answered late"
    log_event(
        session,
        kind="unit.withdrawn",
        message=copy.state_reason,
        unit_id=copy.unit_id,
        data={"answered": unit.unit_id},
    )
    return copy


def expire_leases(
    session: Session, *, now: dt.datetime, max_attempts: int, exclude_holders: bool = True
) -> list[WorkUnit]:
    """Mark leases past their deadline ``expired`` and queue a copy of each (for other
    participants unless ``exclude_holders`` is false: see :func:`requeue_copy`).

    Returns:
        The expired units (their copies are linked by ``reissued_from``).
    """
    units = session.scalars(
        select(WorkUnit)
        .where(WorkUnit.state == UnitState.LEASED, WorkUnit.deadline < now)
        .order_by(WorkUnit.deadline)
        .with_for_update()
    ).all()
    finished = min(now, utcnow())  # ``now`` may be far ahead: "expire every lease"
    for unit in units:
        unit.state, unit.finished_at, unit.state_reason = UnitState.EXPIRED, finished, "deadline"
        log_event(
            session,
            kind="lease.expired",
            message="lease expired",
            participant_id=unit.participant_id,
            unit_id=unit.unit_id,
        )
        requeue_copy(
            session,
            unit=unit,
            reason="lease expired",
            max_attempts=max_attempts,
            exclude_holder=exclude_holders,
        )
    session.flush()
    return list(units)


def fail_unit(
    session: Session,
    *,
    unit_id: str,
    reason: str,
    requeue: bool,
    max_attempts: int,
    exclude_holder: bool = True,
) -> WorkUnit | None:
    """Mark a queued or leased unit ``failed``; optionally queue a copy (returned; see
    :func:`requeue_copy` for ``exclude_holder``)."""
    unit = get_unit(session, unit_id=unit_id)
    if unit.state in FINAL_STATES:
        raise IllegalTransition(f"unit {unit_id} is already {unit.state}; cannot fail it")
    unit.state, unit.finished_at, unit.state_reason = UnitState.FAILED, utcnow(), reason
    log_event(
        session,
        kind="unit.failed",
        message=reason,
        participant_id=unit.participant_id,
        unit_id=unit_id,
    )
    session.flush()
    if not requeue:
        return None
    return requeue_copy(
        session, unit=unit, reason=reason, max_attempts=max_attempts, exclude_holder=exclude_holder
    )


def end_other_stages(session: Session, *, stage: str, max_attempts: int) -> None:
    """Fail the units still leased in stages other than ``stage`` (the one starting), each
    re-queued for its stage (its holder may take it back: not its fault).

    The stage that leased them ended: their results would be refused (the lease is not of
    the running stage), yet as leases in flight they would keep their nodes' slots full. A
    node whose end-of-stage ``collect`` reply was lost (Flower 1.42 can push every reply of
    a SuperNode one message late after a run is stopped) then got no unit of the next stage
    until those leases expired, minutes later.
    """
    units = session.scalars(
        select(WorkUnit)
        .where(WorkUnit.state == UnitState.LEASED, WorkUnit.stage != stage)
        .order_by(WorkUnit.leased_at)
        .with_for_update()
    ).all()
    for unit in units:
        fail_unit(
            session,
            unit_id=unit.unit_id,
            reason=f"stage ended: {stage} runs now",
            requeue=True,
            max_attempts=max_attempts,
            exclude_holder=False,
        )


def reissue(session: Session, *, unit_id: str, reason: str, max_attempts: int) -> WorkUnit | None:
    """Queue the unit again for a *different* participant (replication or redo).

    A still-leased unit is failed first (its holder's answer will be refused). A
    finished unit stays as it is; the copy is an extra replica.
    """
    unit = get_unit(session, unit_id=unit_id)
    if unit.state == UnitState.QUEUED:
        raise IllegalTransition(f"unit {unit_id} is still queued; nothing to reissue")
    if unit.state == UnitState.LEASED:
        return fail_unit(
            session, unit_id=unit_id, reason=reason, requeue=True, max_attempts=max_attempts
        )
    return requeue_copy(session, unit=unit, reason=reason, max_attempts=max_attempts)


def lease_queued(
    session: Session,
    *,
    participant_id: int,
    held_columns: Sequence[int],
    lease_seconds: float,
    now: dt.datetime,
    allow_foreign: bool = False,
    stage: str | None = None,
) -> WorkUnit | None:
    """Lease the oldest queued unit this participant may take, or ``None``.

    Skips units the participant already failed, and with ``stage`` units of other stages
    (a lease of the stage before that expired after it ended is not redone in the next:
    its update would be trained for the other stage's model). Prefers units whose columns
    the participant holds (affinity: no download); units touching other columns are
    taken only with ``allow_foreign``, and not while they are kept for their holder
    (:func:`_kept_for_holder`).
    """
    held = set(held_columns)
    query = select(WorkUnit).where(WorkUnit.state == UnitState.QUEUED)
    if stage is not None:
        query = query.where(WorkUnit.stage == stage)
    queued = session.scalars(query.order_by(WorkUnit.created_at)).all()
    eligible = [u for u in queued if participant_id not in (u.excluded_participants or [])]
    own = [u for u in eligible if set(u.columns) <= held]
    pool = own
    if not own and allow_foreign:
        kept = _kept_for_holder(
            session, eligible, participant_id, now - dt.timedelta(seconds=lease_seconds)
        )
        pool = [u for u in eligible if u.unit_id not in kept]
    unit = None
    for candidate in pool:
        # Re-read under the row lock: on PostgreSQL another session may have taken it.
        unit = session.get(
            WorkUnit, candidate.unit_id, with_for_update=True, populate_existing=True
        )
        if unit is not None and unit.state == UnitState.QUEUED:
            break
        unit = None
    if unit is None:
        return None
    unit.participant_id, unit.state = participant_id, UnitState.LEASED
    unit.leased_at, unit.deadline = now, now + dt.timedelta(seconds=lease_seconds)
    session.flush()
    log_event(
        session,
        kind="lease.created",
        message=f"re-issued unit, attempt {unit.attempt}",
        participant_id=participant_id,
        unit_id=unit.unit_id,
    )
    return unit


def _kept_for_holder(
    session: Session, units: Sequence[WorkUnit], participant_id: int, since: dt.datetime
) -> set[str]:
    """Ids of re-queued copies kept for the participant that held the original.

    A copy its holder may take back (:func:`requeue_copy` without ``exclude_holder``) waits
    for it while the holder is online and the copy was queued after ``since`` (one lease
    length ago): a node back from a missed heartbeat or a lost Flower run picks up its own
    columns, instead of every node downloading another's (stage 4: also its teacher).
    """
    copies = [u for u in units if u.reissued_from is not None and u.created_at > since]
    if not copies:
        return set()
    holders = dict(
        session.execute(
            select(WorkUnit.unit_id, WorkUnit.participant_id)
            .join(Participant, Participant.id == WorkUnit.participant_id)
            .where(
                WorkUnit.unit_id.in_([u.reissued_from for u in copies]),
                Participant.state == ParticipantState.ONLINE,
            )
        ).all()
    )
    return {
        u.unit_id
        for u in copies
        if holders.get(u.reissued_from) not in (None, participant_id)
        and holders[u.reissued_from] not in (u.excluded_participants or [])
    }


def stage_schedule_position(session: Session, *, stage: str) -> tuple[int, int]:
    """``(units, inner steps)`` created so far for ``stage``, re-issued copies excluded.

    The federated lr / ternary schedules are indexed by it: a new unit starts at the inner
    step where every unit leased before it ends, exactly like the central schedule at the
    same token position, and after a restart the count continues from the database.
    """
    units, steps = session.execute(
        select(func.count(WorkUnit.unit_id), func.coalesce(func.sum(WorkUnit.steps), 0)).where(
            WorkUnit.stage == stage, WorkUnit.reissued_from.is_(None)
        )
    ).one()
    return int(units), int(steps)


def result_columns(unit: WorkUnit) -> list[int]:
    """The columns a result of ``unit`` carries deltas for (what its sync moves): the
    unit's, or none for a part that keeps them on its node (``hold_columns``, in-unit
    shared syncs)."""
    return [] if (unit.params or {}).get("hold_columns") else list(unit.columns)


def claim_columns(session: Session, *, unit: WorkUnit, now: dt.datetime | None = None) -> list[int]:
    """Record ``unit``'s participant as the one training its columns in its stage, and
    return the columns it must start from the published weights: those another
    participant was leased since (or that no unit of the stage was leased on yet, so a
    node's copy from an earlier stage or network is not taken for this stage's).

    A node's local copy of a column carries its training between units; the published
    column came from another node's copy once that node was leased it, and ``local -
    published`` would then revert the other node's training (:class:`ColumnLineage`).
    """
    rows = {
        row.column: row
        for row in session.scalars(
            select(ColumnLineage).where(
                ColumnLineage.stage == unit.stage, ColumnLineage.column.in_(list(unit.columns))
            )
        )
    }
    now = now or utcnow()
    fresh = []
    for column in unit.columns:
        row = rows.get(column) or ColumnLineage(stage=unit.stage, column=column)
        if row.participant_id != unit.participant_id:  # another's, or nobody's yet
            fresh.append(int(column))
        row.participant_id, row.unit_id, row.leased_at = unit.participant_id, unit.unit_id, now
        session.add(row)
    session.flush()
    return sorted(fresh)


def recent_units(
    session: Session, *, participant_id: int, stage: str, limit: int
) -> list[tuple[int, dict[str, Any]]]:
    """``(steps, params)`` of the ``limit`` units of ``stage`` leased to ``participant_id``
    last, newest first (the order it trains them in)."""
    rows = session.execute(
        select(WorkUnit.steps, WorkUnit.params)
        .where(WorkUnit.participant_id == participant_id, WorkUnit.stage == stage)
        .order_by(WorkUnit.leased_at.desc())
        .limit(limit)
    ).all()
    return [(int(steps), dict(params or {})) for steps, params in rows]


def stage_step_rate(session: Session, *, stage: str) -> float | None:
    """Inner steps a minute answered in ``stage``: the steps of its done units over the
    minutes from its first lease to its last answer (``None`` without a done unit)."""
    steps, first, last = session.execute(
        select(
            func.sum(WorkUnit.steps), func.min(WorkUnit.leased_at), func.max(WorkUnit.finished_at)
        ).where(WorkUnit.stage == stage, WorkUnit.state == UnitState.DONE)
    ).one()
    if not steps or first is None or last is None or last <= first:
        return None
    return float(steps) / ((last - first).total_seconds() / 60)


@dataclass(frozen=True)
class StageRate:
    """Where a time-budgeted stage stands, in inner steps (:func:`stage_rate`)."""

    #: steps leased or queued and not answered yet (a re-queued copy stands for its
    #: expired original, so copies count and expired originals do not)
    in_flight: int
    #: steps of the unit each node trains now: when the time is up a node's queued units
    #: are dropped, but the one it is training is finished and counts
    finishing: int
    #: steps a second answered lately (``None`` before two answers apart in time)
    per_s: float | None


def stage_rate(session: Session, *, stage: str, window_s: float = 60.0) -> StageRate:
    """Where ``stage`` stands, and the rate its steps were answered at over the last
    ``window_s`` seconds of answers (at least the last three answers; the oldest answer's
    own steps excluded: they were trained before it). A recent rate, not one since the
    stage's first answer: on ``small`` stage 4's units trained twice as fast in the second
    half of the stage as in the first, and a rate that counted the start-up ended the
    schedule early."""
    live = WorkUnit.stage == stage, WorkUnit.state.in_((UnitState.QUEUED, UnitState.LEASED))
    in_flight = session.execute(select(func.coalesce(func.sum(WorkUnit.steps), 0)).where(*live))
    per_node = (
        select(func.max(WorkUnit.steps).label("steps"))
        .where(*live, WorkUnit.participant_id.is_not(None))
        .group_by(WorkUnit.participant_id)
        .subquery()
    )
    finishing = session.execute(select(func.coalesce(func.sum(per_node.c.steps), 0)))
    done = WorkUnit.stage == stage, WorkUnit.state == UnitState.DONE
    last = session.execute(select(func.max(WorkUnit.finished_at)).where(*done)).scalar_one()
    return StageRate(
        in_flight=int(in_flight.scalar_one()),
        finishing=int(finishing.scalar_one()),
        per_s=None if last is None else _recent_rate(session, done, last, window_s),
    )


def _recent_rate(session: Session, done: tuple, last: dt.datetime, window_s: float) -> float | None:
    """Steps a second answered from ``window_s`` before the ``last`` answer to it."""
    since = last - dt.timedelta(seconds=window_s)
    recent = session.execute(
        select(WorkUnit.finished_at, WorkUnit.steps)
        .where(*done, WorkUnit.finished_at >= since)
        .order_by(WorkUnit.finished_at)
    ).all()
    if len(recent) < 3:
        recent = session.execute(
            select(WorkUnit.finished_at, WorkUnit.steps)
            .where(*done)
            .order_by(WorkUnit.finished_at.desc())
            .limit(3)
        ).all()[::-1]
    span = (recent[-1][0] - recent[0][0]).total_seconds()
    if span <= 0:
        return None
    return sum(steps for _, steps in recent[1:]) / span


def previous_base_version(session: Session, *, participant_id: int, before: str) -> int | None:
    """Base version of the unit leased to ``participant_id`` most recently before ``before``."""
    this = session.get(WorkUnit, before)
    query = select(WorkUnit.base_version).where(
        WorkUnit.participant_id == participant_id, WorkUnit.unit_id != before
    )
    if this is not None and this.leased_at is not None:
        query = query.where(WorkUnit.leased_at <= this.leased_at)
    row = session.execute(query.order_by(WorkUnit.leased_at.desc()).limit(1)).first()
    return int(row[0]) if row is not None else None
