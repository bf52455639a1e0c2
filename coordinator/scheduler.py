"""Lease scheduler: keeps every participant busy, with column affinity (DESIGN §3).

* A participant never has fewer than ``max_in_flight`` (2) units in flight, so it
  trains on the next unit while the previous result uploads.
* Affinity: a participant keeps the expert columns it holds, so after the first
  download only deltas travel. New participants get the least-held columns, a
  number proportional to their measured throughput (capacity-balanced), 1 to
  ``max_columns``. With more participants than columns, columns are replicated.
* Leases expire at their deadline; the unit is re-queued as a copy with
  ``attempt + 1`` for another participant, up to ``max_attempts``.

All durable state is in the database; a ``Scheduler`` object holds only settings.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from coordinator.db import leases
from coordinator.db.errors import InvalidArgument, ParticipantRevoked
from coordinator.db.events import log_event
from coordinator.db.models import Participant, ParticipantColumn, WorkUnit
from coordinator.db.participants import find_participant
from coordinator.db.types import ParticipantState, utcnow


def held_columns(session: Session, *, participant_id: int) -> list[int]:
    """Columns the participant holds, ascending."""
    query = select(ParticipantColumn.column).where(
        ParticipantColumn.participant_id == participant_id
    )
    return sorted(session.scalars(query).all())


def _share(participant: Participant, others: Sequence[Participant]) -> float:
    """This participant's fraction of the network's throughput (equal if unmeasured)."""
    rates = [p.tokens_per_s for p in (participant, *others) if p.tokens_per_s]
    default = sum(rates) / len(rates) if rates else 1.0
    mine = participant.tokens_per_s or default
    total = mine + sum((p.tokens_per_s or default) for p in others)
    return mine / total


def assign_columns(session: Session, *, participant: Participant, n_columns: int) -> list[int]:
    """Return the participant's columns, assigning new ones when it needs them.

    Sticky: held columns are kept (trimmed only if ``max_columns`` shrank). The
    target count is ``ceil(n_columns * throughput share)`` clamped to
    ``1..max_columns``; a newcomer takes that many of the least-held columns. A
    participant that holds columns only grows, into columns no online participant
    holds, as far as ``max_columns`` allows (so orphaned columns get re-covered).
    """
    if n_columns < 1:
        raise InvalidArgument(f"n_columns must be >= 1, got {n_columns}")
    if participant.state == ParticipantState.REVOKED:
        raise ParticipantRevoked(f"participant {participant.id} is revoked")
    mine = held_columns(session, participant_id=participant.id)
    mine = [c for c in mine if c < n_columns]
    others = session.scalars(
        select(Participant).where(
            Participant.state == ParticipantState.ONLINE, Participant.id != participant.id
        )
    ).all()
    target = max(
        1,
        min(participant.max_columns, n_columns, math.ceil(n_columns * _share(participant, others))),
    )
    holders: Counter[int] = Counter({c: 0 for c in range(n_columns)})
    other_ids = [p.id for p in others]
    for column in session.scalars(
        select(ParticipantColumn.column).where(ParticipantColumn.participant_id.in_(other_ids))
    ):
        if column < n_columns:
            holders[column] += 1
    keep = mine[: participant.max_columns]
    uncovered = [c for c in range(n_columns) if holders[c] == 0 and c not in keep]
    free = sorted((c for c in range(n_columns) if c not in keep), key=lambda c: (holders[c], c))
    if keep:
        # Affinity: never move. A column nobody holds is not trained at all, so a
        # participant that already holds columns grows into uncovered ones (left by
        # a departed node) as far as its capacity allows, beyond its fair share.
        # A newcomer takes only its share, so the first to join cannot grab all.
        free = uncovered
        target = max(target, min(participant.max_columns, len(keep) + len(uncovered)))
    chosen = sorted(keep + free[: max(0, target - len(keep))])
    _store_columns(session, participant=participant, old=mine, new=chosen)
    return chosen


def _store_columns(
    session: Session, *, participant: Participant, old: list[int], new: list[int]
) -> None:
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


class Scheduler:
    """Lease policy over the database.

    Args:
        session_factory: ``sessionmaker`` used by the methods that run their own
            transaction (``leases_needed``, ``expire_leases``).
        lease_seconds: lease duration; a unit not answered by then is re-queued.
        max_in_flight: units each participant should have in flight.
        max_attempts: attempts per unit before it is abandoned.
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        lease_seconds: float,
        max_in_flight: int = 2,
        max_attempts: int = 3,
    ) -> None:
        if lease_seconds <= 0 or max_in_flight < 1 or max_attempts < 1:
            raise InvalidArgument(
                "lease_seconds must be > 0 and max_in_flight, max_attempts >= 1; got "
                f"{lease_seconds}, {max_in_flight}, {max_attempts}"
            )
        self.session_factory = session_factory
        self.lease_seconds = float(lease_seconds)
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts

    def leases_needed(self, node_id: int, now: dt.datetime | None = None) -> int:
        """How many new units to lease to ``node_id`` now (0 if unknown or not online)."""
        now = now or utcnow()
        with self.session_factory.begin() as session:
            participant = find_participant(session, node_id=node_id)
            if participant is None or participant.state != ParticipantState.ONLINE:
                return 0
            live = leases.count_in_flight(session, participant_id=participant.id, now=now)
            return max(0, self.max_in_flight - live)

    def create_lease(
        self,
        session: Session,
        *,
        participant: Participant,
        stage: str,
        base_version: int,
        columns: Sequence[int],
        docs: Sequence[str],
        steps: int,
        params: dict[str, Any],
        now: dt.datetime | None = None,
    ) -> WorkUnit:
        """Lease a new unit to ``participant`` (in the caller's transaction).

        Raises:
            ParticipantRevoked: the participant is revoked.
        """
        if participant.state == ParticipantState.REVOKED:
            raise ParticipantRevoked(f"participant {participant.id} is revoked")
        return leases.create_lease(
            session,
            participant_id=participant.id,
            stage=stage,
            base_version=base_version,
            columns=columns,
            docs=docs,
            steps=steps,
            params=params,
            lease_seconds=self.lease_seconds,
            now=now,
        )

    def next_queued(
        self,
        session: Session,
        *,
        participant: Participant,
        allow_foreign: bool = False,
        now: dt.datetime | None = None,
    ) -> WorkUnit | None:
        """Lease a re-queued unit to ``participant`` if one fits its columns."""
        if participant.state == ParticipantState.REVOKED:
            raise ParticipantRevoked(f"participant {participant.id} is revoked")
        return leases.lease_queued(
            session,
            participant_id=participant.id,
            held_columns=held_columns(session, participant_id=participant.id),
            lease_seconds=self.lease_seconds,
            now=now or utcnow(),
            allow_foreign=allow_foreign,
        )

    def expire_leases(self, now: dt.datetime | None = None) -> list[WorkUnit]:
        """Expire leases past their deadline and re-queue copies; returns the expired."""
        with self.session_factory.begin() as session:
            return leases.expire_leases(
                session, now=now or utcnow(), max_attempts=self.max_attempts
            )

    def fail_unit(
        self, session: Session, *, unit_id: str, reason: str, requeue: bool = True
    ) -> WorkUnit | None:
        """Mark a unit failed (e.g. the participant reported an error); returns the copy."""
        return leases.fail_unit(
            session, unit_id=unit_id, reason=reason, requeue=requeue, max_attempts=self.max_attempts
        )

    def reissue(self, session: Session, *, unit_id: str, reason: str) -> WorkUnit | None:
        """Queue the unit for a different participant; returns the queued copy."""
        return leases.reissue(
            session, unit_id=unit_id, reason=reason, max_attempts=self.max_attempts
        )

    def assign_columns(
        self, session: Session, *, participant: Participant, n_columns: int
    ) -> list[int]:
        """See :func:`assign_columns`."""
        return assign_columns(session, participant=participant, n_columns=n_columns)
