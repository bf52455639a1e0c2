"""One page of a listing, as returned by every ``list_*`` function."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from coordinator.db.errors import InvalidArgument

T = TypeVar("T")
MAX_LIMIT = 1000


@dataclass(frozen=True)
class Page(Generic[T]):
    """Rows of one page plus the total number of matching rows."""

    items: list[T] = field(default_factory=list)
    total: int = 0
    offset: int = 0
    limit: int = 100


def check_page(offset: int, limit: int) -> None:
    """Raise :class:`InvalidArgument` unless ``0 <= offset`` and ``1 <= limit <= 1000``."""
    if offset < 0:
        raise InvalidArgument(f"offset must be >= 0, got {offset}")
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidArgument(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
