"""Domain exceptions of the coordinator database layer (no HTTP here).

The REST layer maps them: ``NotFound`` → 404, ``IllegalTransition``/``Conflict`` → 409,
``InvalidToken`` → 401, ``Forbidden`` → 403, ``InvalidArgument`` → 422.
"""

from __future__ import annotations


class DatabaseError(Exception):
    """Base class of every coordinator database error."""


class DatabaseConfigError(DatabaseError, ValueError):
    """The database URL or settings are unusable."""


class InvalidArgument(DatabaseError, ValueError):
    """A caller passed a value the database layer cannot store (says which and why)."""


class NotFound(DatabaseError, LookupError):
    """The requested row does not exist."""


class Conflict(DatabaseError):
    """The request contradicts the stored state (e.g. a stale parent version)."""


class IllegalTransition(Conflict):
    """A state machine was asked for a transition it does not allow."""


class ParticipantRevoked(Conflict):
    """The participant has been revoked and may not take part any more."""


class ParticipantUnknown(NotFound):
    """A Flower node no enrolled participant owns (enrolled networks create none)."""


class InvalidToken(DatabaseError):
    """A bearer or enrolment token is unknown, revoked, expired or already used."""


class Forbidden(DatabaseError, PermissionError):
    """The token is valid but its role does not allow the action."""
