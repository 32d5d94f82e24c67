"""The provenance schema: recipe versions, builds and their steps, images and their parents, probes,
packages, and the resource ledger. Alembic (provenance/migrations) owns the tables; only store.py writes.

    RecipeVersion 1──* Build 1──* StepRun
                         │ 1──* Probe
                         │ 1──* Resource      (the ledger: intent before the cloud call, released after)
                         └ 1──* Image 1──* Package
                                  ├──* Image  (parent_id: a built image's base, a copy's source)
                                  └──* Audit  (a rebuild from the recorded commit, compared with the image)
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, DateTime, Index, Text, TypeDecorator, UniqueConstraint, text
from sqlmodel import Field, SQLModel

# Deterministic constraint names, identical on SQLite and PostgreSQL, so migrations can name them.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

BUILD_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled", "interrupted")
STEP_STATUSES = ("running", "succeeded", "failed", "cancelled", "skipped", "interrupted")
TRIGGERS = ("cli", "ui", "schedule", "automation", "audit", "test")  # ui: the Prefect UI or its API
IMAGE_KINDS = ("base", "built", "copy", "published")
IMAGE_STATUSES = ("available", "revoked", "deleted", "parent-revoked", "expired")  # expired: past valid_until
AUDIT_STATUSES = ("running", "passed", "differs", "failed")
RESOURCE_KINDS = (
    "instance", "keypair", "security-group", "image", "snapshot", "floating-ip", "file", "process", "volume",
    "import-task", "object",  # EC2 publish: a VM Import task, an S3 object (s3://bucket/key)
)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UtcDateTime(TypeDecorator):
    """A timestamp stored in UTC and always read back timezone-aware (SQLite keeps no zone of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: kiln stores UTC-aware timestamps only")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class RecipeVersion(SQLModel, table=True):
    """A recipe as it was when built: its canonical JSON, fingerprint and git facts."""

    __tablename__ = "recipe_version"
    __table_args__ = (UniqueConstraint("fingerprint", "commit", "dirty", "path", name="uq_recipe_version_identity"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True)
    version: str
    fingerprint: str = Field(index=True)  # sha256 of the canonical recipe and every file it references
    repo: str | None = None  # remote URL (credentials stripped), else the repository root; None outside git
    repo_local: bool = False  # repo is a path only the build host can resolve (no remote, or a path remote)
    checkout: str | None = None  # the work tree on the build host: an annotation, never part of the identity
    commit: str | None = Field(default=None, index=True)  # None: recipe outside git or no commit yet
    branch: str | None = None  # None when detached
    dirty: bool = False  # the recipe or one of its files modified, staged or untracked
    in_git: bool = False
    path: str  # relative to the repository root; absolute when not in git
    recipe_json: str = Field(sa_type=Text)
    created: dt.datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)


class Build(SQLModel, table=True):
    """One target of one recipe version built once: who, where, when, how far it got."""

    id: str = Field(primary_key=True)  # uuid4 hex: builds recorded on different hosts never collide
    recipe_version_id: int = Field(foreign_key="recipe_version.id", index=True)
    target: str  # the recipe's target name
    cloud: str  # the target's cloud kind: local | ec2 | openstack
    region: str = ""
    trigger: str = "cli"  # TRIGGERS
    flow_run_id: str | None = None
    status: str = Field(default="running", index=True)  # BUILD_STATUSES
    stage: str | None = None  # the stage reached, or the one that failed
    error: str | None = Field(default=None, sa_type=Text)
    started: dt.datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)
    finished: dt.datetime | None = Field(default=None, sa_type=UtcDateTime)
    kiln_version: str
    host: str
    pid: int
    parameters_json: str = Field(default="{}", sa_type=Text)
    # customize's steps as layers (container builds): [{"step", "key", "reused_from": build id or null}], in order
    layers_json: str = Field(default="[]", sa_type=Text)
    # Hands on the build: someone used `kiln shell` in it (its image is not reproducible from its recipe alone)
    interactive: bool = False
    paused_before: str | None = None  # the stage a paused build waits before; None when not paused
    pause_deadline: dt.datetime | None = Field(default=None, sa_type=UtcDateTime)  # when a pause gives up
    resume_requested: dt.datetime | None = Field(default=None, sa_type=UtcDateTime)  # `kiln resume` asked to go on
    shell_json: str = Field(default="{}", sa_type=Text)  # while paused: how `kiln shell` gets in (argv, no secret)


class StepRun(SQLModel, table=True):
    """One attempt at one stage of a build, with its log."""

    __tablename__ = "step_run"

    id: int | None = Field(default=None, primary_key=True)
    build_id: str = Field(foreign_key="build.id", index=True)
    stage: str
    attempt: int = 1
    status: str = "running"  # STEP_STATUSES
    started: dt.datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)
    finished: dt.datetime | None = Field(default=None, sa_type=UtcDateTime)
    log: str = Field(default="", sa_type=Text)  # redacted on the way in
    error: str | None = Field(default=None, sa_type=Text)


class Image(SQLModel, table=True):
    """An image on a cloud: a base kiln started from, one it built, or a copy/publication of one.

    A base is one row whichever host recorded it: its image_id is the cloud's id (AMI, Glance uuid), or for a
    disk file its content (`base:debian-bookworm@sha256:…` for a bootstrap, `sha256:…` for a file or URL), and
    the unique index below holds one row per base however many hosts share the database."""

    __table_args__ = (
        Index("uq_image_base_identity", "cloud", "region", "image_id", "sha256", unique=True,
              sqlite_where=text("kind = 'base'"), postgresql_where=text("kind = 'base'")),
    )

    id: int | None = Field(default=None, primary_key=True)
    cloud: str
    region: str = ""
    image_id: str = Field(index=True)  # AMI id, Glance uuid, local image id
    name: str = ""
    format: str = ""  # qcow2, raw, ova, ... for files; "" for cloud images
    size: int | None = Field(default=None, sa_type=BigInteger)  # bytes
    sha256: str = Field(default="", index=True)  # of the disk file where one exists
    parent_id: int | None = Field(default=None, foreign_key="image.id", index=True)  # base or source image
    build_id: str | None = Field(default=None, foreign_key="build.id", index=True)  # None for bases
    kind: str = "built"  # IMAGE_KINDS
    status: str = "available"  # IMAGE_STATUSES
    revoked_reason: str | None = Field(default=None, sa_type=Text)
    path: str = ""  # local file, if any (a base: where the host that first recorded it cached it, an annotation)
    tags_json: str = Field(default="{}", sa_type=Text)
    created: dt.datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)
    valid_until: dt.datetime | None = Field(default=None, sa_type=UtcDateTime, index=True)  # the recipe's valid_for


class Probe(SQLModel, table=True):
    """One verify probe's result against a built image."""

    id: int | None = Field(default=None, primary_key=True)
    build_id: str = Field(foreign_key="build.id", index=True)
    name: str  # the probe's label
    kind: str  # command | port | http | ...
    passed: bool
    detail: str = Field(default="", sa_type=Text)
    duration: float = 0.0  # seconds


class Package(SQLModel, table=True):
    """One package installed in an image (its manifest, from the guest's package manager)."""

    id: int | None = Field(default=None, primary_key=True)
    image_id: int = Field(foreign_key="image.id", index=True)  # the Image row, not the cloud's id
    name: str = Field(index=True)
    version: str
    arch: str = ""


class Resource(SQLModel, table=True):
    """The ledger: something a build created or is about to create, until it is released."""

    id: int | None = Field(default=None, primary_key=True)
    build_id: str = Field(foreign_key="build.id", index=True)
    cloud: str
    region: str = ""
    kind: str  # RESOURCE_KINDS
    name: str
    cloud_id: str | None = None  # None until the cloud call returned
    tags_json: str = Field(default="{}", sa_type=Text)
    created: dt.datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)  # when the intent was written
    released: dt.datetime | None = Field(default=None, sa_type=UtcDateTime, index=True)
    release_error: str | None = Field(default=None, sa_type=Text)  # last failed release attempt


class Audit(SQLModel, table=True):
    """A repeatability audit: the image rebuilt from its recorded commit, packages and files compared."""

    id: int | None = Field(default=None, primary_key=True)
    image_row_id: int = Field(foreign_key="image.id", index=True)  # the audited image
    rebuild_id: str | None = Field(default=None, foreign_key="build.id", index=True)  # the audit's own build
    rebuild_image_row_id: int | None = Field(default=None, foreign_key="image.id")
    commit: str | None = None
    fingerprint: str  # recorded with the audited image's recipe version
    fingerprint_found: str | None = None  # computed from the checked-out commit
    status: str = "running"  # AUDIT_STATUSES: passed = identity at or above the threshold
    threshold: float = 99.0  # percent of identical files required to pass
    files_compared: int = 0
    files_identical: int = 0
    identity: float | None = None  # percent of identical files
    packages_json: str = Field(default="{}", sa_type=Text)  # added / removed / changed
    files_json: str = Field(default="{}", sa_type=Text)  # only_original / only_rebuild / changed (capped lists)
    excluded_json: str = Field(default="[]", sa_type=Text)  # the path patterns left out of the comparison
    error: str | None = Field(default=None, sa_type=Text)
    started: dt.datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)
    finished: dt.datetime | None = Field(default=None, sa_type=UtcDateTime)
