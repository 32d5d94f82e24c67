"""Fixtures for the provenance tests: a throwaway PostgreSQL cluster for the session, a fresh database per
test on SQLite or PostgreSQL, and a store pointed at it through KILN_DATABASE_URL."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text


def _postgres_bin() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not candidates:
        pytest.fail(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: install Debian's postgresql "
            "package (`make test` does it) — the PostgreSQL store tests must run, not skip",
            pytrace=False,
        )
    return Path(candidates[-1]).parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_cluster_owner(argv: list[str], owner: str | None, log: Path) -> None:
    """Run a PostgreSQL tool (as `owner` when we are root: initdb and postgres refuse to run as root)."""
    command = ["runuser", "-u", owner, "--", *argv] if owner else argv
    with log.open("a") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=120)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {result.returncode}; see {log}:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL cluster of our own on 127.0.0.1:<free port>, trust auth; yields its server URL."""
    bindir = _postgres_bin()
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres").pw_name
        except KeyError:
            pytest.fail("running as root but there is no `postgres` user to own the test cluster", pytrace=False)
    # Not pytest's tmp_path: its parents are private to root, and the cluster runs as `postgres`.
    base = Path(tempfile.mkdtemp(prefix="kiln-pg-"))
    data, sockets, log = base / "data", base / "sockets", base / "postgres.log"
    sockets.mkdir()
    log.touch()
    if owner:
        record = pwd.getpwnam(owner)
        for path in (base, sockets, log):
            os.chown(path, record.pw_uid, record.pw_gid)
    port = _free_port()
    _as_cluster_owner(
        [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale"],
        owner,
        log,
    )
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off"
    _as_cluster_owner([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start"],
                      owner, log)
    pid = int((data / "postmaster.pid").read_text().split()[0])
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
    finally:
        stop = subprocess.run(
            (["runuser", "-u", owner, "--"] if owner else [])
            + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )
        if stop.returncode != 0:  # pg_ctl could not stop it: end our postmaster by its pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: str) -> str:
    """A database in the session's PostgreSQL cluster (SQLAlchemy URL, psycopg2)."""
    return _create_database(postgres_server, "kiln_test")


def _create_database(server: str, name: str) -> str:
    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return f"{server}/{name}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, empty database: a SQLite file, or a fresh database in the PostgreSQL cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kiln.db'}"
    server = request.getfixturevalue("postgres_server")
    return _create_database(server, f"kiln_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def db_url(empty_db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty database that the store (and the CLI) use for this test."""
    monkeypatch.setenv("KILN_DATABASE_URL", empty_db_url)
    return empty_db_url


@pytest.fixture(autouse=True)
def _close_store_engines() -> Iterator[None]:
    """Each test's database gets its own engine; close its connections so the cluster can stop cleanly."""
    yield
    from provenance import store

    store.dispose()
