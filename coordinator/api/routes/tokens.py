"""API bearer tokens (operator only)."""

from __future__ import annotations

from fastapi import APIRouter

from coordinator.api.deps import DbSession, Operator
from coordinator.api.routes import IdPath
from coordinator.api.schemas import ApiTokenCreate, ApiTokenCreatedOut, ApiTokenOut
from coordinator.db import TokenRole
from coordinator.db.tokens import create_api_token, list_api_tokens, revoke_api_token

router = APIRouter(prefix="/tokens", tags=["tokens"], dependencies=[Operator])


@router.get("", response_model=list[ApiTokenOut])
def tokens(session: DbSession) -> list[ApiTokenOut]:
    """All API tokens (never their secrets), oldest first."""
    return [ApiTokenOut.model_validate(t) for t in list_api_tokens(session)]


@router.post("", response_model=ApiTokenCreatedOut, status_code=201)
def create(session: DbSession, body: ApiTokenCreate) -> ApiTokenCreatedOut:
    """Create a token; its plaintext appears only in this answer."""
    plain, row = create_api_token(session, name=body.name, role=TokenRole(body.role))
    return ApiTokenCreatedOut(**ApiTokenOut.model_validate(row).model_dump(), token=plain)


@router.delete("/{token_id}", response_model=ApiTokenOut)
def revoke(session: DbSession, token_id: IdPath) -> ApiTokenOut:
    """Revoke a token (idempotent)."""
    return ApiTokenOut.model_validate(revoke_api_token(session, token_id=token_id))
