"""Durable, idempotent result intake and the exactly-once apply bookkeeping.

A result is acknowledged to the participant only after :func:`record_result` has
committed, and it is applied to the masters only via :func:`pending_results` /
:func:`mark_applied`, so a coordinator killed at any point loses no accepted result
and applies none twice.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.errors import Conflict, InvalidArgument
from coordinator.db.events import log_event
from coordinator.db.models import Participant, Result, WorkUnit
from coordinator.db.participants import find_participant
from coordinator.db.types import ParticipantState, RejectReason, ResultState, UnitState, utcnow


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


def _outcome(row: Result, *, duplicate: bool) -> RecordOutcome:
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


def _refuse(
    session: Session, unit_id: str, reason: RejectReason, detail: str, participant_id: int | None
) -> RecordOutcome:
    log_event(
        session,
        kind="result.refused",
        message=f"{reason.value}: {detail}",
        participant_id=participant_id,
        unit_id=unit_id,
        data={"reason": reason.value},
    )
    return RecordOutcome(unit_id=unit_id, accepted=False, reason=reason, detail=detail)


def _lease_problem(
    unit: WorkUnit, payload: ResultPayload, now: dt.datetime
) -> tuple[RejectReason, str] | None:
    if unit.state != UnitState.LEASED:
        return RejectReason.EXPIRED_LEASE, f"unit is {unit.state}, no longer leased"
    if unit.deadline is not None and unit.deadline < now:
        return RejectReason.EXPIRED_LEASE, f"lease deadline {unit.deadline.isoformat()} passed"
    if payload.base_version is not None and payload.base_version != unit.base_version:
        return (
            RejectReason.BASE_MISMATCH,
            f"result built on version {payload.base_version}, lease was for {unit.base_version}",
        )
    return None


def record_result(
    session: Session,
    *,
    unit_id: str,
    node_id: int,
    payload: ResultPayload,
    reject_reason: RejectReason | None = None,
    reject_detail: str = "",
    now: dt.datetime | None = None,
) -> RecordOutcome:
    """Check the lease and store the result, all in the caller's one transaction.

    Checks in order: the unit exists (``UNKNOWN_LEASE``), it is leased to this node and
    the node is not revoked (``WRONG_NODE``), it was not answered before (replay: the
    stored outcome is returned with ``duplicate=True`` and nothing changes), the lease
    is live (``EXPIRED_LEASE``) and the base version matches (``BASE_MISMATCH``).
    Then either the caller's ``reject_reason`` (from payload validation) is stored —
    unit ``rejected``, participant ``units_rejected + 1``, no credit — or the result is
    accepted: unit ``done``, participant credit += tokens, ``units_done + 1``.

    Args:
        session: session inside the caller's transaction (commit, then acknowledge).
        unit_id: the lease answered.
        node_id: Flower node id the result came from.
        payload: token count, losses, blob ids, timings, claimed base version, bytes.
        reject_reason: set when the caller's validation of the payload failed.
        reject_detail: explanation stored with the rejection.
        now: current time (tests); defaults to ``utcnow()``.

    Returns:
        The :class:`RecordOutcome` to report to the participant.
    """
    now = now or utcnow()
    unit = session.get(WorkUnit, unit_id, with_for_update=True)
    if unit is None:
        return _refuse(
            session, unit_id, RejectReason.UNKNOWN_LEASE, f"no lease {unit_id!r} was issued", None
        )
    participant = find_participant(session, node_id=node_id)
    if participant is None or unit.participant_id != participant.id:
        pid = None if participant is None else participant.id
        return _refuse(
            session,
            unit_id,
            RejectReason.WRONG_NODE,
            f"lease {unit_id} is not held by node {node_id}",
            pid,
        )
    if participant.state == ParticipantState.REVOKED:
        return _refuse(
            session, unit_id, RejectReason.WRONG_NODE, f"node {node_id} is revoked", participant.id
        )
    existing = session.scalar(select(Result).where(Result.unit_id == unit_id))
    if existing is not None:
        return _outcome(existing, duplicate=True)

    problem = _lease_problem(unit, payload, now)
    if problem is None and reject_reason is not None:
        problem = (RejectReason(reject_reason), reject_detail)
    row = Result(
        unit_id=unit_id,
        participant_id=participant.id,
        base_version=unit.base_version,
        state=ResultState.ACCEPTED if problem is None else ResultState.REJECTED,
        reject_reason=None if problem is None else problem[0].value,
        reject_detail=None if problem is None else problem[1],
        blob_ids=dict(payload.blob_ids or {}),
        tokens=payload.tokens,
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
        unit_id=unit_id,
        data={"base_version": unit.base_version},
    )
    return _outcome(row, duplicate=False)


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


def accepted_totals(session: Session, *, stage: str) -> tuple[int, int]:
    """``(results, tokens)`` accepted so far for units of ``stage`` (e.g. ``"stage3"``).

    A restarted coordinator continues a stage's token budget from here.
    """
    row = session.execute(
        select(func.count(Result.id), func.coalesce(func.sum(Result.tokens), 0))
        .join(WorkUnit, WorkUnit.unit_id == Result.unit_id)
        .where(Result.state == ResultState.ACCEPTED, WorkUnit.stage == stage)
    ).one()
    return int(row[0]), int(row[1])
