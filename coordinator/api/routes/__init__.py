"""Thin routes: parse the request, call the database layer, serialise the answer."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi import Path, Query
from pydantic import BaseModel

from coordinator.api.schemas import PageOut
from coordinator.db import Page

M = TypeVar("M", bound=BaseModel)

# Ids are bounded so that no request can overflow a 64-bit database integer.
MAX_ID = 2**62
Offset = Annotated[int, Query(ge=0, le=MAX_ID, description="rows to skip")]
Limit = Annotated[int, Query(ge=1, le=1000, description="page size")]
IdPath = Annotated[int, Path(ge=0, le=MAX_ID)]


def page_out(page: Page[Any], model: type[M]) -> PageOut[M]:
    """Serialise a database :class:`Page` of rows with ``model``."""
    return PageOut[model](  # type: ignore[valid-type]
        items=[model.model_validate(row) for row in page.items],
        total=page.total,
        offset=page.offset,
        limit=page.limit,
    )
