"""Coordinator database layer: models, engine, migrations and keyword-only CRUD.

Functions take a :class:`~sqlalchemy.orm.Session` and never commit: the caller owns
the transaction (``with session_factory.begin() as session: ...``), so several calls
compose into one atomic unit and an exception rolls everything back.
"""

from coordinator.db.engine import (
    alembic_config,
    current_revision,
    init_db,
    make_engine,
    make_session_factory,
    sqlite_url,
    upgrade,
)
from coordinator.db.errors import (
    Conflict,
    DatabaseConfigError,
    DatabaseError,
    Forbidden,
    IllegalTransition,
    InvalidArgument,
    InvalidToken,
    NotFound,
    ParticipantRevoked,
)
from coordinator.db.models import (
    ApiToken,
    Base,
    ColumnLineage,
    DocLoss,
    DocumentAssignment,
    EnrolmentToken,
    Event,
    ModelVersion,
    Participant,
    ParticipantColumn,
    Result,
    StageJob,
    WorkUnit,
)
from coordinator.db.pagination import Page
from coordinator.db.types import (
    ParticipantState,
    RejectReason,
    ResultState,
    StageJobState,
    TokenRole,
    UnitState,
    utcnow,
)

__all__ = [
    "ApiToken",
    "Base",
    "ColumnLineage",
    "Conflict",
    "DatabaseConfigError",
    "DatabaseError",
    "DocLoss",
    "DocumentAssignment",
    "EnrolmentToken",
    "Event",
    "Forbidden",
    "IllegalTransition",
    "InvalidArgument",
    "InvalidToken",
    "ModelVersion",
    "NotFound",
    "Page",
    "Participant",
    "ParticipantColumn",
    "ParticipantRevoked",
    "ParticipantState",
    "RejectReason",
    "Result",
    "ResultState",
    "StageJob",
    "StageJobState",
    "TokenRole",
    "UnitState",
    "WorkUnit",
    "alembic_config",
    "current_revision",
    "init_db",
    "make_engine",
    "make_session_factory",
    "sqlite_url",
    "upgrade",
    "utcnow",
]
