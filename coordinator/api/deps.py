"""FastAPI dependencies: the per-request database session and bearer-token auth.

Every state-changing route depends on :func:`require_operator`; read routes depend on
:func:`require_reader`, which only checks a token when
``ApiSettings.read_requires_token`` is set. Tokens are checked against their sha256 in
the database and are never logged.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from coordinator.api.settings import ApiSettings
from coordinator.db import ApiToken, InvalidToken, TokenRole
from coordinator.db.tokens import verify_api_token
from coordinator.metrics import CoordinatorMetrics

BEARER = HTTPBearer(
    auto_error=False,
    description="API token from `perspective coordinator token create` (Authorization: Bearer)",
)
#: The credential of reads: its own scheme, so the OpenAPI document can say that reads are
#: public unless the coordinator runs with ``--read-requires-token`` (see ``create_app``).
READ_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="ReadToken",
    description="A read or operator API token (Authorization: Bearer); needed only when the "
    "coordinator runs with `serve --read-requires-token`",
)


def session_factory(request: Request) -> sessionmaker[Session]:
    """The app's session factory."""
    return request.app.state.session_factory


def settings(request: Request) -> ApiSettings:
    """The app's settings."""
    return request.app.state.settings


def metrics(request: Request) -> CoordinatorMetrics:
    """The app's Prometheus metrics."""
    return request.app.state.metrics


def db_session(request: Request) -> Iterator[Session]:
    """One transaction per request: committed before the response is sent.

    A domain exception raised by the route rolls the transaction back and is turned into
    an HTTP error by the handlers in :mod:`coordinator.api.app`.
    """
    with session_factory(request).begin() as session:
        yield session


# scope="function": commit when the route returns, before the client sees a 2xx, so an
# acknowledged state change is durable.
DbSession = Annotated[Session, Depends(db_session, scope="function")]
Settings = Annotated[ApiSettings, Depends(settings)]


def _check(
    request: Request, creds: HTTPAuthorizationCredentials | None, role: TokenRole
) -> ApiToken:
    if creds is None or not creds.credentials:
        raise InvalidToken(
            "missing bearer token: send 'Authorization: Bearer <token>'; create a token with "
            "`perspective coordinator token create`"
        )
    with session_factory(request).begin() as session:
        token = verify_api_token(session, token=creds.credentials, required_role=role)
        session.expunge(token)
    request.state.token_id = token.id
    return token


def require_operator(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
) -> ApiToken:
    """Allow the request only with a valid, unrevoked operator token (401/403 otherwise)."""
    return _check(request, creds, TokenRole.OPERATOR)


def require_reader(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Security(READ_BEARER)],
) -> ApiToken | None:
    """Allow reads; with ``read_requires_token`` a valid read or operator token is needed."""
    if not settings(request).read_requires_token:
        return None
    return _check(request, creds, TokenRole.READ)


Operator = Depends(require_operator)
Reader = Depends(require_reader)
