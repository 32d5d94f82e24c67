"""Alembic environment for kiln's provenance schema: runs on the connection store.upgrade passes in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from provenance.models import SQLModel

target_metadata = SQLModel.metadata


def run_migrations(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    if context.is_offline_mode():
        raise SystemExit("kiln's migrations run online only: use `kiln db upgrade`")
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    # Run by the alembic command line (for example to autogenerate a revision): use kiln's configured database.
    from core.settings import database_url

    url = context.config.get_main_option("sqlalchemy.url") or database_url()
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            run_migrations(connection)
            connection.commit()
    finally:
        engine.dispose()


main()
