"""The provenance store on SQLite and on a real PostgreSQL: schema, round trip, ledger, redaction, interruption."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from provenance import lineage, store
from provenance.gitinfo import GitInfo
from provenance.models import SQLModel

TABLES = {"recipe_version", "build", "step_run", "image", "probe", "package", "resource", "audit"}
PRIVATE_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "QyNTUxOQAAACDbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZWQyNTUxOQAAACBtZXN0aW5n\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)
KEY_BODY = "QyNTUxOQAAACDbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZWQyNTUxOQAAACBtZXN0aW5n"
GIT = GitInfo(
    in_git=True, path="recipes/webserver.yaml", root="/src/images", commit="a" * 40, branch="main",
    remote_url="https://git.example.org/images.git",
)


def _recipe_version(fingerprint: str = "f" * 64, git: GitInfo = GIT) -> int:
    return store.record_recipe_version(
        name="webserver", version="1.2.0", fingerprint=fingerprint, recipe_json='{"name": "webserver"}', git=git
    )


def _run_python(code: str, db_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KILN_DATABASE_URL": db_url}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_upgrade_from_empty_creates_every_table_at_head(empty_db_url: str) -> None:
    assert store.upgrade(empty_db_url) == store.head_revision() == "0006"
    assert store.current_revision(empty_db_url) == "0006"
    inspector = inspect(store.engine(empty_db_url))
    assert set(inspector.get_table_names()) == TABLES | {"alembic_version"}
    assert {"ix_image_image_id", "ix_image_parent_id", "ix_image_build_id", "ix_image_sha256"} <= {
        index["name"] for index in inspector.get_indexes("image")
    }
    assert store.upgrade(empty_db_url) == "0006"  # again: nothing to do, no error


def test_models_and_migrations_are_in_sync(empty_db_url: str) -> None:
    store.upgrade(empty_db_url)
    with store.engine(empty_db_url).connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, SQLModel.metadata) == []


def test_the_head_read_without_alembic_is_alembics_head(tmp_path, monkeypatch) -> None:
    """store skips importing alembic when the database is at the head it reads from the migration files' text."""
    assert store._plain_head() == store.head_revision()

    branched = tmp_path / "migrations"
    (branched / "versions").mkdir(parents=True)
    for path in (store.MIGRATIONS_DIR / "versions").glob("*.py"):
        (branched / "versions" / path.name).write_text(path.read_text())
    (branched / "versions" / "9999_branch.py").write_text('revision = "9999"\ndown_revision = "0001"\n')
    monkeypatch.setattr(store, "MIGRATIONS_DIR", branched)
    assert store._plain_head() is None, "two heads: alembic must decide"


def test_migrations_run_on_first_use(db_url: str) -> None:
    _recipe_version()
    assert store.current_revision() == store.head_revision()


def test_concurrent_first_use_migrates_once(empty_db_url: str) -> None:
    code = """
        from provenance import store
        print(store.upgrade())
    """
    env = {**os.environ, "KILN_DATABASE_URL": empty_db_url}
    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    results = [(p.returncode, out.strip()) for p, (out, _) in zip(procs, outputs, strict=True)]
    assert results == [(0, "0006")] * 4, outputs


def test_store_round_trip(db_url: str) -> None:
    recipe_version_id = _recipe_version()
    assert _recipe_version() == recipe_version_id  # the same version is one row
    build_id = store.start_build(
        recipe_version_id=recipe_version_id, target="local", cloud="local", trigger="test",
        parameters={"formats": ["qcow2"]},
    )
    assert len(build_id) == 32 and int(build_id, 16) >= 0
    store.set_flow_run_id(build_id, "flow-run-1")

    store.set_build_stage(build_id, "launch")
    step = store.start_step(build_id, "launch")
    store.append_step_log(step, "starting instance\n")
    store.append_step_log(step, "instance up\n")
    instance = store.ledger_intent(build_id, cloud="local", kind="instance", name="kiln-build",
                                   tags={"kiln:build-id": build_id})
    key = store.ledger_intent(build_id, cloud="local", kind="keypair", name="kiln-key")
    assert [r.id for r in store.open_resources(build_id)] == [key, instance]  # newest first: cleanup order
    assert store.open_resources(build_id)[1].cloud_id is None
    store.ledger_created(instance, "pid-4242")
    store.finish_step(step, "succeeded")

    base = store.record_image(cloud="local", image_id="debian-bookworm", kind="base", sha256="b" * 64,
                              size=2 * 1024**3, name="debian")
    assert store.record_image(cloud="local", image_id="debian-bookworm", kind="base", sha256="b" * 64) == base
    image = store.record_image(
        cloud="local", image_id="img-123", name="webserver-1.2.0", format="qcow2", size=5 * 1024**3,
        sha256="c" * 64, path="/var/lib/kiln/images/img-123/disk.qcow2", build_id=build_id, parent_id=base,
        tags={"kiln:recipe": "webserver"},
    )
    store.record_probe(build_id, name="http /test.txt", kind="http", passed=True, detail="200 SUCCESSFUL TEST",
                       duration=0.25)
    store.record_packages(image, [("apache2", "2.4.62-1", "amd64"), ("bash", "5.2.15-2", "amd64")])
    store.ledger_released(key)
    store.ledger_released(instance, error="terminate timed out")
    assert [(r.id, r.release_error) for r in store.open_resources(build_id)] == [(instance, "terminate timed out")]
    store.ledger_released(instance)
    assert store.open_resources(build_id) == []
    store.finish_build(build_id, "succeeded", stage="register")

    detail = lineage.get_build(build_id[:8])
    assert detail is not None
    build, recipe = detail.build, detail.recipe
    assert (build.id, build.status, build.stage, build.trigger, build.flow_run_id) == (
        build_id, "succeeded", "register", "test", "flow-run-1")
    assert (build.host, build.pid) == (socket.gethostname(), os.getpid())
    assert build.started.tzinfo is not None and build.finished is not None and build.finished >= build.started
    assert dt.datetime.now(dt.UTC) - build.finished < dt.timedelta(minutes=1)
    assert (recipe.name, recipe.version, recipe.commit, recipe.branch, recipe.repo, recipe.path, recipe.in_git) == (
        "webserver", "1.2.0", "a" * 40, "main", "https://git.example.org/images.git", "recipes/webserver.yaml", True)
    assert [(s.stage, s.attempt, s.status, s.log) for s in detail.steps] == [
        ("launch", 1, "succeeded", "starting instance\ninstance up\n")]
    assert [(p.name, p.passed, p.duration) for p in detail.probes] == [("http /test.txt", True, 0.25)]
    [summary] = detail.images
    assert (summary.image.image_id, summary.image.size, summary.parent_image_id, summary.commit) == (
        "img-123", 5 * 1024**3, "debian-bookworm", "a" * 40)
    assert detail.to_dict()["images"][0]["tags"] == {"kiln:recipe": "webserver"}

    found = lineage.find_image("c" * 64)
    assert [(s.image.id, s.build_id, s.recipe_name, s.recipe_version) for s in found] == [
        (image, build_id, "webserver", "1.2.0")]
    assert {s.image.image_id for s in lineage.list_images(cloud="local")} == {"img-123", "debian-bookworm"}
    assert [s.image.image_id for s in lineage.list_images(recipe="webserver")] == ["img-123"]
    assert [b.build.id for b in lineage.list_builds(recipe="webserver", status="succeeded")] == [build_id]
    assert lineage.list_builds(status="failed") == []

    with store.engine().connect() as conn:
        packages = conn.execute(text("SELECT name, version, arch FROM package WHERE image_id = :i ORDER BY name"),
                                {"i": image}).all()
    assert [tuple(p) for p in packages] == [("apache2", "2.4.62-1", "amd64"), ("bash", "5.2.15-2", "amd64")]


def test_failed_build_keeps_failed_stage_error_and_log(db_url: str) -> None:
    build_id = store.start_build(recipe_version_id=_recipe_version(), target="local", cloud="local")
    step = store.start_step(build_id, "customize", attempt=2)
    store.append_step_log(step, "+ apt-get install apache3\nE: Unable to locate package apache3\n")
    store.finish_step(step, "failed", error="script exited 100")
    store.finish_build(build_id, "failed", stage="customize", error="customize: script exited 100")
    detail = lineage.get_build(build_id)
    assert detail is not None
    assert (detail.build.status, detail.build.stage, detail.build.error) == (
        "failed", "customize", "customize: script exited 100")
    assert [(s.attempt, s.status, s.error) for s in detail.steps] == [(2, "failed", "script exited 100")]
    assert "Unable to locate package apache3" in detail.steps[0].log


def test_recipe_versions_differ_by_commit_dirtiness_and_path(db_url: str) -> None:
    outside = GitInfo(in_git=False, path="/home/me/webserver.yaml")
    ids = {
        _recipe_version(),
        _recipe_version(git=GitInfo(**{**GIT.__dict__, "dirty": True})),
        _recipe_version(git=GitInfo(**{**GIT.__dict__, "commit": "b" * 40})),
        _recipe_version(git=outside),
        _recipe_version(fingerprint="e" * 64),
    }
    assert len(ids) == 5
    assert _recipe_version(git=outside) in ids


def test_bad_status_kind_or_trigger_is_refused(db_url: str) -> None:
    build_id = store.start_build(recipe_version_id=_recipe_version(), target="local", cloud="local")
    with pytest.raises(ValueError, match="build status 'done'"):
        store.finish_build(build_id, "done")
    with pytest.raises(ValueError, match="trigger"):
        store.start_build(recipe_version_id=1, target="local", cloud="local", trigger="cron")
    with pytest.raises(ValueError, match="resource kind"):
        store.ledger_intent(build_id, cloud="local", kind="vm", name="x")
    with pytest.raises(LookupError, match="no Build"):
        store.set_build_stage("0" * 32, "launch")


def test_image_revocation_status_and_reason(db_url: str) -> None:
    base = store.record_image(cloud="ec2", region="us-east-1", image_id="ami-0abc", kind="base")
    store.set_image_status(base, "revoked", reason="CVE-2024-0001")
    [summary] = lineage.find_image("ami-0abc")
    assert (summary.image.status, summary.image.revoked_reason) == ("revoked", "CVE-2024-0001")
    store.set_image_status(base, "available")
    assert lineage.find_image("ami-0abc")[0].image.revoked_reason is None


def test_private_key_in_step_log_is_redacted(db_url: str) -> None:
    build_id = store.start_build(recipe_version_id=_recipe_version(), target="local", cloud="local")
    whole, split = store.start_step(build_id, "launch"), store.start_step(build_id, "customize")
    store.append_step_log(whole, f"writing key\n{PRIVATE_KEY}aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCY\n")
    lines = PRIVATE_KEY.splitlines(keepends=True)
    for chunk in ["before\n", lines[0], lines[1], lines[2], lines[3] + "after\n"]:
        store.append_step_log(split, chunk)
    store.finish_build(build_id, "failed", error=f"boom {PRIVATE_KEY}")
    detail = lineage.get_build(build_id)
    assert detail is not None
    logs = {s.stage: s.log for s in detail.steps}
    for text_ in (*logs.values(), detail.build.error or ""):
        assert KEY_BODY not in text_ and "PRIVATE KEY-----" not in text_ and "wJalrXUtnFEMI" not in text_
    assert logs["launch"].startswith("writing key\n[REDACTED PRIVATE KEY]")
    assert "aws_secret_access_key = [REDACTED]" in logs["launch"]
    assert logs["customize"].startswith("before\n[REDACTED PRIVATE KEY") and logs["customize"].endswith("after\n")


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'wal.db'}"
    with store.engine(url).connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000


def test_concurrent_writers_on_sqlite_never_see_database_locked(tmp_path, monkeypatch) -> None:
    url = f"sqlite:///{tmp_path / 'busy.db'}"
    monkeypatch.setenv("KILN_DATABASE_URL", url)
    recipe_version_id = _recipe_version()
    code = f"""
        from provenance import store
        build = store.start_build(recipe_version_id={recipe_version_id}, target="local", cloud="local")
        for i in range(40):
            step = store.start_step(build, f"stage-{{i}}")
            store.append_step_log(step, "line\\n")
            store.finish_step(step, "succeeded")
        store.finish_build(build, "succeeded")
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ},
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errors
    assert len(lineage.list_builds(status="succeeded")) == 6
    with store.engine().connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM step_run WHERE status = 'succeeded'").scalar() == 240


def test_build_of_a_dead_process_is_marked_interrupted_at_its_stage(db_url: str) -> None:
    recipe_version_id = _recipe_version()
    result = _run_python(f"""
        from provenance import store
        build = store.start_build(recipe_version_id={recipe_version_id}, target="local", cloud="local")
        store.set_build_stage(build, "customize")
        store.start_step(build, "customize")
        print(build)
    """, db_url)
    assert result.returncode == 0, result.stderr
    dead_build = result.stdout.strip()
    live_build = store.start_build(recipe_version_id=recipe_version_id, target="local", cloud="local")

    assert store.mark_interrupted_builds() == [dead_build]
    assert store.mark_interrupted_builds() == []
    dead, live = lineage.get_build(dead_build), lineage.get_build(live_build)
    assert dead is not None and live is not None
    assert (dead.build.status, dead.build.stage) == ("interrupted", "customize")
    assert dead.build.finished is not None and "ended before the build finished" in (dead.build.error or "")
    assert [s.status for s in dead.steps] == ["interrupted"]
    assert live.build.status == "running"


def test_database_at_an_unknown_revision_is_refused(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'future.db'}"
    store.upgrade(url)
    store.dispose(url)
    raw = create_engine(url)
    with raw.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    raw.dispose()
    with pytest.raises(store.SchemaError, match="revision 9999.*upgrade kiln"):
        store.engine(url)


def test_concurrent_recording_of_one_recipe_version_and_base_makes_one_row_each(db_url: str) -> None:
    store.upgrade()
    rounds, start_at = 8, time.time() + 8  # every process records each round at the same instant
    code = f"""
        import time
        from provenance import store
        from provenance.gitinfo import GitInfo
        loose = GitInfo(in_git=False, path="/home/me/webserver.yaml")  # commit NULL: no unique key helps
        store.engine()
        for k in range({rounds}):
            time.sleep(max(0.0, {start_at} + 0.5 * k - time.time()))
            store.record_recipe_version(name="webserver", version="1", fingerprint=str(k) * 64,
                                        recipe_json="{{}}", git=loose)
            store.record_image(cloud="local", image_id=f"base-{{k}}", kind="base", sha256="b" * 64)
    """
    env = {**os.environ, "KILN_DATABASE_URL": db_url}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    with store.engine().connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM recipe_version").scalar() == rounds
        assert conn.exec_driver_sql("SELECT count(*) FROM image WHERE kind = 'base'").scalar() == rounds
