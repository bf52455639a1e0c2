"""Participants: first-contact upsert, presence, revocation, statistics, listing."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.errors import InvalidArgument, NotFound, ParticipantRevoked, ParticipantUnknown
from coordinator.db.events import log_event
from coordinator.db.models import Participant, ParticipantColumn, WorkUnit
from coordinator.db.pagination import Page, check_page
from coordinator.db.types import ParticipantState, UnitState, utcnow


@dataclass(frozen=True)
class Capability:
    """What a participant says it can do (sent with its first message and on change)."""

    max_columns: int = 1
    max_params: int | None = None
    threads: int | None = None
    device: str | None = None
    tokens_per_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_columns < 1:
            raise InvalidArgument(f"max_columns must be >= 1, got {self.max_columns}")
        if self.tokens_per_s is not None and not self.tokens_per_s >= 0:
            raise InvalidArgument(f"tokens_per_s must be >= 0, got {self.tokens_per_s}")


def _apply_capability(row: Participant, capability: Capability) -> None:
    row.max_columns = capability.max_columns
    row.max_params = capability.max_params
    row.threads = capability.threads
    row.device = capability.device
    row.tokens_per_s = capability.tokens_per_s


def get_participant(session: Session, *, participant_id: int) -> Participant:
    """The participant with this id; raises :class:`NotFound`."""
    row = session.get(Participant, participant_id)
    if row is None:
        raise NotFound(f"no participant with id {participant_id}")
    return row


def find_participant(session: Session, *, node_id: int) -> Participant | None:
    """The participant with this Flower node id, or ``None``."""
    return session.scalar(select(Participant).where(Participant.node_id == node_id))


def create_participant(
    session: Session,
    *,
    name: str,
    public_key: str | None = None,
    node_id: int | None = None,
    capability: Capability | None = None,
) -> Participant:
    """Insert a participant in state ``enrolled`` (``node_id`` may come later)."""
    if not name:
        raise InvalidArgument("participant name must be non-empty")
    row = Participant(
        name=name, public_key=public_key, node_id=node_id, state=ParticipantState.ENROLLED
    )
    _apply_capability(row, capability or Capability())
    session.add(row)
    session.flush()
    log_event(
        session, kind="participant.enrolled", message=f"{name} enrolled", participant_id=row.id
    )
    return row


def touch_participant(
    session: Session,
    *,
    node_id: int,
    public_key: str | None = None,
    name: str | None = None,
    capability: Capability | None = None,
    now: dt.datetime | None = None,
    create: bool = True,
) -> Participant:
    """Record contact from Flower node ``node_id``: upsert and mark it online.

    Lookup order: by ``node_id``; else an enrolled participant with this
    ``public_key`` that has no node id yet (binds it); else a new participant, unless
    ``create`` is false (an enrolled network: the database is the only source of truth
    for who takes part, never the SuperLink's node list).

    Raises:
        ParticipantRevoked: the participant was revoked.
        ParticipantUnknown: ``create`` is false and no participant owns the node.
    """
    now = now or utcnow()
    row = _node_owner(session, node_id=node_id, public_key=public_key)
    if row is None and not create:
        raise ParticipantUnknown(f"Flower node {node_id} belongs to no enrolled participant")
    if row is None:
        row = create_participant(
            session,
            name=name or f"node-{node_id}",
            public_key=public_key,
            node_id=node_id,
            capability=capability,
        )
    if row.state == ParticipantState.REVOKED:
        raise ParticipantRevoked(f"participant {row.id} ({row.name}) is revoked")
    row.node_id = node_id
    if name:
        row.name = name
    if capability is not None:
        _apply_capability(row, capability)
    if row.state != ParticipantState.ONLINE:
        log_event(
            session,
            kind="participant.online",
            message=f"{row.name} online",
            participant_id=row.id,
            data={"node_id": node_id},
        )
    row.state = ParticipantState.ONLINE
    row.last_seen = now
    session.flush()
    return row


def _node_owner(session: Session, *, node_id: int, public_key: str | None) -> Participant | None:
    """The participant that owns Flower node ``node_id``: by node id, else by ``public_key``
    (logged when that key's participant had another node id: it re-registered)."""
    row = find_participant(session, node_id=node_id)
    if row is not None or public_key is None:
        return row
    row = session.scalar(select(Participant).where(Participant.public_key == public_key))
    if row is not None and row.node_id is not None and row.node_id != node_id:
        # The same key re-registered with the SuperLink: Flower gave it a new id.
        log_event(
            session,
            kind="participant.node_changed",
            message=f"{row.name}: node id {row.node_id} -> {node_id}",
            participant_id=row.id,
        )
    return row


def set_participant_state(
    session: Session, *, participant_id: int, state: ParticipantState, reason: str = ""
) -> Participant:
    """Mark a participant online/offline/revoked (revoked is final).

    Revoking also drops the columns it held, so leasing hands them to others.
    """
    row = get_participant(session, participant_id=participant_id)
    state = ParticipantState(state)
    if row.state == ParticipantState.REVOKED and state != ParticipantState.REVOKED:
        raise ParticipantRevoked(f"participant {row.id} ({row.name}) is revoked; enrol anew")
    if row.state != state:
        log_event(
            session,
            kind=f"participant.{state.value}",
            message=f"{row.name} {state.value}" + (f": {reason}" if reason else ""),
            participant_id=row.id,
        )
    row.state = state
    if state == ParticipantState.REVOKED:
        for held in session.scalars(
            select(ParticipantColumn).where(ParticipantColumn.participant_id == row.id)
        ):
            session.delete(held)
    session.flush()
    return row


def revoke_participant(session: Session, *, participant_id: int, reason: str = "") -> Participant:
    """Revoke a participant: it gets no more work, its results are refused and its leases
    expire at once (their units are queued again for others, not counted as its failure)."""
    from coordinator.db.leases import requeue_copy  # leases builds on participants

    # Units first, then the participant: the intake locks a result's unit and then its
    # participant, and the opposite order here deadlocked on PostgreSQL.
    leased = session.scalars(
        select(WorkUnit)
        .where(WorkUnit.participant_id == participant_id, WorkUnit.state == UnitState.LEASED)
        .order_by(WorkUnit.unit_id)
        .with_for_update()
    ).all()
    row = set_participant_state(
        session, participant_id=participant_id, state=ParticipantState.REVOKED, reason=reason
    )
    now = utcnow()
    for unit in leased:
        unit.state, unit.finished_at, unit.state_reason = UnitState.EXPIRED, now, "revoked"
        requeue_copy(
            session, unit=unit, reason="participant revoked", max_attempts=unit.attempt + 1
        )
    session.flush()
    return row


def mark_silent_offline(
    session: Session, *, silence: dt.timedelta, now: dt.datetime | None = None
) -> list[Participant]:
    """Mark ``offline`` every online participant not seen (leased to, replied, reported)
    for longer than ``silence``; returns them."""
    now = now or utcnow()
    rows = session.scalars(
        select(Participant)
        .where(Participant.state == ParticipantState.ONLINE, Participant.last_seen < now - silence)
        .with_for_update()
    ).all()
    for row in rows:
        set_participant_state(
            session, participant_id=row.id, state=ParticipantState.OFFLINE,
            reason=f"silent for more than {silence.total_seconds():.0f} s",
        )  # fmt: skip
    return list(rows)


def held_columns(session: Session, *, participant_id: int) -> list[int]:
    """Columns the participant holds, ascending."""
    query = select(ParticipantColumn.column).where(
        ParticipantColumn.participant_id == participant_id
    )
    return sorted(session.scalars(query).all())


def set_held_columns(
    session: Session, *, participant: Participant, old: list[int], new: list[int]
) -> None:
    """Replace the participant's held columns ``old`` by ``new`` (logged when they change)."""
    if old == new:
        return
    for row in session.scalars(
        select(ParticipantColumn).where(ParticipantColumn.participant_id == participant.id)
    ):
        if row.column not in new:
            session.delete(row)
    session.add_all(
        ParticipantColumn(participant_id=participant.id, column=c) for c in new if c not in old
    )
    session.flush()
    log_event(
        session,
        kind="participant.columns",
        message=f"{participant.name} holds {new}",
        participant_id=participant.id,
        data={"columns": new, "previous": old},
    )


def add_traffic(
    session: Session, *, participant_id: int, bytes_up: int = 0, bytes_down: int = 0
) -> None:
    """Add transferred bytes to a participant's counters (atomic SQL increment)."""
    if bytes_up < 0 or bytes_down < 0:
        raise InvalidArgument("byte counts must be >= 0")
    row = get_participant(session, participant_id=participant_id)
    row.bytes_up = Participant.bytes_up + bytes_up
    row.bytes_down = Participant.bytes_down + bytes_down
    session.flush()


def list_participants(
    session: Session,
    *,
    state: ParticipantState | None = None,
    offset: int = 0,
    limit: int = 100,
) -> Page[Participant]:
    """Participants ordered by id, optionally only those in ``state``."""
    check_page(offset, limit)
    query = select(Participant)
    if state is not None:
        query = query.where(Participant.state == ParticipantState(state))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Participant.id).offset(offset).limit(limit)).all()
    return Page(items=list(rows), total=total, offset=offset, limit=limit)
