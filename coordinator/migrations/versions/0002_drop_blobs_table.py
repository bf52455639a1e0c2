"""drop the unused blobs table

Blob refcounts were never maintained (nothing called ``coordinator/db/blobs.py``); the
coordinator's blob garbage collection (``coordinator/blob_gc.py``) derives what is still
referenced from the published versions, the result log and the stage's inputs instead.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("blobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_blobs_kind"))
    op.drop_table("blobs")


def downgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("content_id", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("refcount", sa.Integer(), nullable=False),
        sa.CheckConstraint("refcount >= 0", name=op.f("ck_blobs_refcount_nonnegative")),
        sa.CheckConstraint("size >= 0", name=op.f("ck_blobs_size_nonnegative")),
        sa.PrimaryKeyConstraint("content_id", name=op.f("pk_blobs")),
    )
    with op.batch_alter_table("blobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_blobs_kind"), ["kind"], unique=False)
