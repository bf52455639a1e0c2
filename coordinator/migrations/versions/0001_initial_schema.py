"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25 17:39:37.130053
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("role IN ('operator', 'read')", name=op.f("ck_api_tokens_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
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

    op.create_table(
        "document_assignments",
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("doc_id", sa.String(length=128), nullable=False),
        sa.Column("column", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("epoch", "doc_id", name=op.f("pk_document_assignments")),
    )
    with op.batch_alter_table("document_assignments", schema=None) as batch_op:
        batch_op.create_index(
            "ix_document_assignments_epoch_column", ["epoch", "column"], unique=False
        )

    op.create_table(
        "model_versions",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("parent", sa.Integer(), nullable=True),
        sa.Column("stage", sa.String(length=32), nullable=True),
        sa.Column("checksum", sa.String(length=128), nullable=False),
        sa.Column("checkpoint_id", sa.String(length=64), nullable=True),
        sa.Column("delta_blobs", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.CheckConstraint("version >= 0", name=op.f("ck_model_versions_version_nonnegative")),
        sa.ForeignKeyConstraint(
            ["parent"],
            ["model_versions.version"],
            name=op.f("fk_model_versions_parent_model_versions"),
        ),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_model_versions")),
    )
    op.create_table(
        "participants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.BigInteger(), nullable=True),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("max_columns", sa.Integer(), nullable=False),
        sa.Column("max_params", sa.BigInteger(), nullable=True),
        sa.Column("threads", sa.Integer(), nullable=True),
        sa.Column("device", sa.String(length=64), nullable=True),
        sa.Column("tokens_per_s", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("credit", sa.BigInteger(), nullable=False),
        sa.Column("bytes_up", sa.BigInteger(), nullable=False),
        sa.Column("bytes_down", sa.BigInteger(), nullable=False),
        sa.Column("units_done", sa.Integer(), nullable=False),
        sa.Column("units_rejected", sa.Integer(), nullable=False),
        sa.CheckConstraint(
            "state IN ('enrolled', 'online', 'offline', 'revoked')",
            name=op.f("ck_participants_state"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_participants")),
        sa.UniqueConstraint("node_id", name=op.f("uq_participants_node_id")),
        sa.UniqueConstraint("public_key", name=op.f("uq_participants_public_key")),
    )
    with op.batch_alter_table("participants", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_participants_state"), ["state"], unique=False)

    op.create_table(
        "stage_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(length=32), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'paused', 'done', 'failed', 'cancelled')",
            name=op.f("ck_stage_jobs_state"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stage_jobs")),
    )
    with op.batch_alter_table("stage_jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_stage_jobs_stage"), ["stage"], unique=False)
        batch_op.create_index(batch_op.f("ix_stage_jobs_state"), ["state"], unique=False)

    op.create_table(
        "enrolment_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("note", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("participant_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["participant_id"],
            ["participants.id"],
            name=op.f("fk_enrolment_tokens_participant_id_participants"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrolment_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_enrolment_tokens_token_hash")),
    )
    with op.batch_alter_table("enrolment_tokens", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_enrolment_tokens_participant_id"), ["participant_id"], unique=False
        )

    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("participant_id", sa.Integer(), nullable=True),
        sa.Column("unit_id", sa.String(length=36), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["participant_id"],
            ["participants.id"],
            name=op.f("fk_events_participant_id_participants"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_events_kind"), ["kind"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_events_participant_id"), ["participant_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_events_ts"), ["ts"], unique=False)
        batch_op.create_index(batch_op.f("ix_events_unit_id"), ["unit_id"], unique=False)

    op.create_table(
        "participant_columns",
        sa.Column("participant_id", sa.Integer(), nullable=False),
        sa.Column("column", sa.Integer(), nullable=False),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["participant_id"],
            ["participants.id"],
            name=op.f("fk_participant_columns_participant_id_participants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("participant_id", "column", name=op.f("pk_participant_columns")),
    )
    with op.batch_alter_table("participant_columns", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_participant_columns_column"), ["column"], unique=False)

    op.create_table(
        "work_units",
        sa.Column("unit_id", sa.String(length=36), nullable=False),
        sa.Column("participant_id", sa.Integer(), nullable=True),
        sa.Column("stage", sa.String(length=32), nullable=False),
        sa.Column("base_version", sa.Integer(), nullable=False),
        sa.Column("columns", sa.JSON(), nullable=False),
        sa.Column("docs", sa.JSON(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("leased_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("message_id", sa.String(length=128), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("reissued_from", sa.String(length=36), nullable=True),
        sa.Column("excluded_participants", sa.JSON(), nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "state IN ('queued', 'leased', 'done', 'rejected', 'expired', 'failed')",
            name=op.f("ck_work_units_state"),
        ),
        sa.CheckConstraint("attempt >= 1", name=op.f("ck_work_units_attempt_positive")),
        sa.ForeignKeyConstraint(
            ["participant_id"],
            ["participants.id"],
            name=op.f("fk_work_units_participant_id_participants"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["reissued_from"],
            ["work_units.unit_id"],
            name=op.f("fk_work_units_reissued_from_work_units"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("unit_id", name=op.f("pk_work_units")),
    )
    with op.batch_alter_table("work_units", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_work_units_participant_id"), ["participant_id"], unique=False
        )
        batch_op.create_index(
            "ix_work_units_participant_state", ["participant_id", "state"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_work_units_reissued_from"), ["reissued_from"], unique=False
        )
        batch_op.create_index("ix_work_units_state_deadline", ["state", "deadline"], unique=False)

    op.create_table(
        "doc_losses",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("doc_id", sa.String(length=128), nullable=False),
        sa.Column("column", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("unit_id", sa.String(length=36), nullable=True),
        sa.Column("participant_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["participant_id"],
            ["participants.id"],
            name=op.f("fk_doc_losses_participant_id_participants"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["unit_id"],
            ["work_units.unit_id"],
            name=op.f("fk_doc_losses_unit_id_work_units"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_doc_losses")),
        sa.UniqueConstraint("unit_id", "doc_id", "column", name="uq_doc_losses_unit_doc_column"),
    )
    with op.batch_alter_table("doc_losses", schema=None) as batch_op:
        batch_op.create_index("ix_doc_losses_doc_column", ["doc_id", "column"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_doc_losses_participant_id"), ["participant_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_doc_losses_unit_id"), ["unit_id"], unique=False)

    op.create_table(
        "results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("unit_id", sa.String(length=36), nullable=False),
        sa.Column("participant_id", sa.Integer(), nullable=True),
        sa.Column("base_version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reject_reason", sa.String(length=32), nullable=True),
        sa.Column("reject_detail", sa.Text(), nullable=True),
        sa.Column("blob_ids", sa.JSON(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("val_loss", sa.Float(), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("applied_in_version", sa.Integer(), nullable=True),
        sa.CheckConstraint("state IN ('accepted', 'rejected')", name=op.f("ck_results_state")),
        sa.ForeignKeyConstraint(
            ["participant_id"],
            ["participants.id"],
            name=op.f("fk_results_participant_id_participants"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["unit_id"],
            ["work_units.unit_id"],
            name=op.f("fk_results_unit_id_work_units"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_results")),
        sa.UniqueConstraint("unit_id", name=op.f("uq_results_unit_id")),
    )
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_results_participant_id"), ["participant_id"], unique=False
        )
        batch_op.create_index("ix_results_pending", ["state", "applied_in_version"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_results_reject_reason"), ["reject_reason"], unique=False
        )


def downgrade() -> None:

    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_results_reject_reason"))
        batch_op.drop_index("ix_results_pending")
        batch_op.drop_index(batch_op.f("ix_results_participant_id"))

    op.drop_table("results")
    with op.batch_alter_table("doc_losses", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_doc_losses_unit_id"))
        batch_op.drop_index(batch_op.f("ix_doc_losses_participant_id"))
        batch_op.drop_index("ix_doc_losses_doc_column")

    op.drop_table("doc_losses")
    with op.batch_alter_table("work_units", schema=None) as batch_op:
        batch_op.drop_index("ix_work_units_state_deadline")
        batch_op.drop_index(batch_op.f("ix_work_units_reissued_from"))
        batch_op.drop_index("ix_work_units_participant_state")
        batch_op.drop_index(batch_op.f("ix_work_units_participant_id"))

    op.drop_table("work_units")
    with op.batch_alter_table("participant_columns", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_participant_columns_column"))

    op.drop_table("participant_columns")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_events_unit_id"))
        batch_op.drop_index(batch_op.f("ix_events_ts"))
        batch_op.drop_index(batch_op.f("ix_events_participant_id"))
        batch_op.drop_index(batch_op.f("ix_events_kind"))

    op.drop_table("events")
    with op.batch_alter_table("enrolment_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_enrolment_tokens_participant_id"))

    op.drop_table("enrolment_tokens")
    with op.batch_alter_table("stage_jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_stage_jobs_state"))
        batch_op.drop_index(batch_op.f("ix_stage_jobs_stage"))

    op.drop_table("stage_jobs")
    with op.batch_alter_table("participants", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_participants_state"))

    op.drop_table("participants")
    op.drop_table("model_versions")
    with op.batch_alter_table("document_assignments", schema=None) as batch_op:
        batch_op.drop_index("ix_document_assignments_epoch_column")

    op.drop_table("document_assignments")
    with op.batch_alter_table("blobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_blobs_kind"))

    op.drop_table("blobs")
    op.drop_table("api_tokens")
