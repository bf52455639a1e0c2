"""Operator API tokens and one-time enrolment tokens; only sha256 hashes are stored.

Tokens are 256-bit random strings, so an unsalted sha256 is safe (no dictionary to
attack) and lets a bearer token be looked up by its hash in one indexed query.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.errors import Forbidden, InvalidArgument, InvalidToken, NotFound
from coordinator.db.events import log_event
from coordinator.db.models import ApiToken, EnrolmentToken, Participant
from coordinator.db.participants import Capability, create_participant
from coordinator.db.types import TokenRole, utcnow

API_TOKEN_PREFIX = "pspk_"
ENROL_TOKEN_PREFIX = "pspe_"


def hash_token(token: str) -> str:
    """sha256 hex digest of a token (what the database stores)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def create_api_token(session: Session, *, name: str, role: TokenRole) -> tuple[str, ApiToken]:
    """Create a bearer token; returns the plaintext (shown once) and the stored row."""
    if not name:
        raise InvalidArgument("token name must be non-empty (say who or what uses it)")
    role = TokenRole(role)
    plain = _new_token(API_TOKEN_PREFIX)
    row = ApiToken(name=name, token_hash=hash_token(plain), role=role)
    session.add(row)
    session.flush()
    log_event(
        session,
        kind="token.created",
        message=f"API token {row.id} ({name}, {role})",
        data={"token_id": row.id, "role": role.value},
    )
    return plain, row


def verify_api_token(
    session: Session, *, token: str, required_role: TokenRole = TokenRole.READ
) -> ApiToken:
    """Return the token's row if it is valid and its role allows ``required_role``.

    Raises:
        InvalidToken: unknown or revoked token.
        Forbidden: a ``read`` token used where ``operator`` is required.
    """
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
    if row is None or row.revoked_at is not None:
        raise InvalidToken(
            "unknown or revoked API token; create one with `perspective coordinator token create`"
        )
    if TokenRole(required_role) == TokenRole.OPERATOR and row.role != TokenRole.OPERATOR:
        raise Forbidden(f"token {row.id} ({row.name}) has role {row.role}; this needs operator")
    return row


def revoke_api_token(session: Session, *, token_id: int) -> ApiToken:
    """Revoke a token by id (idempotent); raises :class:`NotFound`."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFound(f"no API token with id {token_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        log_event(
            session,
            kind="token.revoked",
            message=f"API token {row.id} revoked",
            data={"token_id": row.id},
        )
    session.flush()
    return row


def list_api_tokens(session: Session) -> list[ApiToken]:
    """All API tokens (hashes only), oldest first."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)).all())


def create_enrolment_token(
    session: Session, *, note: str = "", ttl: dt.timedelta | None = None
) -> tuple[str, EnrolmentToken]:
    """Create a one-time enrolment token; returns plaintext (shown once) and row."""
    plain = _new_token(ENROL_TOKEN_PREFIX)
    expires = None if ttl is None else utcnow() + ttl
    row = EnrolmentToken(token_hash=hash_token(plain), note=note, expires_at=expires)
    session.add(row)
    session.flush()
    return plain, row


def enrol_participant(
    session: Session,
    *,
    token: str,
    name: str,
    public_key: str | None = None,
    capability: Capability | None = None,
) -> Participant:
    """Consume an enrolment token and create the participant it admits.

    Raises:
        InvalidToken: unknown, expired or already used token.
    """
    row = session.scalar(
        select(EnrolmentToken)
        .where(EnrolmentToken.token_hash == hash_token(token))
        .with_for_update()
    )
    if row is None:
        raise InvalidToken("unknown enrolment token; ask the operator for a new one")
    if row.used_at is not None:
        raise InvalidToken(f"enrolment token {row.id} was already used; tokens are one-time")
    if row.expires_at is not None and row.expires_at < utcnow():
        raise InvalidToken(f"enrolment token {row.id} expired at {row.expires_at.isoformat()}")
    participant = create_participant(
        session, name=name, public_key=public_key, capability=capability
    )
    row.used_at = utcnow()
    row.participant_id = participant.id
    session.flush()
    return participant
