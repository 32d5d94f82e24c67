"""Image validity: until when an image is valid (its recipe's valid_for), so kiln can list what expires soon,
rebuild it in time, and mark it expired.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("image") as batch:
        batch.add_column(sa.Column("valid_until", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_image_valid_until", "image", ["valid_until"])


def downgrade() -> None:
    op.drop_index("ix_image_valid_until", table_name="image")
    with op.batch_alter_table("image") as batch:
        batch.drop_column("valid_until")
