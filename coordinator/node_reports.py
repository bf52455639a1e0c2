"""Signed reports from volunteers' daemons: why their node was refused or disconnected.

Only the volunteer's machine knows why its SuperNode was turned away (a wrong CA fails
the TLS handshake before the coordinator sees anything; an unregistered key is refused
inside Flower). Its daemon therefore reports each refusal to the coordinator's REST API,
signed with the node key that was enrolled, and the coordinator records it in the event
log the operator watches. The signature (ECDSA over a canonical JSON payload with a
timestamp) is the credential: no API token is needed, only the enrolled key can speak
for a participant, and a report older than :data:`MAX_SKEW_S` is refused. The signed
timestamp is also the report's sequence number: a report not newer than the last one
accepted from that participant is a replay and refused (issue 16). The content is
harmless (a reason code and a sentence), so a daemon whose CA is wrong may send it
without verifying the server.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.errors import Conflict, InvalidToken, ParticipantRevoked
from coordinator.db.events import log_event
from coordinator.db.models import Event
from coordinator.db.participants import get_participant
from coordinator.db.types import ParticipantState, utcnow
from shared_model.identity import (
    MAX_SKEW_S,
    REPORT_KINDS,
    SecurityError,
    report_payload,
    verify_signature,
)

MIN_INTERVAL_S = 5.0  # one report per participant per this many seconds


class TooManyReports(Conflict):
    """The participant reported less than the minimum interval ago (retry after
    ``retry_after`` seconds)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BadNodeReport(InvalidToken):
    """The report is not signed by the participant's enrolled key, or is stale."""


def verify_report(public_key: str, payload: bytes, signature: str) -> None:
    """Check ``signature`` against an enrolled OpenSSH/PEM public key.

    Raises:
        BadNodeReport: Malformed or wrong signature.
    """
    try:
        verify_signature(public_key, payload, signature)
    except SecurityError as err:
        raise BadNodeReport("report signature does not match the participant's key") from err


def record_node_report(
    session: Session,
    *,
    participant_id: int,
    kind: str,
    reason: str,
    message: str,
    at: float,
    signature: str,
    now: float | None = None,
    min_interval_s: float = MIN_INTERVAL_S,
) -> Event:
    """Verify a daemon's report and append it to the event log.

    Raises:
        NotFound: No such participant.
        ParticipantRevoked: The participant is revoked (checked after the signature).
        BadNodeReport: Unknown kind, no enrolled key, bad signature, older than
            :data:`MAX_SKEW_S` (or from the future), or not newer than the last report
            accepted from this participant (a replay).
        TooManyReports: Another report of this kind came less than ``min_interval_s``
            ago (a daemon reports once per refusal; this bounds replays and floods).
    """
    if kind not in REPORT_KINDS:
        raise BadNodeReport(f"kind must be one of {', '.join(REPORT_KINDS)}, got {kind!r}")
    row = get_participant(session, participant_id=participant_id)
    if not row.public_key:
        raise BadNodeReport(f"participant {participant_id} has no enrolled key")
    verify_report(row.public_key, report_payload(participant_id, kind, reason, message, at),
                  signature)  # fmt: skip
    if row.state == ParticipantState.REVOKED:
        # Nothing a revoked node says is logged (issue 16); only its key holder learns why.
        raise ParticipantRevoked(
            f"participant {row.id} ({row.name}) is revoked: its reports are not recorded"
        )
    skew = abs((now or time.time()) - at)
    if skew > MAX_SKEW_S:
        raise BadNodeReport(f"report is {skew:.0f} s off the coordinator's clock (> {MAX_SKEW_S})")
    _check_sequence(session, participant_id, at)
    _check_rate(session, participant_id, kind, min_interval_s)
    data: dict[str, Any] = {"reason": reason, "reported_by_node": True, "at": at}
    return log_event(
        session,
        kind=kind,
        message=f"{row.name}: {message}",
        participant_id=row.id,
        data=data,
    )


def _check_sequence(session: Session, participant_id: int, at: float) -> None:
    """Refuse a report whose signed timestamp is not after the last accepted one's."""
    rows = session.scalars(
        select(Event.data)
        .where(Event.participant_id == participant_id, Event.kind.in_(REPORT_KINDS))
        .order_by(Event.id.desc())
        .limit(50)
    )
    last = max(
        (float(d["at"]) for d in rows if d and d.get("reported_by_node") and "at" in d),
        default=None,
    )
    if last is not None and at <= last:
        raise BadNodeReport(
            f"report signed at {at:.3f} is not newer than the last one accepted ({last:.3f}): "
            "a replay"
        )


def _check_rate(session: Session, participant_id: int, kind: str, interval_s: float) -> None:
    now = utcnow()
    recent = session.scalar(
        select(Event.ts)
        .where(
            Event.participant_id == participant_id,
            Event.kind == kind,
            Event.ts >= now - dt.timedelta(seconds=interval_s),
        )
        .order_by(Event.ts.desc())
        .limit(1)
    )
    if recent is not None:
        wait = interval_s - (now - recent).total_seconds()
        raise TooManyReports(
            f"participant {participant_id} reported {kind} less than {interval_s:g} s ago; "
            f"retry in {max(wait, 0):.0f} s",
            retry_after=max(wait, 1.0),
        )
