"""The coordinator's FastAPI application: REST API, dashboard and Prometheus metrics.

Domain exceptions from the database layer and the blob store are turned into HTTP
errors here and nowhere else, always as ``{"error": code, "detail": message}`` — the
framework's own errors too (unknown route 404, wrong method 405 with the route's full
``Allow``, malformed 400, and 413 for a body over ``ApiSettings.max_body_bytes``, refused
by :class:`BodyLimit` before anything parses it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

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
from coordinator.db.errors import ParticipantRevoked
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
    (ParticipantRevoked, 409, "participant_revoked"),
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
        if isinstance(exc, TooManyReports):
            headers = {"Retry-After": str(math.ceil(exc.retry_after))}
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
        (413, "request body larger than the API accepts"),
        (422, "invalid request"),
        (503, "database unavailable"),
    ]
}


def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    detail = jsonable_encoder(exc.errors(), exclude={"input", "ctx", "url"})
    return JSONResponse({"error": "validation_error", "detail": detail}, status_code=422)


# Codes of the framework's own errors (unknown route, wrong method, malformed request).
HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
              413: "payload_too_large", 416: "range_not_satisfiable"}  # fmt: skip


def _allowed_methods(request: Request) -> str | None:
    """Every method the API's routes accept at this path, from the OpenAPI document
    (Starlette's 405 names only the first matching route's)."""
    for template, operations in request.app.openapi()["paths"].items():
        if compile_path(template)[0].match(request.url.path):
            return ", ".join(sorted(m.upper() for m in operations))
    return None


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    detail = exc.detail
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.url.path} (the API's routes are listed at /docs)"
    elif exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
        detail = f"{request.method} is not allowed on {request.url.path}; use {headers['Allow']}"
    code = HTTP_CODES.get(exc.status_code, "http_error")
    return JSONResponse({"error": code, "detail": detail}, exc.status_code, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 before the app
    (and its JSON parser) sees any of it, whether or not ``Content-Length`` says so."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send, declared.isdigit())
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(send, True)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, send: Callable, too_large: bool) -> None:
        if too_large:
            status, code = 413, "payload_too_large"
            detail = f"request body over {self.max_bytes} bytes: this API takes small JSON bodies"
        else:
            status, code, detail = 400, "bad_request", "Content-Length is not a number"
        await JSONResponse({"error": code, "detail": detail}, status)({"type": "http"}, None, send)


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
    blob_published: Callable[[str], bool] | None = None,
) -> FastAPI:
    """Build the coordinator's web application.

    Args:
        session_factory: from :func:`coordinator.db.make_session_factory` (migrated DB).
        settings: API settings; defaults to :class:`ApiSettings()`.
        metrics: Prometheus metrics to expose at ``/metrics``; defaults to the process-wide
            :data:`coordinator.metrics.METRICS` the federation loop reports to.
        blob_published: which blobs ``GET /api/v1/blobs/{id}`` serves (the coordinator's
            :meth:`~coordinator.coordinator_process.Coordinator.is_published`: never a
            participant's upload); ``None``: every blob in ``settings.blob_root``.

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
    app.state.blob_published = blob_published
    engine = session_factory.kw.get("bind")
    if engine is not None:
        metrics.instrument_engine(engine)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
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
    _declare_read_access(app, settings.read_requires_token)
    return app


def _declare_read_access(app: FastAPI, read_requires_token: bool) -> None:
    """Make the OpenAPI document say what reads need: with ``read_requires_token`` a
    ``ReadToken``; without it nothing (``security: [{}, ReadToken]``, auth optional)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema.get("paths", {}).values():
                for op in operations.values():
                    security = op.get("security", []) if isinstance(op, dict) else []
                    if not read_requires_token and {"ReadToken": []} in security:
                        op["security"] = [{}, *security]
        return app.openapi_schema

    app.openapi = openapi
