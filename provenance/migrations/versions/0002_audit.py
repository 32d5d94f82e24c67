"""Repeatability audits: one row per rebuild of an image from its recorded commit, with the comparison.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_row_id", sa.Integer(), nullable=False),
        sa.Column("rebuild_id", sa.String(), nullable=True),
        sa.Column("rebuild_image_row_id", sa.Integer(), nullable=True),
        sa.Column("commit", sa.String(), nullable=True),
        sa.Column("fingerprint", sa.String(), nullable=False),
        sa.Column("fingerprint_found", sa.String(), nullable=True),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("files_compared", sa.Integer(), nullable=False),
        sa.Column("files_identical", sa.Integer(), nullable=False),
        sa.Column("identity", sa.Float(), nullable=True),
        sa.Column("packages_json", sa.Text(), nullable=False),
        sa.Column("files_json", sa.Text(), nullable=False),
        sa.Column("excluded_json", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started", TIMESTAMP, nullable=False),
        sa.Column("finished", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit"),
        sa.ForeignKeyConstraint(["image_row_id"], ["image.id"], name="fk_audit_image_row_id_image"),
        sa.ForeignKeyConstraint(["rebuild_id"], ["build.id"], name="fk_audit_rebuild_id_build"),
        sa.ForeignKeyConstraint(["rebuild_image_row_id"], ["image.id"], name="fk_audit_rebuild_image_row_id_image"),
    )
    op.create_index("ix_audit_image_row_id", "audit", ["image_row_id"])
    op.create_index("ix_audit_rebuild_id", "audit", ["rebuild_id"])


def downgrade() -> None:
    op.drop_table("audit")
