"""column_lineage: who trains each expert column's local copy in a stage

A participant keeps the training of its columns on its node between units and sends
``local - published``. A column another participant was leased since (a re-queued unit
taken by another node, or columns replicated over more nodes than columns) has published
weights that no longer come from that local copy: its delta then reverted the other
node's training.
The coordinator records the participant last leased each column per stage and tells a
node to start such a column from the published weights (``WorkUnit.fresh_columns``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 11:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "column_lineage",
        sa.Column("stage", sa.String(length=32), nullable=False),
        sa.Column("column", sa.Integer(), nullable=False),
        sa.Column("participant_id", sa.Integer(), nullable=False),
        sa.Column("unit_id", sa.String(length=36), nullable=False),
        sa.Column("leased_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["participant_id"],
            ["participants.id"],
            name=op.f("fk_column_lineage_participant_id_participants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("stage", "column", name=op.f("pk_column_lineage")),
    )
    with op.batch_alter_table("column_lineage", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_column_lineage_participant_id"), ["participant_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("column_lineage", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_column_lineage_participant_id"))
    op.drop_table("column_lineage")
