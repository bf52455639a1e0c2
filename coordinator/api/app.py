"""The coordinator's FastAPI application: REST API, dashboard and Prometheus metrics.

Domain exceptions from the database layer and the blob store are turned into HTTP
errors here and nowhere else, always as ``{"error": code, "detail": message}``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from coordinator.api.deps import Reader
from coordinator.api.routes import (
    enrolment,
    events,
    participants,
    stage_jobs,
    status,
    tokens,
    units,
    versions,
)
from coordinator.api.schemas import ErrorOut
from coordinator.api.settings import ApiSettings
from coordinator.db import (
    Conflict,
    Forbidden,
    IllegalTransition,
    InvalidArgument,
    InvalidToken,
    NotFound,
)
from coordinator.metrics import METRICS, CoordinatorMetrics
from coordinator.node_reports import TooManyReports
from shared_model.blobs import BlobError, BlobNotFound, BlobStore, InvalidContentId

API_PREFIX = "/api/v1"
log = logging.getLogger(__name__)

# (exception type, HTTP status, error code); the first matching entry wins.
ERROR_MAP: list[tuple[type[Exception], int, str]] = [
    (TooManyReports, 429, "too_many_requests"),
    (InvalidToken, 401, "invalid_token"),
    (Forbidden, 403, "forbidden"),
    (NotFound, 404, "not_found"),
    (BlobNotFound, 404, "not_found"),
    (IllegalTransition, 409, "illegal_transition"),
    (Conflict, 409, "conflict"),
    (InvalidArgument, 422, "invalid_argument"),
    (InvalidContentId, 422, "invalid_argument"),
    (IntegrityError, 409, "conflict"),
    (OperationalError, 503, "database_unavailable"),
    (BlobError, 500, "blob_store_error"),
]


def _handler(status: int, code: str) -> Callable[[Request, Exception], Response]:
    def handle(request: Request, exc: Exception) -> Response:
        if isinstance(exc, IntegrityError):
            # The driver's message may quote row values; keep it out of the answer.
            detail = "the request conflicts with stored data (a unique value is already taken)"
        elif isinstance(exc, OperationalError):
            log.warning("database error on %s %s: %s", request.method, request.url.path, exc)
            detail = "the database is unavailable or busy; retry shortly"
        else:
            detail = str(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)

    return handle


# Documented on every API route, so clients (and the schema tests) know each error's shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status_code: {"model": ErrorOut, "description": description}
    for status_code, description in [
        (401, "missing, unknown or revoked token"),
        (403, "the token's role does not allow this"),
        (404, "no such row"),
        (409, "conflicts with the stored state (e.g. an illegal stage transition)"),
        (422, "invalid request"),
        (503, "database unavailable"),
    ]
}


def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    detail = jsonable_encoder(exc.errors(), exclude={"input", "ctx", "url"})
    return JSONResponse({"error": "validation_error", "detail": detail}, status_code=422)


def _api_router() -> APIRouter:
    api = APIRouter(prefix=API_PREFIX, responses=ERROR_RESPONSES)
    for module in (status, participants, units, versions, stage_jobs, events, enrolment, tokens):
        api.include_router(module.router)
    return api


def create_app(
    session_factory: sessionmaker[Session],
    settings: ApiSettings | None = None,
    *,
    metrics: CoordinatorMetrics | None = None,
) -> FastAPI:
    """Build the coordinator's web application.

    Args:
        session_factory: from :func:`coordinator.db.make_session_factory` (migrated DB).
        settings: API settings; defaults to :class:`ApiSettings()`.
        metrics: Prometheus metrics to expose at ``/metrics``; defaults to the process-wide
            :data:`coordinator.metrics.METRICS` the federation loop reports to.

    Returns:
        The FastAPI app: ``/api/v1/...`` (OpenAPI at ``/docs``), the dashboard at ``/``,
        Prometheus at ``/metrics``.
    """
    from coordinator.dashboard import mount_dashboard

    settings = settings or ApiSettings()
    metrics = metrics or METRICS
    # FastAPIOffline: /docs and /redoc with Swagger UI and ReDoc served from the package,
    # not from a CDN (coordinators often run without internet access).
    app = FastAPIOffline(
        title="Perspective coordinator API",
        version="1",
        description="Status, participants, work units, versions, stage jobs, events and "
        "enrolment of a Perspective federated training network. State-changing endpoints "
        "need an operator bearer token.",
    )
    app.state.session_factory = session_factory
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.blob_store = None if settings.blob_root is None else BlobStore(settings.blob_root)
    engine = session_factory.kw.get("bind")
    if engine is not None:
        metrics.instrument_engine(engine)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for exc_type, code_status, code in ERROR_MAP:
        app.add_exception_handler(exc_type, _handler(code_status, code))
    app.include_router(_api_router())

    @app.get("/metrics", include_in_schema=False, dependencies=[Reader])
    def prometheus() -> Response:
        if settings.metrics_from_db:
            with session_factory() as session:
                metrics.refresh_from_db(session)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    mount_dashboard(app, settings)
    return app
