"""Provenance that holds across hosts: two kiln homes (two hosts, each with its own cache) sharing one PostgreSQL
record one row for the base (a bootstrap, a file) they both build from, and lineage of either image reaches it; a
database written by an older kiln (bases named by their cache path, one row per host) migrates to the same,
lineage kept.

What runs for real: the fetch_base stage on the local cloud (resolve_base finds the bootstrap disk in each host's
cache, as after a bootstrap, or copies the file base into it), the register stage's own recording and catalog
functions, the store, alembic, and `kiln lineage`. What does not: the bootstrap itself (mmdebstrap, minutes as
root) and the guest boots; the disk is a real qcow2 made by qemu-img, identical on both hosts as a shared or copied
base is. tests/flows/test_lineage_chain.py (-m vm) checks the same id on a real bootstrap and build.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from prefect.logging import disable_run_logger
from typer.testing import CliRunner

from clouds import bootstrap
from clouds.base import ImageFile, ImageRef
from clouds.local import LocalCloud
from core.recipe import load_recipe
from kiln.cli import app
from provenance import gitinfo, lineage, store
from tasks.common import BuildPlan
from tasks.fetch_base import ResolvedBase, fetch_base
from tasks.register import catalog_entry, record_image_rows, write_catalog
from tasks.verify import ProbeOutcome, Verification
from tests.provenance.conftest import _create_database

runner = CliRunner()
PACKAGES = [("bash", "5.2.15-2+b7", "amd64"), ("openssh-server", "1:9.2p1-2+deb12u3", "amd64")]


@dataclass(frozen=True)
class Host:
    name: str
    home: Path
    cloud: LocalCloud


@pytest.fixture
def shared_postgres(postgres_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    url = _create_database(postgres_server, f"kiln_{uuid.uuid4().hex[:12]}")
    monkeypatch.setenv("KILN_DATABASE_URL", url)
    return url


def _qcow2(path: Path, size: str = "64M") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def _host(name: str, root: Path, disk: Path) -> Host:
    """A kiln home whose cache holds the bootstrap disk, as `bootstrap_base` leaves it (disk + sidecar)."""
    home, cache = root / name / "home", root / name / "cache"
    cloud = LocalCloud(state_dir=home / "state", images_dir=home / "images", cache_dir=cache)
    inputs = bootstrap.inputs_for("debian-bookworm", None)
    cached = cache / "bases" / "bootstrap" / f"{bootstrap.digest_of(inputs)}.qcow2"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(disk.read_bytes())
    record = {"inputs": inputs, "sha256": hashlib.sha256(disk.read_bytes()).hexdigest(), "size": disk.stat().st_size}
    cached.with_suffix(".json").write_text(json.dumps(record))
    return Host(name, home, cloud)


def _build_on(host: Host, recipe_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ResolvedBase, str]:
    """fetch_base and register's recording on `host`: returns the resolved base and the new image's id."""
    monkeypatch.setenv("KILN_HOME", str(host.home))
    monkeypatch.setattr(store.socket, "gethostname", lambda: host.name)
    recipe = load_recipe(recipe_path)
    git = gitinfo.capture(recipe.path, recipe.referenced_files())
    version = store.record_recipe_version(name=recipe.name, version=recipe.version, fingerprint=recipe.fingerprint(),
                                          recipe_json="{}", git=git)  # fmt: skip
    build = store.start_build(recipe_version_id=version, target="local", cloud="local", trigger="test")
    plan = BuildPlan(build_id=build, recipe=recipe, target_name="local", git=git, recipe_version_id=version,
                     cloud=host.cloud)  # fmt: skip
    with disable_run_logger():
        base = fetch_base.fn(plan)
    image_id = f"img-{build[:12]}"
    disk = _qcow2(host.cloud.images_dir / image_id / "hello-1.0.0.qcow2", "16M")
    files = (ImageFile("qcow2", str(disk), disk.stat().st_size, hashlib.sha256(disk.read_bytes()).hexdigest()),)
    image = ImageRef(cloud="local", image_id=image_id, name="hello-1.0.0", files=files)
    valid_until = dt.datetime.now(dt.UTC) + dt.timedelta(days=365)
    row = record_image_rows(plan, base, image, plan.tags, valid_until)
    store.record_packages(row, PACKAGES)
    probes = Verification([ProbeOutcome("port :22", "port", True, "", 0.1)])
    write_catalog(catalog_entry(plan, base, image, probes, valid_until))
    store.finish_build(build, "succeeded", stage="register")
    return base, image_id


def _lineage(image_id: str) -> dict:
    result = runner.invoke(app, ["lineage", image_id, "--up", "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.postgres
@pytest.mark.parametrize("kind", ["bootstrap", "file"])
def test_two_hosts_on_one_postgresql_record_one_base_that_both_lineages_reach(
    shared_postgres: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    disk = _qcow2(tmp_path / "recipes" / "base.qcow2")
    sha = hashlib.sha256(disk.read_bytes()).hexdigest()
    recipe = tmp_path / "recipes" / "hello.yaml"
    base = "{bootstrap: debian-bookworm}" if kind == "bootstrap" else f"{{file: base.qcow2, sha256: '{sha}'}}"
    recipe.write_text(f"name: hello\nversion: 1.0.0\ntargets:\n  local: {{base: {base}}}\n")
    hosts = [_host(name, tmp_path, disk) for name in ("builder-a", "builder-b")]

    (base_a, image_a), (base_b, image_b) = (_build_on(host, recipe, monkeypatch) for host in hosts)

    stable = f"base:debian-bookworm@sha256:{sha}" if kind == "bootstrap" else f"sha256:{sha}"
    assert base_a.image.details["path"] != base_b.image.details["path"], "each host has its own cache"
    assert base_a.row_id == base_b.row_id and base_a.image_id == base_b.image_id == stable
    bases = [s.image for s in lineage.list_images(cloud="local") if s.image.kind == "base"]
    assert [(b.id, b.image_id, b.sha256) for b in bases] == [(base_a.row_id, stable, sha)]
    for image_id, host in ((image_a, "builder-a"), (image_b, "builder-b")):
        found = _lineage(image_id)
        assert found["build"]["id"] and lineage.get_build(found["build"]["id"]).build.host == host
        assert (found["base"]["image_id"], found["base"]["row_id"]) == (stable, base_a.row_id)
        catalog = json.loads((tmp_path / host / "home" / "catalog" / f"{image_id}.json").read_text())
        assert catalog["parent"] == {"image_id": stable, "digest": sha}


def test_the_unique_index_holds_one_row_per_base(db_url: str) -> None:
    store.record_image(cloud="local", image_id="sha256:" + "b" * 64, kind="base", sha256="b" * 64)
    with pytest.raises(sa.exc.IntegrityError), store.engine().begin() as conn:  # behind the store's back
        conn.execute(sa.text("INSERT INTO image (cloud, region, image_id, name, format, sha256, kind, status, path, "
                             "tags_json, created) VALUES ('local', '', :id, '', '', :sha, 'base', 'available', '', "
                             "'{}', :now)"), {"id": "sha256:" + "b" * 64, "sha": "b" * 64, "now": store.utcnow()})


# ------------------------------------------------------------------------------------ a database from 0002


def _at_revision(url: str, revision: str) -> sa.Engine:
    raw = sa.create_engine(url)
    with raw.begin() as conn:
        command.upgrade(store._alembic_config(conn), revision)
    return raw


def _moment(conn: sa.Connection) -> dt.datetime:
    """A timestamp as the 0002 schema stores it: UTC, without a zone on SQLite."""
    moment = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    return moment.replace(tzinfo=None) if conn.dialect.name == "sqlite" else moment


def _insert(conn: sa.Connection, table: str, **values: object) -> int:
    rows = sa.Table(table, sa.MetaData(), autoload_with=conn)
    stamps = {column: _moment(conn) for column in ("created", "started") if column in rows.c}
    result = conn.execute(rows.insert().values(**stamps, **values))
    return result.inserted_primary_key[0]


def _old_kiln_database(conn: sa.Connection) -> dict[str, int]:
    """What kiln recorded at 0002 when two hosts built from one bootstrap disk and one file base: the bootstrap
    base once per host (each under its own cache path), a revoked duplicate, packages, an audit."""
    sha, file_sha = "b" * 64, "f" * 64
    ids: dict[str, int] = {}
    for repo, key in (("https://git.example.org/images.git", "remote"), ("/home/me/src/images", "local")):
        ids[key] = _insert(conn, "recipe_version", name="hello", version="1", fingerprint=key * 8, repo=repo,
                           commit="c" * 40, dirty=False, in_git=True, path="recipes/hello.yaml", recipe_json="{}")
    for host, home, inputs in (("builder-a", "/root", "1" * 64), ("builder-b", "/home/ci", "2" * 64)):
        path = f"{home}/.cache/kiln/bases/bootstrap/{inputs}.qcow2"
        ids[f"base-{host}"] = _insert(conn, "image", cloud="local", region="", image_id=path, name="debian-bookworm",
                                      format="qcow2", size=123, sha256=sha, kind="base", status="available",
                                      path=path, tags_json="{}")
        build = uuid.uuid4().hex
        _insert(conn, "build", id=build, recipe_version_id=ids["remote"], target="local", cloud="local", region="",
                trigger="cli", status="succeeded", kiln_version="0.1.0", host=host, pid=1, parameters_json="{}")
        ids[f"image-{host}"] = _insert(conn, "image", cloud="local", region="", image_id=f"img-{host[-1] * 12}",
                                       name="hello", format="qcow2", sha256=host[-1] * 64, build_id=build,
                                       parent_id=ids[f"base-{host}"], kind="built", status="available", path="",
                                       tags_json="{}")
        _insert(conn, "package", image_id=ids[f"image-{host}"], name="bash", version="5.2", arch="amd64")
    conn.execute(sa.text("UPDATE image SET status = 'revoked', revoked_reason = 'CVE-2026-0001' WHERE id = :id"),
                 {"id": ids["base-builder-b"]})
    _insert(conn, "audit", image_row_id=ids["base-builder-b"], fingerprint="x", status="passed", threshold=99.0,
            files_compared=0, files_identical=0, packages_json="{}", files_json="{}", excluded_json="[]")
    file_path = f"/root/.cache/kiln/bases/sha256/{file_sha}"
    ids["file-base"] = _insert(conn, "image", cloud="local", region="", image_id=file_path, name="debian-12.qcow2",
                               format="qcow2", sha256=file_sha, kind="base", status="available", path=file_path,
                               tags_json="{}")
    ids["ami-base"] = _insert(conn, "image", cloud="ec2", region="us-east-1", image_id="ami-0base", name="debian",
                              format="", sha256="", kind="base", status="available", path="", tags_json="{}")
    return ids


def test_a_database_from_0002_migrates_to_one_base_row_per_base_keeping_lineage(db_url: str) -> None:
    raw = _at_revision(db_url, "0002")
    with raw.begin() as conn:
        ids = _old_kiln_database(conn)
    raw.dispose()

    assert store.upgrade() == store.head_revision()

    stable = "base:debian-bookworm@sha256:" + "b" * 64
    bases = {s.image.image_id: s.image for s in lineage.list_images() if s.image.kind == "base"}
    assert set(bases) == {stable, "sha256:" + "f" * 64, "ami-0base"}
    kept = bases[stable]
    assert kept.id == ids["base-builder-a"] and kept.path == "/root/.cache/kiln/bases/bootstrap/" + "1" * 64 + ".qcow2"
    assert (kept.status, kept.revoked_reason) == ("revoked", "CVE-2026-0001"), "a revocation on either host holds"
    assert bases["sha256:" + "f" * 64].path == "/root/.cache/kiln/bases/sha256/" + "f" * 64
    for host in ("builder-a", "builder-b"):
        [base] = lineage.ancestors(ids[f"image-{host}"])
        assert (base.image.id, base.image.image_id) == (kept.id, stable)
        assert lineage.packages_of(ids[f"image-{host}"]) == [("bash", "5.2", "amd64")]
    assert [audit.status for audit in lineage.audits_of(kept.id)] == ["passed"]
    with store.engine().connect() as conn:
        assert dict(conn.execute(sa.text("SELECT repo, repo_local FROM recipe_version")).all()) == {
            "https://git.example.org/images.git": False, "/home/me/src/images": True}
