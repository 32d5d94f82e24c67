"""Hands on the build: a build may pause before a stage (how long it waits, whether someone asked it to go on, how
to get into its build machine meanwhile), and a build in which someone used `kiln shell` is marked interactive (its
image is not reproducible from its recipe alone; the shell transcripts are "shell" steps in its step log).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMNs (SQLite does them in place: a batch would copy the build table, which others reference).
    op.add_column("build", sa.Column("interactive", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("build", sa.Column("paused_before", sa.String(), nullable=True))
    op.add_column("build", sa.Column("pause_deadline", sa.DateTime(timezone=True), nullable=True))
    op.add_column("build", sa.Column("resume_requested", sa.DateTime(timezone=True), nullable=True))
    op.add_column("build", sa.Column("shell_json", sa.Text(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("build") as batch:
        for column in ("shell_json", "resume_requested", "pause_deadline", "paused_before", "interactive"):
            batch.drop_column(column)
