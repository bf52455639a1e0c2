"""SQLAlchemy 2 ORM models of the coordinator database (DESIGN §5).

The database is the source of truth for resume: Flower replies can be pulled only
once, so every lease, result, version and stage transition is stored here before it
is acted on. Schema changes go through Alembic (``coordinator/migrations``); the test
suite fails if these models and the migrations disagree.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from coordinator.db.types import (
    ParticipantState,
    ResultState,
    StageJobState,
    TokenRole,
    UInt64,
    UnitState,
    UTCDateTime,
    check_in,
    utcnow,
)

# Deterministic constraint names, so Alembic can alter/drop them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with the naming convention and JSON type map."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, dt.datetime: UTCDateTime}


def _participant_fk(nullable: bool = True) -> Mapped[int | None]:
    return mapped_column(
        ForeignKey("participants.id", ondelete="SET NULL"), nullable=nullable, index=True
    )


class Participant(Base):
    """A volunteer node; ``node_id`` is Flower's node id, known from first contact."""

    __tablename__ = "participants"
    __table_args__ = (CheckConstraint(check_in("state", ParticipantState), name="state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int | None] = mapped_column(UInt64, unique=True)
    name: Mapped[str] = mapped_column(String(128))
    public_key: Mapped[str | None] = mapped_column(Text, unique=True)
    state: Mapped[str] = mapped_column(String(16), default=ParticipantState.ENROLLED, index=True)
    max_columns: Mapped[int] = mapped_column(Integer, default=1)
    max_params: Mapped[int | None] = mapped_column(BigInteger)
    threads: Mapped[int | None] = mapped_column(Integer)
    device: Mapped[str | None] = mapped_column(String(64))
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[dt.datetime | None] = mapped_column()
    credit: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_down: Mapped[int] = mapped_column(BigInteger, default=0)
    units_done: Mapped[int] = mapped_column(Integer, default=0)
    units_rejected: Mapped[int] = mapped_column(Integer, default=0)


class ParticipantColumn(Base):
    """Expert columns a participant holds (scheduler affinity)."""

    __tablename__ = "participant_columns"

    participant_id: Mapped[int] = mapped_column(
        ForeignKey("participants.id", ondelete="CASCADE"), primary_key=True
    )
    column: Mapped[int] = mapped_column(Integer, primary_key=True, index=True)
    assigned_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ColumnLineage(Base):
    """Who trains each expert column's local copy in a stage: the participant last leased
    a unit on it. A participant keeps its columns' training on its node between units and
    sends ``local - published``; once another participant was leased the column, that
    local copy is no longer what the column's published weights came from, and its next
    unit starts from the published weights instead (``WorkUnit.fresh_columns``)."""

    __tablename__ = "column_lineage"

    stage: Mapped[str] = mapped_column(String(32), primary_key=True)
    column: Mapped[int] = mapped_column(Integer, primary_key=True)
    participant_id: Mapped[int] = mapped_column(
        ForeignKey("participants.id", ondelete="CASCADE"), index=True
    )
    unit_id: Mapped[str] = mapped_column(String(36))
    leased_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class WorkUnit(Base):
    """A lease: one unit of training/scoring work for one participant."""

    __tablename__ = "work_units"
    __table_args__ = (
        CheckConstraint(check_in("state", UnitState), name="state"),
        CheckConstraint("attempt >= 1", name="attempt_positive"),
        Index("ix_work_units_participant_state", "participant_id", "state"),
        Index("ix_work_units_state_deadline", "state", "deadline"),
    )

    unit_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    participant_id: Mapped[int | None] = _participant_fk()
    stage: Mapped[str] = mapped_column(String(32))
    base_version: Mapped[int] = mapped_column(Integer)
    columns: Mapped[list[Any]] = mapped_column(default=list)
    docs: Mapped[list[Any]] = mapped_column(default=list)
    steps: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default=UnitState.QUEUED)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    leased_at: Mapped[dt.datetime | None] = mapped_column()
    deadline: Mapped[dt.datetime | None] = mapped_column()
    finished_at: Mapped[dt.datetime | None] = mapped_column()
    message_id: Mapped[str | None] = mapped_column(String(128))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    reissued_from: Mapped[str | None] = mapped_column(
        ForeignKey("work_units.unit_id", ondelete="SET NULL"), index=True
    )
    # Participants that must not get this unit again (failed or timed out on it).
    excluded_participants: Mapped[list[Any]] = mapped_column(default=list)
    state_reason: Mapped[str | None] = mapped_column(Text)


class Result(Base):
    """The answer to a work unit; ``unit_id`` is unique, which makes replays idempotent."""

    __tablename__ = "results"
    __table_args__ = (
        CheckConstraint(check_in("state", ResultState), name="state"),
        Index("ix_results_pending", "state", "applied_in_version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    unit_id: Mapped[str] = mapped_column(
        ForeignKey("work_units.unit_id", ondelete="CASCADE"), unique=True
    )
    participant_id: Mapped[int | None] = _participant_fk()
    base_version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    reject_reason: Mapped[str | None] = mapped_column(String(32), index=True)
    reject_detail: Mapped[str | None] = mapped_column(Text)
    blob_ids: Mapped[dict[str, Any]] = mapped_column(default=dict)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    train_loss: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    applied_in_version: Mapped[int | None] = mapped_column(Integer)


class ModelVersion(Base):
    """A published global model version (a chain of deltas from its parent)."""

    __tablename__ = "model_versions"
    __table_args__ = (CheckConstraint("version >= 0", name="version_nonnegative"),)

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent: Mapped[int | None] = mapped_column(ForeignKey("model_versions.version"))
    stage: Mapped[str | None] = mapped_column(String(32))
    checksum: Mapped[str] = mapped_column(String(128))
    checkpoint_id: Mapped[str | None] = mapped_column(String(64))
    delta_blobs: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)


class StageJob(Base):
    """A resumable, idempotent stage job (DESIGN §2)."""

    __tablename__ = "stage_jobs"
    __table_args__ = (CheckConstraint(check_in("state", StageJobState), name="state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    stage: Mapped[str] = mapped_column(String(32), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default=StageJobState.QUEUED, index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Event(Base):
    """One line of the audit log."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    participant_id: Mapped[int | None] = _participant_fk()
    # No foreign key: events may name units that were never stored (UNKNOWN_LEASE).
    unit_id: Mapped[str | None] = mapped_column(String(36), index=True)
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ApiToken(Base):
    """An operator/read bearer token; only its sha256 is stored."""

    __tablename__ = "api_tokens"
    __table_args__ = (CheckConstraint(check_in("role", TokenRole), name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column()


class EnrolmentToken(Base):
    """A one-time token a volunteer uses to enrol; only its sha256 is stored."""

    __tablename__ = "enrolment_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    note: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column()
    used_at: Mapped[dt.datetime | None] = mapped_column()
    participant_id: Mapped[int | None] = _participant_fk()


class DocumentAssignment(Base):
    """Routing: document -> expert column, one row per document per routing epoch."""

    __tablename__ = "document_assignments"
    __table_args__ = (Index("ix_document_assignments_epoch_column", "epoch", "column"),)

    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    doc_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    column: Mapped[int] = mapped_column(Integer)
    score: Mapped[float | None] = mapped_column(Float)
    assigned_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class DocLoss(Base):
    """A per-document loss of one column, reported by a participant in a scoring unit."""

    __tablename__ = "doc_losses"
    __table_args__ = (
        UniqueConstraint("unit_id", "doc_id", "column", name="uq_doc_losses_unit_doc_column"),
        Index("ix_doc_losses_doc_column", "doc_id", "column"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    doc_id: Mapped[str] = mapped_column(String(128))
    column: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float] = mapped_column(Float)
    version: Mapped[int] = mapped_column(Integer)
    unit_id: Mapped[str | None] = mapped_column(
        ForeignKey("work_units.unit_id", ondelete="SET NULL"), index=True
    )
    participant_id: Mapped[int | None] = _participant_fk()
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
