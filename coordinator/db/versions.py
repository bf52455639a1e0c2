"""Published model versions: atomic, gap-free, monotonically increasing numbers."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from coordinator.db.errors import Conflict, InvalidArgument, NotFound
from coordinator.db.events import log_event
from coordinator.db.models import ModelVersion
from coordinator.db.pagination import Page, check_page

# Arbitrary constant naming the PostgreSQL advisory lock that serialises publishing.
_PUBLISH_LOCK_KEY = 0x5E5C7_0001


def _lock_publishing(session: Session) -> None:
    # SQLite transactions already start with BEGIN IMMEDIATE (engine.py), which holds
    # the write lock; PostgreSQL needs an explicit lock, since max()+1 under READ
    # COMMITTED would let two publishers pick the same number.
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PUBLISH_LOCK_KEY})


def latest_version(session: Session) -> ModelVersion | None:
    """The newest published version, or ``None`` before the first one."""
    return session.scalar(select(ModelVersion).order_by(ModelVersion.version.desc()).limit(1))


def lock_latest_version(session: Session) -> ModelVersion | None:
    """Take the publishing lock for this transaction and return the latest version.

    Call this at the start of a transaction that reads the latest version and then
    publishes the next one: no other publisher can interleave until it commits.
    """
    _lock_publishing(session)
    return latest_version(session)


def get_version(session: Session, *, version: int) -> ModelVersion:
    """The given version; raises :class:`NotFound`."""
    row = session.get(ModelVersion, version)
    if row is None:
        raise NotFound(f"no model version {version}")
    return row


def network_id(session: Session) -> str:
    """This database's network id (``ControlRequest.network_id``): the digest of the root
    version's record, its checksum and the moment it was recorded. The same across
    coordinator restarts; new for every fresh database, even one started from the same
    seed checkpoint, whose versions carry the same numbers and other weights.

    Raises:
        NotFound: nothing is published yet.
    """
    root = get_version(session, version=0)
    record = f"{root.checksum}@{root.created_at.isoformat()}"
    return hashlib.sha256(record.encode()).hexdigest()[:32]


def publish_version(
    session: Session,
    *,
    parent: int | None,
    checksum: str,
    delta_blobs: Sequence[str] = (),
    checkpoint_id: str | None = None,
    metrics: dict[str, Any] | None = None,
    stage: str | None = None,
) -> ModelVersion:
    """Publish the next version (latest + 1; the first version is 0).

    ``parent`` must be the current latest version (``None`` only for the first), so
    a publisher working from a stale view gets :class:`Conflict` instead of silently
    forking the chain.

    Args:
        session: session inside the caller's transaction (publish together with
            :func:`~coordinator.db.results.mark_applied`).
        parent: the version this one was derived from.
        checksum: checksum of the resulting model state (participants verify it).
        delta_blobs: content ids of the compressed deltas from ``parent``.
        checkpoint_id: content id of a full checkpoint of this version, if written.
        metrics: JSON metrics (val loss, tokens so far, ...).
        stage: stage that produced the version.

    Returns:
        The new version row.
    """
    if not checksum:
        raise InvalidArgument("checksum must be non-empty")
    _lock_publishing(session)
    latest = latest_version(session)
    expected = None if latest is None else latest.version
    if parent != expected:
        raise Conflict(
            f"parent {parent} is not the latest version ({expected}); rebuild on the latest"
        )
    number = 0 if latest is None else latest.version + 1
    row = ModelVersion(
        version=number,
        parent=parent,
        stage=stage,
        checksum=checksum,
        checkpoint_id=checkpoint_id,
        delta_blobs=list(delta_blobs),
        metrics=dict(metrics or {}),
    )
    session.add(row)
    session.flush()
    log_event(
        session,
        kind="version.published",
        message=f"version {number} published",
        data={"version": number, "parent": parent, "stage": stage},
    )
    return row


def list_versions(
    session: Session, *, offset: int = 0, limit: int = 100, newest_first: bool = True
) -> Page[ModelVersion]:
    """Published versions, newest first by default."""
    check_page(offset, limit)
    order = ModelVersion.version.desc() if newest_first else ModelVersion.version
    total = session.scalar(select(func.count()).select_from(ModelVersion)) or 0
    rows = session.scalars(select(ModelVersion).order_by(order).offset(offset).limit(limit))
    return Page(items=list(rows.all()), total=total, offset=offset, limit=limit)
