"""Result rows: storing the intake's decision, and the exactly-once apply bookkeeping.

Which result is accepted is decided by :func:`coordinator.intake.record_result`; this
module writes what it decided (:func:`store_result`, :func:`refuse`). A result is
acknowledged to the participant only after that transaction has committed, and it is
applied to the masters only via :func:`pending_results` / :func:`mark_applied`, so a
coordinator killed at any point loses no accepted result and applies none twice.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.errors import Conflict, InvalidArgument
from coordinator.db.events import log_event
from coordinator.db.models import Participant, Result, WorkUnit
from coordinator.db.types import RejectReason, ResultState, UnitState


@dataclass(frozen=True)
class RecordOutcome:
    """What happened to a submitted result; the participant is told this.

    Attributes:
        unit_id: the unit the result answers.
        accepted: stored as accepted (will be applied).
        reason: reject code, ``None`` when accepted.
        detail: human-readable explanation of the rejection.
        duplicate: this was a replay; the stored outcome is returned, nothing changed.
        stored: a result row exists (lease-ownership rejections are only logged, so an
            impostor cannot occupy another node's answer slot).
        result_id: id of the stored row, if any.
    """

    unit_id: str
    accepted: bool
    reason: RejectReason | None = None
    detail: str = ""
    duplicate: bool = False
    stored: bool = False
    result_id: int | None = None


@dataclass(frozen=True)
class ResultPayload:
    """Summary of a result's contents (the blobs themselves live in the blob store)."""

    tokens: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    blob_ids: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    base_version: int | None = None
    bytes_up: int = 0

    def __post_init__(self) -> None:
        if self.tokens < 0 or self.bytes_up < 0:
            raise InvalidArgument("tokens and bytes_up must be >= 0")


def outcome_of(row: Result, *, duplicate: bool) -> RecordOutcome:
    """The outcome a stored result row reports (``duplicate``: this is a replay of it)."""
    reason = None if row.reject_reason is None else RejectReason(row.reject_reason)
    return RecordOutcome(
        unit_id=row.unit_id,
        accepted=row.state == ResultState.ACCEPTED,
        reason=reason,
        detail=row.reject_detail or "",
        duplicate=duplicate,
        stored=True,
        result_id=row.id,
    )


def refuse(
    session: Session,
    *,
    unit_id: str,
    reason: RejectReason,
    detail: str,
    participant_id: int | None,
) -> RecordOutcome:
    """Refuse a result without storing a row (only an event is logged).

    For lease-ownership failures: an impostor cannot occupy another node's answer slot.
    """
    log_event(
        session,
        kind="result.refused",
        message=f"{reason.value}: {detail}",
        participant_id=participant_id,
        unit_id=unit_id,
        data={"reason": reason.value},
    )
    return RecordOutcome(unit_id=unit_id, accepted=False, reason=reason, detail=detail)


def find_result(session: Session, *, unit_id: str) -> Result | None:
    """The result stored for ``unit_id``, if it was answered before."""
    return session.scalar(select(Result).where(Result.unit_id == unit_id))


def store_result(
    session: Session,
    *,
    unit: WorkUnit,
    participant: Participant,
    payload: ResultPayload,
    problem: tuple[RejectReason, str] | None,
    now: dt.datetime,
) -> RecordOutcome:
    """Store the result row of ``unit`` as decided by the caller, in its transaction.

    ``problem`` ``None``: accepted — unit ``done``, participant credit += tokens,
    ``units_done + 1``. Otherwise rejected with that reason — unit ``rejected`` and
    participant ``units_rejected + 1``, except for ``EXPIRED_LEASE`` (a late answer is not
    the participant's fault: the expiry path re-queues the unit). Either way the
    participant's ``bytes_up`` grows and an event is logged.

    Returns:
        The :class:`RecordOutcome` to report to the participant.
    """
    row = Result(
        unit_id=unit.unit_id,
        participant_id=participant.id,
        base_version=unit.base_version,
        state=ResultState.ACCEPTED if problem is None else ResultState.REJECTED,
        reject_reason=None if problem is None else problem[0].value,
        reject_detail=None if problem is None else problem[1],
        blob_ids=dict(payload.blob_ids or {}),
        tokens=payload.tokens,
        bytes_up=payload.bytes_up,
        train_loss=payload.train_loss,
        val_loss=payload.val_loss,
        timings=dict(payload.timings or {}),
        received_at=now,
    )
    session.add(row)
    participant.bytes_up = Participant.bytes_up + payload.bytes_up
    if problem is None:
        unit.state, unit.finished_at = UnitState.DONE, now
        participant.credit = Participant.credit + payload.tokens
        participant.units_done = Participant.units_done + 1
        kind, message = "result.accepted", f"{payload.tokens} tokens"
    elif problem[0] != RejectReason.EXPIRED_LEASE:
        # A late answer is not the participant's fault: the expiry path re-queues it.
        unit.state, unit.finished_at = UnitState.REJECTED, now
        unit.state_reason = f"{problem[0].value}: {problem[1]}"
        participant.units_rejected = Participant.units_rejected + 1
        kind, message = "result.rejected", f"{problem[0].value}: {problem[1]}"
    else:
        kind, message = "result.rejected", f"{problem[0].value}: {problem[1]}"
    session.flush()
    log_event(
        session,
        kind=kind,
        message=message,
        participant_id=participant.id,
        unit_id=unit.unit_id,
        data={"base_version": unit.base_version},
    )
    return outcome_of(row, duplicate=False)


def reject_unapplied(
    session: Session, *, unit_id: str, reason: RejectReason, detail: str
) -> RecordOutcome:
    """Turn an accepted result that was never applied into a rejected one (it could not be
    applied: see :meth:`coordinator.intake.Intake.receive`), undoing its credit, so that a
    restart does not try it again.

    Raises:
        Conflict: no accepted result of ``unit_id``, or it was already applied.
    """
    row = session.scalar(select(Result).where(Result.unit_id == unit_id).with_for_update())
    if row is None or row.state != ResultState.ACCEPTED or row.applied_in_version is not None:
        raise Conflict(f"unit {unit_id} has no accepted, unapplied result to reject")
    row.state, row.reject_reason, row.reject_detail = ResultState.REJECTED, reason.value, detail
    unit = session.get(WorkUnit, unit_id)
    if unit is not None:
        unit.state, unit.state_reason = UnitState.REJECTED, f"{reason.value}: {detail}"
    participant = session.get(Participant, row.participant_id)
    if participant is not None:
        participant.credit = Participant.credit - row.tokens
        participant.units_done = Participant.units_done - 1
        participant.units_rejected = Participant.units_rejected + 1
    session.flush()
    log_event(
        session,
        kind="result.rejected",
        message=f"{reason.value}: {detail} (accepted, but it could not be applied)",
        participant_id=row.participant_id,
        unit_id=unit_id,
    )
    return outcome_of(row, duplicate=False)


def pending_results(session: Session, *, limit: int | None = None) -> list[Result]:
    """Accepted results not yet applied to a published version, oldest first."""
    query = (
        select(Result)
        .where(Result.state == ResultState.ACCEPTED, Result.applied_in_version.is_(None))
        .order_by(Result.received_at, Result.id)
    )
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query).all())


def mark_applied(session: Session, *, unit_ids: Sequence[str], version: int) -> int:
    """Record that these results went into ``version`` (exactly once).

    Call in the same transaction as :func:`~coordinator.db.versions.publish_version`.

    Raises:
        Conflict: a unit id has no accepted result or was already applied.
    """
    wanted = set(unit_ids)
    rows = session.scalars(select(Result).where(Result.unit_id.in_(wanted)).with_for_update()).all()
    found = {row.unit_id: row for row in rows}
    missing = sorted(wanted - found.keys())
    if missing:
        raise Conflict(f"no result stored for units {missing}")
    for row in rows:
        if row.state != ResultState.ACCEPTED:
            raise Conflict(f"result of unit {row.unit_id} was rejected; it cannot be applied")
        if row.applied_in_version is not None:
            raise Conflict(
                f"result of unit {row.unit_id} was already applied in version "
                f"{row.applied_in_version}"
            )
        row.applied_in_version = version
    session.flush()
    return len(rows)


def applied_results_after(session: Session, *, version: int) -> list[Result]:
    """Accepted results applied in versions after ``version``, in application order.

    A coordinator restarting from a state checkpoint at ``version`` replays these to
    rebuild, bit-identically, the versions it had published before it stopped.
    """
    query = (
        select(Result)
        .where(Result.state == ResultState.ACCEPTED, Result.applied_in_version > version)
        .order_by(Result.applied_in_version, Result.received_at, Result.id)
    )
    return list(session.scalars(query).all())


def recent_results(session: Session, *, participant_id: int, limit: int) -> list[Result]:
    """The participant's last ``limit`` answered units, newest first (its reputation)."""
    query = (
        select(Result)
        .where(Result.participant_id == participant_id)
        .order_by(Result.id.desc())
        .limit(limit)
    )
    return list(session.scalars(query).all())
