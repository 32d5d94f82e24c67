"""The one writer of the provenance database: engines (migrated on first use), builds, steps, images,
probes, packages and the resource ledger. Sessions are short; everything returned is a plain value or a
detached row. SQLite runs in WAL mode and takes its write lock up front, so concurrent builds wait
(busy timeout) instead of failing with "database is locked"."""

from __future__ import annotations

import ast
import datetime as dt
import json
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Engine, case, create_engine, event, func, insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlmodel import Session, SQLModel, select, update

from core.settings import KILN_VERSION, SettingsError, database_setting, database_url, without_password
from provenance.gitinfo import GitInfo
from provenance.graph import ROOTS, descendants_cte
from provenance.models import (
    AUDIT_STATUSES,
    BUILD_STATUSES,
    IMAGE_KINDS,
    IMAGE_STATUSES,
    RESOURCE_KINDS,
    STEP_STATUSES,
    TRIGGERS,
    Audit,
    Build,
    Image,
    Package,
    Probe,
    RecipeVersion,
    Resource,
    StepRun,
    utcnow,
)
from provenance.redact import OPEN_KEY, ends_open, redact, redact_continuation

if TYPE_CHECKING:  # alembic is imported only to migrate (~0.3 s a process saved when the schema is current)
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT_SECONDS = 60
CONNECT_TIMEOUT_SECONDS = 10  # an unreachable PostgreSQL fails in seconds, not after the system's TCP timeout
# pg_advisory_xact_lock key serialising schema upgrades of one PostgreSQL database ("kiln" in ASCII).
_PG_MIGRATION_LOCK = 0x6B696C6E
_WRITE = "kiln_write"  # execution option: this connection writes (SQLite: BEGIN IMMEDIATE)

_engines: dict[tuple[str, int], Engine] = {}
_engines_lock = threading.Lock()

Row = TypeVar("Row", bound=SQLModel)


class SchemaError(SettingsError):
    """The database's schema revision is one this kiln does not know (a newer kiln upgraded it)."""

    def __init__(self, message: str) -> None:
        super().__init__(database_setting(), message)


# ---------------------------------------------------------------------------------------------- engines


def engine(url: str | None = None) -> Engine:
    """The engine for `url` (default: core.settings.database_url()), created and migrated on first use.

    A URL or a database kiln cannot use (unparsable, no driver, unreachable, not a database, not writable) is a
    SettingsError naming the setting and the cause."""
    url = url or database_url()
    key = (url, os.getpid())  # a forked child must not share its parent's pooled connections
    with _engines_lock:
        cached = _engines.get(key)
        if cached is None:
            try:
                cached = _create_engine(url)
            except (SQLAlchemyError, ImportError, OSError, ValueError) as exc:
                raise _unusable(url, exc) from None
            try:
                _migrate(cached)
            except BaseException as exc:
                cached.dispose()
                if isinstance(exc, SQLAlchemyError | OSError):
                    raise _unusable(url, exc) from None
                raise
            _engines[key] = cached
        return cached


def _unusable(url: str, exc: BaseException) -> SettingsError:
    cause = str(exc.orig) if isinstance(exc, DBAPIError) else str(exc)
    cause = re.sub(r"\s*\(Background on this error at: [^)]*\)", "", cause) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        cause = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return SettingsError(database_setting(), f"cannot use the database {without_password(url)}: {cause}")


def upgrade(url: str | None = None) -> str:
    """Bring the database's schema to the newest revision; returns that revision."""
    return _migrate(engine(url))


def dispose(url: str | None = None) -> None:
    """Close the pooled connections of the engine for `url` (all engines when None) and forget it."""
    with _engines_lock:
        for key in [k for k in _engines if url is None or k[0] == url]:
            _engines.pop(key).dispose()


def head_revision() -> str:
    """The newest schema revision this kiln ships."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None, f"no alembic revisions under {MIGRATIONS_DIR}"
    return head


def current_revision(url: str | None = None) -> str | None:
    """The schema revision the database is at (None: empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _create_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        connect_args = {}
        if parsed.get_driver_name() == "psycopg2" and "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = CONNECT_TIMEOUT_SECONDS
        return create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
        _create_private_file(Path(parsed.database))
    sqlite_engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_SECONDS})
    event.listen(sqlite_engine, "connect", _configure_sqlite_connection)
    event.listen(sqlite_engine, "begin", _begin_sqlite_transaction)
    return sqlite_engine


def _create_private_file(path: Path) -> None:
    """An empty file only its owner can read, for SQLite to make a database of (its -wal and -shm files get the
    same mode); an existing file or directory is left as it is."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    # The driver must not issue its own BEGIN: _begin_sqlite_transaction decides DEFERRED or IMMEDIATE.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_SECONDS * 1000}")
        _switch_to_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _switch_to_wal(cursor: Any) -> None:
    # SQLite does not call the busy handler while another connection switches a new file to WAL: two
    # processes opening one fresh database at once get "database is locked" at once, so retry here.
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _begin_sqlite_transaction(conn: Connection) -> None:
    # A deferred transaction that reads and then writes cannot wait for the lock (SQLITE_BUSY at once);
    # writers take the lock first and wait their turn under the busy timeout instead.
    immediate = conn.get_execution_options().get(_WRITE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


_REVISION_ASSIGNMENT = re.compile(r"^(revision|down_revision)\s*(?::[^=]*)?=\s*(.+?)\s*$", re.MULTILINE)


def _plain_head() -> str | None:
    """The head revision read from the migration files' text (no alembic import), or None unless every file is
    the plain kind (one literal revision, one literal parent or none) and they form one chain."""
    revisions, parents = set(), set()
    for path in (MIGRATIONS_DIR / "versions").glob("*.py"):
        found = dict(_REVISION_ASSIGNMENT.findall(path.read_text()))
        try:
            revision, parent = ast.literal_eval(found["revision"]), ast.literal_eval(found["down_revision"])
        except (KeyError, ValueError, SyntaxError):
            return None
        if not isinstance(revision, str) or not (parent is None or isinstance(parent, str)):
            return None
        revisions.add(revision)
        parents.add(parent)
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 and len(parents) == len(revisions) else None


def _at_plain_head(eng: Engine) -> str | None:
    """The head when the database is already there (checked without alembic), else None."""
    head = _plain_head()
    if head is None:
        return None
    try:
        with eng.connect() as conn:
            current = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all()
    except Exception:  # no table yet, or anything odd: alembic decides
        return None
    return head if current == [head] else None


def _migrate(eng: Engine) -> str:
    """Upgrade to head unless already there; concurrent first uses wait for each other."""
    if head := _at_plain_head(eng):
        return head
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    head = head_revision()
    with eng.connect() as conn:
        if MigrationContext.configure(conn).get_current_revision() == head:
            return head
    with eng.execution_options(**{_WRITE: True}).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        current = MigrationContext.configure(conn).get_current_revision()
        if current == head:
            return head
        _require_known_revision(current, eng)
        command.upgrade(_alembic_config(conn), "head")
    return head


def _require_known_revision(revision: str | None, eng: Engine) -> None:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    if revision is None:
        return
    try:
        ScriptDirectory.from_config(_alembic_config()).get_revision(revision)
    except CommandError as exc:
        raise SchemaError(
            f"database {eng.url.render_as_string(hide_password=True)} is at schema revision {revision}, "
            f"which kiln {KILN_VERSION} does not know: upgrade kiln"
        ) from exc


@contextmanager
def _writing() -> Iterator[Session]:
    """A short write transaction, committed on exit; rows stay readable after it (detached)."""
    bind = engine().execution_options(**{_WRITE: True})
    with Session(bind, expire_on_commit=False) as session, session.begin():
        yield session


def _serialize(session: Session, key: str) -> None:
    """Make look-up-then-insert atomic across processes for `key` (SQLite: BEGIN IMMEDIATE already does)."""
    if session.get_bind().dialect.name == "postgresql":
        session.exec(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), params={"key": key})


def _get(session: Session, model: type[Row], row_id: Any) -> Row:
    row = session.get(model, row_id)
    if row is None:
        raise LookupError(f"no {model.__name__} with id {row_id!r} in the provenance database")
    return row


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(allowed)}")


def _json(value: dict | None) -> str:
    return json.dumps(value or {}, sort_keys=True, default=str)


# ------------------------------------------------------------------------------------ recipes and builds


def record_recipe_version(*, name: str, version: str, fingerprint: str, recipe_json: str, git: GitInfo) -> int:
    """Row id of this recipe version; an identical one (fingerprint, commit, dirty, path) is reused."""
    identity = (
        RecipeVersion.fingerprint == fingerprint,
        RecipeVersion.commit == git.commit,  # None compares as IS NULL
        RecipeVersion.dirty == git.dirty,
        RecipeVersion.path == git.path,
    )
    with _writing() as session:
        _serialize(session, f"recipe-version:{fingerprint}")
        existing = session.exec(select(RecipeVersion.id).where(*identity)).first()
        if existing is not None:
            return existing
        row = RecipeVersion(
            name=name,
            version=version,
            fingerprint=fingerprint,
            repo=git.repo,
            repo_local=git.repo_local,
            checkout=git.root,
            commit=git.commit,
            branch=git.branch,
            dirty=git.dirty,
            in_git=git.in_git,
            path=git.path,
            recipe_json=recipe_json,
        )
        session.add(row)
        session.flush()
        assert row.id is not None
        return row.id


def start_build(
    *,
    recipe_version_id: int,
    target: str,
    cloud: str,
    region: str = "",
    trigger: str = "cli",
    flow_run_id: str | None = None,
    parameters: dict | None = None,
) -> str:
    """A new running build of one target; returns its id (uuid4 hex)."""
    _check(trigger, TRIGGERS, "trigger")
    build = Build(
        id=uuid.uuid4().hex,
        recipe_version_id=recipe_version_id,
        target=target,
        cloud=cloud,
        region=region,
        trigger=trigger,
        flow_run_id=flow_run_id,
        status="running",
        kiln_version=KILN_VERSION,
        host=socket.gethostname(),
        pid=os.getpid(),
        parameters_json=_json(parameters),
    )
    with _writing() as session:
        session.add(build)
    return build.id


def finish_build(build_id: str, status: str, *, error: str | None = None, stage: str | None = None) -> None:
    """Record how a build ended (succeeded, failed, cancelled, interrupted) and, if given, its last stage."""
    _check(status, BUILD_STATUSES, "build status")
    with _writing() as session:
        build = _get(session, Build, build_id)
        build.status = status
        build.finished = utcnow() if status not in ("pending", "running") else None
        if stage is not None:
            build.stage = stage
        if error is not None:
            build.error = redact(error)
        session.add(build)


def set_build_stage(build_id: str, stage: str) -> None:
    """The stage a running build has reached."""
    with _writing() as session:
        build = _get(session, Build, build_id)
        build.stage = stage
        session.add(build)


def record_layers(build_id: str, chain: list[dict]) -> None:
    """The layers a build's customize steps were made of, in order: each step's key and, when reused, the build
    whose layer it was (lineage names those builds)."""
    with _writing() as session:
        build = _get(session, Build, build_id)
        build.layers_json = json.dumps(chain, sort_keys=True)
        session.add(build)


def set_flow_run_id(build_id: str, flow_run_id: str) -> None:
    """Link a build to the Prefect flow run that executes it."""
    with _writing() as session:
        build = _get(session, Build, build_id)
        build.flow_run_id = flow_run_id
        session.add(build)


def dead_builds() -> list[str]:
    """Builds still "running" on this host whose process is gone (read only: what gc --dry-run reports)."""
    with Session(engine()) as session:
        return [build.id for build in _dead_running_builds(session)]


def _dead_running_builds(session: Session) -> list[Build]:
    host = socket.gethostname()
    running = session.exec(select(Build).where(Build.status == "running", Build.host == host)).all()
    return [build for build in running if not _process_alive(build.pid, build.started)]


def mark_interrupted_builds() -> list[str]:
    """Builds still "running" on this host whose process is gone become "interrupted" (stage kept)."""
    host = socket.gethostname()
    now = utcnow()
    with _writing() as session:
        dead = _dead_running_builds(session)
        for build in dead:
            build.status = "interrupted"
            build.finished = now
            build.error = build.error or f"process {build.pid} on {host} ended before the build finished"
            session.add(build)
        if dead:
            session.exec(
                update(StepRun)
                .where(StepRun.build_id.in_([b.id for b in dead]), StepRun.status == "running")
                .values(status="interrupted", finished=now)
            )
        return [build.id for build in dead]


def _process_alive(pid: int, since: dt.datetime) -> bool:
    """Whether `pid` is a live process that existed at `since` (a recycled pid or a zombie is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, started = stat
    if state in ("Z", "X"):
        return False
    return started is None or started <= since + dt.timedelta(seconds=5)


def _proc_stat(pid: int) -> tuple[str, dt.datetime | None] | None:
    """(state, start time) of a Linux process from /proc, or None where /proc is not available."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
    except (OSError, IndexError, StopIteration, ValueError):
        return None
    start_ticks = int(fields[19])  # field 22 of proc(5), counted after the ")" that ends the command name
    started = dt.datetime.fromtimestamp(boot + start_ticks / os.sysconf("SC_CLK_TCK"), dt.UTC)
    return fields[0], started


# ------------------------------------------------------------------------------------------ hands on a build


def pause_build(build_id: str, *, stage: str, deadline: dt.datetime, shell: dict) -> None:
    """The build waits before `stage` until `deadline`; `shell` says how `kiln shell` gets in (no secret in it)."""
    with _writing() as session:
        build = _get(session, Build, build_id)
        build.paused_before, build.pause_deadline, build.resume_requested = stage, deadline, None
        build.shell_json = _json(shell)
        session.add(build)


def request_resume(build_id: str) -> bool:
    """`kiln resume`: ask a paused build to go on; False when it is not paused (or no longer running)."""
    with _writing() as session:
        build = _get(session, Build, build_id)
        if build.paused_before is None or build.status != "running":
            return False
        build.resume_requested = build.resume_requested or utcnow()
        session.add(build)
        return True


def resume_requested(build_id: str) -> bool:
    """Whether someone asked the paused build to go on."""
    with Session(engine()) as session:
        return _get(session, Build, build_id).resume_requested is not None


def end_pause(build_id: str) -> None:
    """The build goes on (or gives up): no longer paused, and nobody gets in through `kiln shell` any more."""
    with _writing() as session:
        build = _get(session, Build, build_id)
        build.paused_before, build.pause_deadline, build.shell_json = None, None, "{}"
        session.add(build)


def mark_interactive(build_id: str) -> None:
    """Someone works in the build machine by hand: its image is no longer reproducible from its recipe alone."""
    with _writing() as session:
        build = _get(session, Build, build_id)
        build.interactive = True
        session.add(build)


def record_shell_session(build_id: str, transcript: str, *, started: dt.datetime) -> int:
    """A `kiln shell` session as a "shell" step of the build, its transcript (redacted) as the step's log."""
    with _writing() as session:
        build = _get(session, Build, build_id)
        build.interactive = True
        session.add(build)
        attempt = len(session.exec(select(StepRun.id).where(StepRun.build_id == build_id,
                                                            StepRun.stage == "shell")).all()) + 1  # fmt: skip
        step = StepRun(build_id=build_id, stage="shell", attempt=attempt, status="succeeded", started=started,
                       finished=utcnow(), log=redact(transcript))  # fmt: skip
        session.add(step)
        session.flush()
        assert step.id is not None
        return step.id


def set_recipe_version(build_id: str, recipe_version_id: int) -> None:
    """The recipe a build was finished from (a stage retried after its recipe was edited)."""
    with _writing() as session:
        build = _get(session, Build, build_id)
        build.recipe_version_id = recipe_version_id
        session.add(build)


# ------------------------------------------------------------------------------------------------ steps


def start_step(build_id: str, stage: str, attempt: int = 1) -> int:
    """A running attempt at one stage; returns its row id."""
    step = StepRun(build_id=build_id, stage=stage, attempt=attempt, status="running")
    with _writing() as session:
        session.add(step)
        session.flush()
        assert step.id is not None
        return step.id


def append_step_log(step_id: int, text: str) -> None:
    """Append to a step's log, redacted (a private key split over several appends is redacted whole)."""
    if not text:
        return
    length = func.length(StepRun.log)
    tail_start = case((length > len(OPEN_KEY), length - len(OPEN_KEY) + 1), else_=1)
    with _writing() as session:
        tail = session.exec(select(func.substr(StepRun.log, tail_start)).where(StepRun.id == step_id)).first()
        if tail is None:
            raise LookupError(f"no StepRun with id {step_id!r} in the provenance database")
        chunk = redact_continuation(text) if ends_open(tail) else redact(text)
        if chunk:
            session.exec(update(StepRun).where(StepRun.id == step_id).values(log=StepRun.log + chunk))


def finish_step(step_id: int, status: str, *, error: str | None = None) -> None:
    """Record how a step attempt ended."""
    _check(status, STEP_STATUSES, "step status")
    with _writing() as session:
        step = _get(session, StepRun, step_id)
        step.status = status
        step.finished = utcnow() if status != "running" else None
        if error is not None:
            step.error = redact(error)
        session.add(step)


# ----------------------------------------------------------------------------------------------- ledger


def ledger_intent(
    build_id: str, *, cloud: str, kind: str, name: str, region: str = "", tags: dict | None = None
) -> int:
    """Write the intent to create a resource, BEFORE the cloud call; returns the ledger row id."""
    _check(kind, RESOURCE_KINDS, "resource kind")
    row = Resource(build_id=build_id, cloud=cloud, region=region, kind=kind, name=name, tags_json=_json(tags))
    with _writing() as session:
        session.add(row)
        session.flush()
        assert row.id is not None
        return row.id


def ledger_created(resource_row_id: int, cloud_id: str) -> bool:
    """The cloud call returned: remember the id the cloud gave the resource. False when the row had been
    released meanwhile (a Ctrl-C cleanup ran during the call): it is open again, the caller must release it."""
    with _writing() as session:
        _serialize(session, f"ledger:{resource_row_id}")
        row = _get(session, Resource, resource_row_id)
        row.cloud_id = cloud_id
        was_open = row.released is None
        row.released = None
        session.add(row)
        return was_open


def ledger_abandon(resource_row_id: int) -> str | None:
    """Close a row whose cloud call has reported no id (a cleanup racing the call). Atomic with ledger_created:
    if the id arrived meanwhile, the row stays open and the id is returned, for the caller to release."""
    with _writing() as session:
        _serialize(session, f"ledger:{resource_row_id}")
        row = _get(session, Resource, resource_row_id)
        if row.cloud_id:
            return row.cloud_id
        row.released = row.released or utcnow()
        session.add(row)
        return None


def ledger_released(resource_row_id: int, *, error: str | None = None) -> None:
    """The resource is gone (idempotent); with `error`, the release failed and the row stays open for gc."""
    with _writing() as session:
        row = _get(session, Resource, resource_row_id)
        if error is not None:
            row.release_error = redact(error)
        else:
            row.released = row.released or utcnow()
            row.release_error = None
        session.add(row)


def open_resources(build_id: str | None = None) -> list[Resource]:
    """Ledger rows not released (of one build, or all), newest first: the order to clean them up."""
    query = select(Resource).where(Resource.released.is_(None)).order_by(Resource.id.desc())
    if build_id is not None:
        query = query.where(Resource.build_id == build_id)
    with Session(engine(), expire_on_commit=False) as session:
        return list(session.exec(query).all())


# ----------------------------------------------------------------------------------------------- images


def record_image(
    *,
    cloud: str,
    image_id: str,
    name: str = "",
    region: str = "",
    format: str = "",
    size: int | None = None,
    sha256: str = "",
    path: str = "",
    build_id: str | None = None,
    parent_id: int | None = None,
    kind: str = "built",
    tags: dict | None = None,
    status: str = "available",
    valid_until: dt.datetime | None = None,
) -> int:
    """Record an image; returns its row id. A base is one row per (cloud, region, image_id, sha256), reused: give
    a base disk its host-independent id (see models.Image), so every host sharing the database finds the same row."""
    _check(kind, IMAGE_KINDS, "image kind")
    _check(status, IMAGE_STATUSES, "image status")
    with _writing() as session:
        if kind == "base":
            _serialize(session, f"base-image:{cloud}:{region}:{image_id}:{sha256}")
            existing = session.exec(
                select(Image).where(
                    Image.kind == "base",
                    Image.cloud == cloud,
                    Image.region == region,
                    Image.image_id == image_id,
                    Image.sha256 == sha256,
                )
            ).first()
            if existing is not None:
                _refresh_base(existing, name=name, format=format, size=size, path=path, tags=tags)
                session.add(existing)
                assert existing.id is not None
                return existing.id
        image = Image(
            cloud=cloud,
            region=region,
            image_id=image_id,
            name=name,
            format=format,
            size=size,
            sha256=sha256,
            parent_id=parent_id,
            build_id=build_id,
            kind=kind,
            status=status,
            path=path,
            tags_json=_json(tags),
            valid_until=valid_until,
        )
        session.add(image)
        session.flush()
        assert image.id is not None
        return image.id


def _refresh_base(image: Image, *, name: str, format: str, size: int | None, path: str, tags: dict | None) -> None:
    """Fill in what a later sighting of the same base knows (a name, a cached path) without erasing."""
    image.name = name or image.name
    image.format = format or image.format
    image.size = size if size is not None else image.size
    image.path = path or image.path
    if tags:
        image.tags_json = _json(tags)


def set_image_status(image_row_id: int, status: str, *, reason: str | None = None) -> None:
    """Mark an image available, revoked, deleted or parent-revoked (with the reason for a revocation)."""
    _check(status, IMAGE_STATUSES, "image status")
    with _writing() as session:
        image = _get(session, Image, image_row_id)
        image.status = status
        if reason is not None:
            image.revoked_reason = reason
        elif status == "available":
            image.revoked_reason = None
        session.add(image)


@dataclass(frozen=True)
class ExpiredImage:
    """An image row that validity made expired."""

    row_id: int
    cloud: str
    region: str
    image_id: str
    valid_until: dt.datetime


def mark_expired_images(now: dt.datetime | None = None, *, row_id: int | None = None) -> list[ExpiredImage]:
    """Mark expired every available image (or only row `row_id`) whose valid_until has passed: no longer offered
    as up to date, still usable (a revoked image is refused; an expired one is only warned about)."""
    now = now or utcnow()
    conditions = [Image.status == "available", Image.valid_until.is_not(None), Image.valid_until <= now]
    if row_id is not None:
        conditions.append(Image.id == row_id)
    with _writing() as session:
        rows = session.exec(select(Image).where(*conditions).order_by(Image.id)).all()
        for image in rows:
            image.status = "expired"
            session.add(image)
        return [ExpiredImage(i.id, i.cloud, i.region, i.image_id, i.valid_until) for i in rows]  # type: ignore[arg-type]


def record_probe(build_id: str, *, name: str, kind: str, passed: bool, detail: str, duration: float) -> None:
    """One verify probe's result."""
    with _writing() as session:
        session.add(
            Probe(build_id=build_id, name=name, kind=kind, passed=passed, detail=redact(detail), duration=duration)
        )


def record_packages(image_row_id: int, packages: list[tuple[str, str, str]]) -> None:
    """An image's package manifest: (name, version, arch) tuples, inserted in bulk."""
    if not packages:
        return
    rows = [{"image_id": image_row_id, "name": n, "version": v, "arch": a} for n, v, a in packages]
    with _writing() as session:
        session.exec(insert(Package), params=rows)


# ----------------------------------------------------------------------------------------------- revocation


@dataclass(frozen=True)
class RevokedImage:
    """An image row whose status a revocation changed."""

    row_id: int
    cloud: str
    region: str
    image_id: str
    name: str
    kind: str
    build_id: str | None
    status: str  # revoked | parent-revoked
    reason: str


def revoke_image(image_row_id: int, reason: str, *, cascade: bool = False) -> list[RevokedImage]:
    """Revoke an image, in one transaction, with every row of the same bits (the other formats and copies its
    build made); everything built on it, at any depth, becomes parent-revoked (revoked with `cascade`).

    A descendant already revoked or deleted keeps its status. Returns the rows changed, the image's own first.
    """
    if not reason.strip():
        raise ValueError("a revocation needs a reason")
    with _writing() as session:
        subject = _get(session, Image, image_row_id)
        same_bits = [subject]
        if subject.build_id is not None and subject.kind != "base":
            same_bits += session.exec(
                select(Image).where(Image.build_id == subject.build_id, Image.id != subject.id).order_by(Image.id)
            ).all()
        tree = descendants_cte(several=True)
        below = session.exec(
            select(Image).join(tree, Image.id == tree.c.id).where(tree.c.depth > 0).order_by(tree.c.depth, Image.id),
            params={ROOTS: [image.id for image in same_bits]},
        ).all()
        changed: list[RevokedImage] = []
        own_ids = {image.id for image in same_bits}
        for image in same_bits:
            changed.append(_set_revoked(session, image, "revoked", reason))
        inherited = f"{subject.image_id} was revoked: {reason}"
        for image in below:
            if image.id in own_ids or image.status in ("revoked", "deleted"):
                continue
            own_ids.add(image.id)
            changed.append(_set_revoked(session, image, "revoked" if cascade else "parent-revoked", inherited))
        return changed


def _set_revoked(session: Session, image: Image, status: str, reason: str) -> RevokedImage:
    image.status = status
    image.revoked_reason = reason
    session.add(image)
    assert image.id is not None
    return RevokedImage(image.id, image.cloud, image.region, image.image_id, image.name, image.kind, image.build_id,
                        status, reason)


# ---------------------------------------------------------------------------------------------------- audits


def start_audit(image_row_id: int, *, fingerprint: str, commit: str | None, threshold: float) -> int:
    """A running repeatability audit of one image; returns its row id."""
    audit = Audit(image_row_id=image_row_id, fingerprint=fingerprint, commit=commit, threshold=threshold)
    with _writing() as session:
        session.add(audit)
        session.flush()
        assert audit.id is not None
        return audit.id


def set_audit_rebuild(audit_id: int, *, rebuild_id: str | None, rebuild_image_row_id: int | None = None) -> None:
    """Link an audit to the build that rebuilt the image and, once registered, the image it made."""
    with _writing() as session:
        audit = _get(session, Audit, audit_id)
        audit.rebuild_id = rebuild_id
        audit.rebuild_image_row_id = rebuild_image_row_id
        session.add(audit)


def finish_audit(
    audit_id: int,
    status: str,
    *,
    fingerprint_found: str | None = None,
    files_compared: int = 0,
    files_identical: int = 0,
    identity: float | None = None,
    packages: dict | None = None,
    files: dict | None = None,
    excluded: list[str] | None = None,
    error: str | None = None,
) -> None:
    """Record how an audit ended: the comparison's figures and differences, or the error that stopped it."""
    _check(status, AUDIT_STATUSES, "audit status")
    with _writing() as session:
        audit = _get(session, Audit, audit_id)
        audit.status = status
        audit.finished = utcnow() if status != "running" else None
        audit.fingerprint_found = fingerprint_found
        audit.files_compared = files_compared
        audit.files_identical = files_identical
        audit.identity = identity
        audit.packages_json = _json(packages)
        audit.files_json = _json(files)
        audit.excluded_json = json.dumps(excluded or [])
        audit.error = redact(error) if error is not None else None
        session.add(audit)
