"""Column types and enumerations shared by the ORM models and the migrations."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


def utcnow() -> dt.datetime:
    """Return the current time as a timezone-aware UTC datetime."""
    return dt.datetime.now(dt.UTC)


class UInt64(TypeDecorator[int]):
    """An unsigned 64-bit integer (Flower node ids) in a signed BIGINT column.

    SQLite and PostgreSQL integers are signed 64-bit; Flower node ids use the full
    unsigned range, so values >= 2**63 are stored as their two's-complement negative.
    """

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Dialect) -> int | None:
        if value is None:
            return None
        if not 0 <= value < 1 << 64:
            raise ValueError(f"node id {value} is outside the unsigned 64-bit range")
        return value - (1 << 64) if value >= 1 << 63 else value

    def process_result_value(self, value: int | None, dialect: Dialect) -> int | None:
        if value is None:
            return None
        return value + (1 << 64) if value < 0 else value


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp that is always timezone-aware UTC in Python.

    SQLite has no time zones and returns naive datetimes; PostgreSQL returns aware
    ones. Normalising both to aware UTC lets the scheduler compare deadlines with
    ``utcnow()`` on either backend. Naive datetimes are refused on the way in, since
    their zone is unknowable.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(
                f"naive datetime {value!r} given to the database; pass an aware UTC "
                "datetime (e.g. coordinator.db.utcnow())"
            )
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class ParticipantState(StrEnum):
    """Lifecycle of a participant (volunteer node)."""

    ENROLLED = "enrolled"
    ONLINE = "online"
    OFFLINE = "offline"
    REVOKED = "revoked"


class UnitState(StrEnum):
    """Lifecycle of a work unit (lease)."""

    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"
    REJECTED = "rejected"
    EXPIRED = "expired"
    FAILED = "failed"


class ResultState(StrEnum):
    """Outcome stored for an answered work unit."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"


class RejectReason(StrEnum):
    """Machine-readable reason codes for rejected results (shown on the dashboard).

    The first four are decided by the lease checks of
    :func:`coordinator.intake.record_result`; the others by its payload checks.
    """

    UNKNOWN_LEASE = "UNKNOWN_LEASE"
    WRONG_NODE = "WRONG_NODE"
    EXPIRED_LEASE = "EXPIRED_LEASE"
    BASE_MISMATCH = "BASE_MISMATCH"
    STALE_BASE = "STALE_BASE"
    MALFORMED = "MALFORMED"
    BAD_SHAPE = "BAD_SHAPE"
    BAD_CHECKSUM = "BAD_CHECKSUM"
    MISSING_BLOB = "MISSING_BLOB"
    FOREIGN_BLOB = "FOREIGN_BLOB"  # a blob not uploaded under the result's own lease
    NON_FINITE = "NON_FINITE"
    SCALE_OUT_OF_BOUNDS = "SCALE_OUT_OF_BOUNDS"
    NORM_OUT_OF_BOUNDS = "NORM_OUT_OF_BOUNDS"
    LOSS_INCREASE = "LOSS_INCREASE"  # a column result worsens held-out loss of its column
    OVER_QUOTA = "OVER_QUOTA"
    LOSS_CHECK = "LOSS_CHECK"
    REPLICA_MISMATCH = "REPLICA_MISMATCH"
    PARTICIPANT_FAILED = "PARTICIPANT_FAILED"


class StageJobState(StrEnum):
    """Lifecycle of a coordinator stage job."""

    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TokenRole(StrEnum):
    """Role of an operator API token; ``operator`` may do everything ``read`` may."""

    OPERATOR = "operator"
    READ = "read"


def check_in(column: str, enum: type[StrEnum]) -> str:
    """SQL text of a CHECK constraint restricting ``column`` to the enum's values."""
    values = ", ".join(f"'{member.value}'" for member in enum)
    return f"{column} IN ({values})"
