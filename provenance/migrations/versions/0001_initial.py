"""The initial provenance schema: recipe versions, builds, steps, images, probes, packages, the ledger.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "recipe_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("version", sa.String(), nullable=False),
        sa.Column("fingerprint", sa.String(), nullable=False),
        sa.Column("repo", sa.String(), nullable=True),
        sa.Column("commit", sa.String(), nullable=True),
        sa.Column("branch", sa.String(), nullable=True),
        sa.Column("dirty", sa.Boolean(), nullable=False),
        sa.Column("in_git", sa.Boolean(), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("recipe_json", sa.Text(), nullable=False),
        sa.Column("created", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_recipe_version"),
        sa.UniqueConstraint("fingerprint", "commit", "dirty", "path", name="uq_recipe_version_identity"),
    )
    op.create_index("ix_recipe_version_name", "recipe_version", ["name"])
    op.create_index("ix_recipe_version_fingerprint", "recipe_version", ["fingerprint"])
    op.create_index("ix_recipe_version_commit", "recipe_version", ["commit"])

    op.create_table(
        "build",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("recipe_version_id", sa.Integer(), nullable=False),
        sa.Column("target", sa.String(), nullable=False),
        sa.Column("cloud", sa.String(), nullable=False),
        sa.Column("region", sa.String(), nullable=False),
        sa.Column("trigger", sa.String(), nullable=False),
        sa.Column("flow_run_id", sa.String(), nullable=True),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("stage", sa.String(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started", TIMESTAMP, nullable=False),
        sa.Column("finished", TIMESTAMP, nullable=True),
        sa.Column("kiln_version", sa.String(), nullable=False),
        sa.Column("host", sa.String(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("parameters_json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_build"),
        sa.ForeignKeyConstraint(
            ["recipe_version_id"], ["recipe_version.id"], name="fk_build_recipe_version_id_recipe_version"
        ),
    )
    op.create_index("ix_build_recipe_version_id", "build", ["recipe_version_id"])
    op.create_index("ix_build_status", "build", ["status"])

    op.create_table(
        "step_run",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("build_id", sa.String(), nullable=False),
        sa.Column("stage", sa.String(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("started", TIMESTAMP, nullable=False),
        sa.Column("finished", TIMESTAMP, nullable=True),
        sa.Column("log", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_step_run"),
        sa.ForeignKeyConstraint(["build_id"], ["build.id"], name="fk_step_run_build_id_build"),
    )
    op.create_index("ix_step_run_build_id", "step_run", ["build_id"])

    op.create_table(
        "image",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cloud", sa.String(), nullable=False),
        sa.Column("region", sa.String(), nullable=False),
        sa.Column("image_id", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("format", sa.String(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("build_id", sa.String(), nullable=True),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("revoked_reason", sa.Text(), nullable=True),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("tags_json", sa.Text(), nullable=False),
        sa.Column("created", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_image"),
        sa.ForeignKeyConstraint(["parent_id"], ["image.id"], name="fk_image_parent_id_image"),
        sa.ForeignKeyConstraint(["build_id"], ["build.id"], name="fk_image_build_id_build"),
    )
    op.create_index("ix_image_image_id", "image", ["image_id"])
    op.create_index("ix_image_sha256", "image", ["sha256"])
    op.create_index("ix_image_parent_id", "image", ["parent_id"])
    op.create_index("ix_image_build_id", "image", ["build_id"])

    op.create_table(
        "probe",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("build_id", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("duration", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_probe"),
        sa.ForeignKeyConstraint(["build_id"], ["build.id"], name="fk_probe_build_id_build"),
    )
    op.create_index("ix_probe_build_id", "probe", ["build_id"])

    op.create_table(
        "package",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("version", sa.String(), nullable=False),
        sa.Column("arch", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_package"),
        sa.ForeignKeyConstraint(["image_id"], ["image.id"], name="fk_package_image_id_image"),
    )
    op.create_index("ix_package_image_id", "package", ["image_id"])
    op.create_index("ix_package_name", "package", ["name"])

    op.create_table(
        "resource",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("build_id", sa.String(), nullable=False),
        sa.Column("cloud", sa.String(), nullable=False),
        sa.Column("region", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("cloud_id", sa.String(), nullable=True),
        sa.Column("tags_json", sa.Text(), nullable=False),
        sa.Column("created", TIMESTAMP, nullable=False),
        sa.Column("released", TIMESTAMP, nullable=True),
        sa.Column("release_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_resource"),
        sa.ForeignKeyConstraint(["build_id"], ["build.id"], name="fk_resource_build_id_build"),
    )
    op.create_index("ix_resource_build_id", "resource", ["build_id"])
    op.create_index("ix_resource_released", "resource", ["released"])


def downgrade() -> None:
    for table in ("resource", "package", "probe", "image", "step_run", "build", "recipe_version"):
        op.drop_table(table)
