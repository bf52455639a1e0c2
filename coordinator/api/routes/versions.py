"""Published model versions and blob downloads (HTTP Range, ETag = content id)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Request, Response
from fastapi.responses import FileResponse

from coordinator.api.deps import DbSession, Reader, Settings
from coordinator.api.routes import MAX_ID, Limit, Offset, page_out
from coordinator.api.schemas import ErrorOut, PageOut, VersionOut
from coordinator.db import NotFound
from coordinator.db.versions import get_version, list_versions
from shared_model.blobs import BlobStore, check_content_id

router = APIRouter(tags=["versions"], dependencies=[Reader])


@router.get("/versions", response_model=PageOut[VersionOut])
def versions(
    session: DbSession, offset: Offset = 0, limit: Limit = 100, newest_first: bool = True
) -> PageOut[VersionOut]:
    """Published versions, newest first by default."""
    page = list_versions(session, offset=offset, limit=limit, newest_first=newest_first)
    return page_out(page, VersionOut)


@router.get("/versions/{version}", response_model=VersionOut)
def version(session: DbSession, version: Annotated[int, Path(ge=0, le=MAX_ID)]) -> VersionOut:
    """One version's metadata: parent, checksum, delta blobs, checkpoint, metrics."""
    return VersionOut.model_validate(get_version(session, version=version))


def _store(request: Request, settings: Settings) -> BlobStore:
    store = getattr(request.app.state, "blob_store", None)
    if store is None:
        raise NotFound(
            "this coordinator serves no blobs over HTTP (ApiSettings.blob_root is not set)"
        )
    return store


BLOB_RESPONSES: dict = {
    200: {"content": {"application/octet-stream": {}}, "description": "the blob's bytes"},
    206: {"content": {"application/octet-stream": {}}, "description": "a byte range"},
    304: {"description": "not modified (If-None-Match: the content id, weak or not, or *)"},
    404: {"model": ErrorOut},
    416: {"description": "range not satisfiable"},
}


# GET and HEAD registered apart: one route for both gives them one operation id.
@router.head("/blobs/{content_id}", response_class=FileResponse, responses=BLOB_RESPONSES,
             operation_id="head_blob")  # fmt: skip
@router.get("/blobs/{content_id}", response_class=FileResponse, responses=BLOB_RESPONSES,
            operation_id="get_blob")  # fmt: skip
def blob(
    request: Request,
    settings: Settings,
    content_id: Annotated[str, Path(min_length=64, max_length=64, pattern="^[0-9a-f]{64}$")],
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """Download a published blob (versions, checkpoints, shards, the teacher; never a
    participant's upload) by content id (sha256); supports ``HEAD``, ``Range`` and
    ``If-None-Match``.

    The ETag is the content id itself: a blob's bytes never change, so a weak tag
    (``W/"..."``) matches as well as a strong one, and ``*`` matches any blob we have.
    """
    check_content_id(content_id)
    store = _store(request, settings)
    etag = f'"{content_id}"'
    published = request.app.state.blob_published
    # A participant's upload is not served (the same answer as a missing blob: its
    # existence is not told either); only what the coordinator published.
    if not store.has(content_id) or (published is not None and not published(content_id)):
        raise NotFound(f"no published blob {content_id} in the coordinator's store")
    if if_none_match is not None and _matches(if_none_match, etag):
        return Response(status_code=304, headers={"etag": etag})
    return FileResponse(
        store.path(content_id),
        media_type="application/octet-stream",
        headers={"etag": etag, "cache-control": "public, max-age=31536000, immutable"},
    )


def _matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 weak comparison of an ``If-None-Match`` list with our ETag."""
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags
