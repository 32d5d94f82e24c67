"""Provenance that holds across hosts: a base disk is named by its content, not by its path in one host's cache,
so hosts sharing a database record it once; a recipe's repository says whether only its host can resolve it,
and keeps the work tree as an annotation.

Existing rows migrate: a bootstrap base recorded by its cache path (…/bases/bootstrap/<inputs>.qcow2) becomes
base:<flavour>@sha256:<disk sha256>, a file/URL base (…/bases/sha256/<sha256>) becomes sha256:<sha256>, the path
kept in `path`. Rows that now name the same base (one per host, before) merge into the oldest: every image,
package and audit that pointed at one of them points at it, so lineage is kept; a revocation of any of them holds
for the merged row. Then a unique index keeps one row per base.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BASE_ONLY = "kind = 'base'"

image = sa.table(
    "image",
    sa.column("id", sa.Integer),
    sa.column("cloud", sa.String),
    sa.column("region", sa.String),
    sa.column("image_id", sa.String),
    sa.column("name", sa.String),
    sa.column("sha256", sa.String),
    sa.column("path", sa.String),
    sa.column("kind", sa.String),
    sa.column("status", sa.String),
    sa.column("revoked_reason", sa.Text),
    sa.column("parent_id", sa.Integer),
)
package = sa.table("package", sa.column("image_id", sa.Integer))
audit = sa.table("audit", sa.column("image_row_id", sa.Integer), sa.column("rebuild_image_row_id", sa.Integer))
recipe_version = sa.table("recipe_version", sa.column("repo", sa.String), sa.column("repo_local", sa.Boolean))
# Where an image row's id is another image row's id: repointed from a merged duplicate to the row kept.
IMAGE_REFERENCES = ((image, "parent_id"), (package, "image_id"), (audit, "image_row_id"),
                    (audit, "rebuild_image_row_id"))


def upgrade() -> None:
    op.add_column("recipe_version", sa.Column("repo_local", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("recipe_version", sa.Column("checkout", sa.String(), nullable=True))
    bind = op.get_bind()
    bind.execute(
        recipe_version.update()
        .where(sa.or_(recipe_version.c.repo.like("/%"), recipe_version.c.repo.like("file:%")))
        .values(repo_local=True)
    )
    _rename_local_bases(bind)
    _merge_duplicate_bases(bind)
    op.create_index("uq_image_base_identity", "image", ["cloud", "region", "image_id", "sha256"], unique=True,
                    sqlite_where=sa.text(BASE_ONLY), postgresql_where=sa.text(BASE_ONLY))


def downgrade() -> None:
    op.drop_index("uq_image_base_identity", table_name="image")
    bind = op.get_bind()
    bind.execute(  # back to the (one) cache path the row knows
        image.update()
        .where(image.c.kind == "base", image.c.cloud == "local", image.c.path != "",
               sa.or_(image.c.image_id.like("base:%"), image.c.image_id.like("sha256:%")))
        .values(image_id=image.c.path)
    )
    with op.batch_alter_table("recipe_version") as batch:
        batch.drop_column("checkout")
        batch.drop_column("repo_local")


def stable_base_id(image_id: str, name: str, sha256: str) -> str | None:
    """The content id of a local base recorded by its cache path, or None when the row is not one."""
    if not sha256:
        return None
    path = PurePosixPath(image_id)
    if len(path.parts) < 3 or path.parent.parent.name != "bases":
        return None
    if path.parent.name == "bootstrap" and path.suffix == ".qcow2":
        return f"base:{name or 'bootstrap'}@sha256:{sha256}"
    if path.parent.name == "sha256" and path.name == sha256:
        return f"sha256:{sha256}"
    return None


def _rename_local_bases(bind: sa.Connection) -> None:
    rows = bind.execute(
        sa.select(image.c.id, image.c.image_id, image.c.name, image.c.sha256, image.c.path)
        .where(image.c.kind == "base", image.c.cloud == "local")
    ).all()
    for row_id, image_id, name, sha256, path in rows:
        stable = stable_base_id(image_id, name, sha256)
        if stable is not None:
            bind.execute(image.update().where(image.c.id == row_id).values(image_id=stable, path=path or image_id))


def _merge_duplicate_bases(bind: sa.Connection) -> None:
    identity = (image.c.cloud, image.c.region, image.c.image_id, image.c.sha256)
    duplicated = bind.execute(
        sa.select(*identity).where(image.c.kind == "base").group_by(*identity).having(sa.func.count() > 1)
    ).all()
    for cloud, region, image_id, sha256 in duplicated:
        rows = bind.execute(
            sa.select(image.c.id, image.c.status, image.c.revoked_reason, image.c.path)
            .where(image.c.kind == "base", image.c.cloud == cloud, image.c.region == region,
                   image.c.image_id == image_id, image.c.sha256 == sha256)
            .order_by(image.c.id)
        ).all()
        kept, merged = rows[0], rows[1:]
        merged_ids = [row.id for row in merged]
        for table, column in IMAGE_REFERENCES:
            bind.execute(table.update().where(table.c[column].in_(merged_ids)).values({column: kept.id}))
        revoked = next((row for row in rows if row.status == "revoked"), None)
        values = {"path": kept.path or next((row.path for row in merged if row.path), "")}
        if revoked is not None:
            values |= {"status": "revoked", "revoked_reason": revoked.revoked_reason}
        bind.execute(image.update().where(image.c.id == kept.id).values(values))
        bind.execute(image.delete().where(image.c.id.in_(merged_ids)))
