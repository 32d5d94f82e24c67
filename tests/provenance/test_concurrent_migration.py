"""Two workers starting at once on the same empty database: one schema, no error, and builds that never collide."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlmodel import SQLModel

from provenance import store

# Each "worker" imports kiln, then waits for the same instant before its first use of the database, so the
# two migrations really race (imports alone differ by a second or more under load).
WORKER = """
    import sys, time
    from provenance import store
    from provenance.gitinfo import GitInfo
    start = float(sys.argv[1])
    time.sleep(max(0.0, start - time.time()))
    revision = store.upgrade()
    version = store.record_recipe_version(name="race", version="1.0.0", fingerprint="f" * 64, recipe_json="{}",
                                          git=GitInfo(in_git=False, path="/tmp/race.yaml"))
    build = store.start_build(recipe_version_id=version, target="local", cloud="local", trigger="test")
    print(revision, build)
"""


def race(url: str, workers: int = 2) -> list[tuple[int, str, str]]:
    env = {**os.environ, "KILN_DATABASE_URL": url}
    start = time.time() + 8
    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(WORKER), str(start)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(workers)
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    return [(p.returncode, out.strip(), err[-3000:]) for p, (out, err) in zip(procs, outputs, strict=True)]


def test_two_workers_migrating_the_same_empty_database_at_once_make_one_schema(empty_db_url: str) -> None:
    results = race(empty_db_url)

    assert [code for code, _, _ in results] == [0, 0], results
    head = store.head_revision()
    revisions = [out.split()[0] for _, out, _ in results]
    builds = [out.split()[1] for _, out, _ in results]
    assert revisions == [head, head]
    assert len(set(builds)) == 2 and all(len(b) == 32 for b in builds), "uuid4 build ids: no collision"
    with store.engine(empty_db_url).connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head]
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, SQLModel.metadata) == [], "the schema is exactly the models'"
        assert conn.execute(text("SELECT count(*) FROM recipe_version")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM build")).scalar() == 2


def test_sqlite_migration_waits_on_the_file_lock(tmp_path: Path) -> None:
    """Four at once on one SQLite file: BEGIN IMMEDIATE makes the others wait, none sees 'database is locked'."""
    results = race(f"sqlite:///{tmp_path / 'kiln.db'}", workers=4)
    assert [code for code, _, _ in results] == [0] * 4, results
    assert all("locked" not in err for _, _, err in results)
