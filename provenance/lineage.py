"""Queries over the provenance database: builds with their steps, probes and images, images with the recipe
version, commit and parent they came from, and the image graph (ancestors, descendants, siblings) by recursive
SQL. Read-only; store.py is the writer."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, or_
from sqlalchemy.orm import aliased
from sqlmodel import Session, SQLModel, select

from provenance import gitinfo, store
from provenance.graph import ROOT, ancestors_cte, descendants_cte
from provenance.models import Audit, Build, Image, Package, Probe, RecipeVersion, StepRun


class AmbiguousBuildId(LookupError):
    """A build id prefix that matches more than one build."""


@dataclass(frozen=True)
class ImageSummary:
    """An image with where it came from: build, recipe version, commit, parent."""

    image: Image
    parent_image_id: str | None  # the parent's cloud image id (a built image's base)
    build_id: str | None
    recipe_name: str | None
    recipe_version: str | None
    commit: str | None
    fingerprint: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            **_row_dict(self.image),
            "parent_image_id": self.parent_image_id,
            "recipe_name": self.recipe_name,
            "recipe_version": self.recipe_version,
            "commit": self.commit,
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True)
class BuildSummary:
    """A build and the recipe version it built."""

    build: Build
    recipe: RecipeVersion

    def to_dict(self) -> dict[str, Any]:
        return {**_row_dict(self.build), "recipe": _recipe_dict(self.recipe)}


@dataclass(frozen=True)
class BuildDetail:
    """Everything recorded about one build."""

    build: Build
    recipe: RecipeVersion
    steps: list[StepRun]  # in the order they started
    probes: list[Probe]
    images: list[ImageSummary]

    def to_dict(self) -> dict[str, Any]:
        return {
            **_row_dict(self.build),
            "recipe": _recipe_dict(self.recipe),
            "steps": [_row_dict(step) for step in self.steps],
            "probes": [_row_dict(probe) for probe in self.probes],
            "images": [image.to_dict() for image in self.images],
        }


def get_build(build_id: str) -> BuildDetail | None:
    """A build by id or unique id prefix (None if none matches; AmbiguousBuildId if several do)."""
    with _session() as session:
        matches = session.exec(select(Build).where(Build.id.startswith(build_id, autoescape=True)).limit(2)).all()
        if not matches:
            return None
        exact = [b for b in matches if b.id == build_id]
        if len(matches) > 1 and not exact:
            raise AmbiguousBuildId(f"build id prefix {build_id!r} matches several builds; give more characters")
        build = exact[0] if exact else matches[0]
        recipe = session.get(RecipeVersion, build.recipe_version_id)
        assert recipe is not None  # foreign key
        steps = session.exec(
            select(StepRun).where(StepRun.build_id == build.id).order_by(StepRun.started, StepRun.id)
        ).all()
        probes = session.exec(select(Probe).where(Probe.build_id == build.id).order_by(Probe.id)).all()
        images = _image_summaries(session, Image.build_id == build.id)
        return BuildDetail(build=build, recipe=recipe, steps=list(steps), probes=list(probes), images=images)


def list_builds(recipe: str | None = None, status: str | None = None, limit: int = 50) -> list[BuildSummary]:
    """Builds, newest first, optionally of one recipe (by name) and/or in one status."""
    query = select(Build, RecipeVersion).join(RecipeVersion, Build.recipe_version_id == RecipeVersion.id)
    if recipe is not None:
        query = query.where(RecipeVersion.name == recipe)
    if status is not None:
        query = query.where(Build.status == status)
    query = query.order_by(Build.started.desc(), Build.id).limit(limit)
    with _session() as session:
        return [BuildSummary(build=b, recipe=r) for b, r in session.exec(query).all()]


def list_images(
    cloud: str | None = None, recipe: str | None = None, *, valid_until_before: dt.datetime | None = None
) -> list[ImageSummary]:
    """Images, newest first, optionally on one cloud and/or built from one recipe (by name). With
    valid_until_before: only the images still in use (available or expired) whose validity ends before then,
    the soonest first."""
    conditions: list[ColumnElement[bool]] = []
    if cloud is not None:
        conditions.append(Image.cloud == cloud)
    if recipe is not None:
        conditions.append(RecipeVersion.name == recipe)
    if valid_until_before is None:
        with _session() as session:
            return _image_summaries(session, *conditions)
    conditions += [Image.valid_until.is_not(None), Image.valid_until <= valid_until_before,
                   Image.status.in_(("available", "expired"))]  # fmt: skip
    with _session() as session:
        found = _image_summaries(session, *conditions)
    return sorted(found, key=lambda summary: summary.image.valid_until)


def find_image(image_id: str) -> list[ImageSummary]:
    """Every image row known by this cloud image id or file sha256 (newest first; [] when unknown)."""
    with _session() as session:
        return _image_summaries(session, (Image.image_id == image_id) | (Image.sha256 == image_id))


def _image_summaries(session: Session, *conditions: ColumnElement[bool]) -> list[ImageSummary]:
    parent = aliased(Image)
    query: Select = (
        select(Image, parent.image_id, RecipeVersion.name, RecipeVersion.version, RecipeVersion.commit,
               RecipeVersion.fingerprint)
        .outerjoin(parent, Image.parent_id == parent.id)
        .outerjoin(Build, Image.build_id == Build.id)
        .outerjoin(RecipeVersion, Build.recipe_version_id == RecipeVersion.id)
        .where(*conditions)
        .order_by(Image.created.desc(), Image.id.desc())
    )
    return [
        ImageSummary(
            image=image,
            parent_image_id=parent_image_id,
            build_id=image.build_id,
            recipe_name=name,
            recipe_version=version,
            commit=commit,
            fingerprint=fingerprint,
        )
        for image, parent_image_id, name, version, commit, fingerprint in session.exec(query).all()
    ]


def _session() -> Session:
    return Session(store.engine(), expire_on_commit=False)


def _row_dict(row: SQLModel) -> dict[str, Any]:
    """A row as JSON-ready values: timestamps in ISO 8601, *_json columns decoded."""
    data: dict[str, Any] = {}
    for key in type(row).model_fields:
        value = getattr(row, key)
        if key.endswith("_json") and isinstance(value, str):
            data[key.removesuffix("_json")] = json.loads(value)
        elif hasattr(value, "isoformat"):
            data[key] = value.isoformat()
        else:
            data[key] = value
    return data


def _recipe_dict(recipe: RecipeVersion) -> dict[str, Any]:
    data = _row_dict(recipe)
    data.pop("recipe", None)  # the canonical recipe itself is long; `kiln show --json` keeps it out
    return data


# ------------------------------------------------------------------------- reads the build flows need


def image_status(image_row_id: int) -> str:
    """The status of one Image row (available, revoked, parent-revoked, deleted, expired)."""
    return image_row(image_row_id).status


def image_row(image_row_id: int) -> Image:
    """One Image row (detached): its status, validity, build."""
    with _session() as session:
        image = session.get(Image, image_row_id)
        if image is None:
            raise LookupError(f"no image row {image_row_id}")
        return image


def find_image_row(cloud: str, image_id: str, region: str = "") -> int | None:
    """The row id of an image kiln knows on this cloud and region (a kiln-built base keeps its own row)."""
    query = (
        select(Image.id)
        .where(Image.cloud == cloud, Image.image_id == image_id, Image.region == region)
        .order_by(Image.id)
        .limit(1)
    )
    with _session() as session:
        return session.exec(query).first()


def build_for_flow_run(flow_run_id: str) -> Build | None:
    """The build a Prefect flow run recorded (None when it failed before recording one)."""
    with _session() as session:
        return session.exec(select(Build).where(Build.flow_run_id == flow_run_id).limit(1)).first()


@dataclass(frozen=True)
class EquivalentBuild:
    build_id: str
    image_id: str
    valid_until: dt.datetime | None = None  # None: recorded before kiln kept validity


def equivalent_build(*, fingerprint: str, target: str, base_digest: str, kiln_version: str) -> EquivalentBuild | None:
    """A succeeded build of the same recipe fingerprint and target, on the same base bits, by the same kiln, whose
    image is neither revoked nor deleted (an expired one is returned: the caller says why it is rebuilt)."""
    parent = aliased(Image)
    query = (
        select(Build.id, Image.image_id, Image.valid_until)
        .join(RecipeVersion, Build.recipe_version_id == RecipeVersion.id)
        .join(Image, (Image.build_id == Build.id) & (Image.kind == "built"))
        .join(parent, Image.parent_id == parent.id)
        .where(
            RecipeVersion.fingerprint == fingerprint,
            Build.target == target,
            Build.status == "succeeded",
            Build.kiln_version == kiln_version,
            parent.sha256 == base_digest,
            Image.status.in_(("available", "expired")),
        )
        .order_by(Build.finished.desc())
        .limit(1)
    )
    with _session() as session:
        row = session.exec(query).first()
        return EquivalentBuild(*row) if row else None


# ------------------------------------------------------------------------------------- the image graph


class UnknownImage(LookupError):
    """No image row has this cloud image id or file digest."""


# What kiln says of an image whose build someone worked in by hand (`kiln show`, `kiln lineage`, `kiln audit`).
NOT_REPRODUCIBLE = "interactive: someone worked in the build machine by hand (kiln shell); " \
    "the image is not reproducible from its recipe alone"

KIND_PREFERENCE = {"built": 0, "published": 1, "copy": 2, "base": 3}


@dataclass(frozen=True)
class LineageNode:
    """An image in the graph, with the build and recipe version that made it (None for a base kiln did not build).

    depth: 0 for the image asked about, 1 for its parent (up) or children (down), and so on.
    """

    image: Image
    depth: int
    parent_row_id: int | None
    build: Build | None
    recipe: RecipeVersion | None

    def to_dict(self) -> dict[str, Any]:
        image = self.image
        return {
            "image_id": image.image_id,
            "row_id": image.id,
            "cloud": image.cloud,
            "region": image.region,
            "kind": image.kind,
            "status": image.status,
            "revoked_reason": image.revoked_reason,
            "name": image.name,
            "format": image.format,
            "size": image.size,
            "sha256": image.sha256,
            "path": image.path,
            "created": image.created.isoformat(),
            "valid_until": image.valid_until.isoformat() if image.valid_until else None,
            "depth": self.depth,
            "parent_row_id": self.parent_row_id,
            "build": None if self.build is None else {
                key: _row_dict(self.build)[key]
                for key in ("id", "target", "cloud", "region", "trigger", "status", "started", "finished",
                            "kiln_version", "interactive")
            } | {"reproducible_from_recipe": not self.build.interactive},
            "recipe": None if self.recipe is None else _recipe_source(self.recipe),
        }


def _recipe_source(recipe: RecipeVersion) -> dict[str, Any]:
    """A recipe version as lineage shows it: its source by the URI any host resolves (SLSA's git+<remote>@commit),
    the build host's work tree only as `checkout`."""
    data = {key: _row_dict(recipe)[key] for key in ("name", "version", "fingerprint", "repo", "repo_local", "commit",
                                                    "branch", "dirty", "path", "checkout")}
    data["source"] = gitinfo.source_uri(recipe.repo, recipe.commit) if recipe.repo else None
    return data


@dataclass(frozen=True)
class Lineage:
    """An image with what it descends from (nearest first), what descends from it, and its siblings."""

    subject: LineageNode
    ancestors: list[LineageNode] | None  # None: not asked for
    descendants: list[LineageNode] | None
    siblings: list[LineageNode] | None

    def to_dict(self) -> dict[str, Any]:
        subject = self.subject.to_dict()
        data: dict[str, Any] = {
            "image": subject,
            "build": subject["build"],
            "recipe": subject["recipe"],
        }
        if self.ancestors is not None:
            data["base"] = self.ancestors[0].to_dict() if self.ancestors else None
            data["ancestors"] = [node.to_dict() for node in self.ancestors]
        if self.descendants is not None:
            data["children"] = [node.image.image_id for node in self.descendants if node.depth == 1]
            data["descendants"] = [node.to_dict() for node in self.descendants]
        if self.siblings is not None:
            data["siblings"] = [node.to_dict() for node in self.siblings]
        return data


def resolve_image(image_id: str) -> Image:
    """The image row a user means by a cloud image id or a file sha256: an exact id before a digest, a built
    image before a copy or a base, the newest first. UnknownImage when kiln has none."""
    query = select(Image).where((Image.image_id == image_id) | (Image.sha256 == image_id.lower()))
    with _session() as session:
        rows = session.exec(query).all()
    if not rows:
        raise UnknownImage(f"no image {image_id!r} in the provenance database (see `kiln images`)")
    return min(
        rows,
        key=lambda row: (row.image_id != image_id, KIND_PREFERENCE.get(row.kind, 9), -row.created.timestamp(),
                         -(row.id or 0)),
    )


def lineage(image_id: str, *, up: bool = True, down: bool = True, siblings: bool = True) -> Lineage:
    """The lineage of an image kiln knows (by cloud id or digest): each direction is one recursive query."""
    image = resolve_image(image_id)
    assert image.id is not None
    with _session() as session:
        subject = _node_of(session, image)
        return Lineage(
            subject=subject,
            ancestors=_ancestors(session, image.id) if up else None,
            descendants=_descendants(session, image.id) if down else None,
            siblings=_siblings(session, image) if siblings else None,
        )


def ancestors(image_row_id: int) -> list[LineageNode]:
    """The image's parent, its parent's parent, … to the root (nearest first)."""
    with _session() as session:
        return _ancestors(session, image_row_id)


def descendants(image_row_id: int) -> list[LineageNode]:
    """Every image built (or copied) from this one, at any depth, by depth then age."""
    with _session() as session:
        return _descendants(session, image_row_id)


def siblings(image_row_id: int) -> list[LineageNode]:
    """Images of the same recipe version (other targets, regions, formats, copies) or of the same bits."""
    with _session() as session:
        image = session.get(Image, image_row_id)
        if image is None:
            raise UnknownImage(f"no image row {image_row_id}")
        return _siblings(session, image)


def _graph_query(cte) -> Select:  # noqa: ANN001 - a recursive CTE from provenance.graph
    return (
        select(Image, Build, RecipeVersion, cte.c.depth)
        .join(cte, Image.id == cte.c.id)
        .outerjoin(Build, Image.build_id == Build.id)
        .outerjoin(RecipeVersion, Build.recipe_version_id == RecipeVersion.id)
        .where(cte.c.depth > 0)
        .order_by(cte.c.depth, Image.id)
    )


# Built once: each call only binds the starting row (and SQLAlchemy reuses the compiled SQL).
_ANCESTORS = _graph_query(ancestors_cte())
_DESCENDANTS = _graph_query(descendants_cte())


def _nodes(rows: Any) -> list[LineageNode]:
    return [LineageNode(image, depth, image.parent_id, build, recipe) for image, build, recipe, depth in rows]


def _ancestors(session: Session, image_row_id: int) -> list[LineageNode]:
    return _nodes(session.exec(_ANCESTORS, params={ROOT: image_row_id}).all())


def _descendants(session: Session, image_row_id: int) -> list[LineageNode]:
    return _nodes(session.exec(_DESCENDANTS, params={ROOT: image_row_id}).all())


def _siblings(session: Session, image: Image) -> list[LineageNode]:
    same: list[ColumnElement[bool]] = []
    if image.build_id is not None:
        recipe_version = select(Build.recipe_version_id).where(Build.id == image.build_id).scalar_subquery()
        same.append(Build.recipe_version_id == recipe_version)
    if image.sha256:
        same.append(Image.sha256 == image.sha256)
    if not same:
        return []
    query = (
        select(Image, Build, RecipeVersion)
        .outerjoin(Build, Image.build_id == Build.id)
        .outerjoin(RecipeVersion, Build.recipe_version_id == RecipeVersion.id)
        .where(or_(*same), Image.id != image.id)
        .order_by(Image.created, Image.id)
    )
    return [LineageNode(row, 0, row.parent_id, build, recipe) for row, build, recipe in session.exec(query).all()]


def _node_of(session: Session, image: Image) -> LineageNode:
    build = session.get(Build, image.build_id) if image.build_id else None
    recipe = session.get(RecipeVersion, build.recipe_version_id) if build else None
    return LineageNode(image, 0, image.parent_id, build, recipe)


# ------------------------------------------------------------------------------------------------ audits


def packages_of(image_row_id: int) -> list[tuple[str, str, str]]:
    """An image's package manifest as (name, version, arch), by name."""
    query = select(Package.name, Package.version, Package.arch).where(Package.image_id == image_row_id)
    with _session() as session:
        return sorted((name, version, arch) for name, version, arch in session.exec(query).all())


def get_audit(audit_id: int) -> Audit | None:
    """One repeatability audit by row id."""
    with _session() as session:
        return session.get(Audit, audit_id)


def audits_of(image_row_id: int) -> list[Audit]:
    """The audits of one image, newest first."""
    query = select(Audit).where(Audit.image_row_id == image_row_id).order_by(Audit.started.desc(), Audit.id.desc())
    with _session() as session:
        return list(session.exec(query).all())


# ------------------------------------------------------------------------------- reads `kiln gc` needs


def builds_by_id(build_ids: list[str]) -> dict[str, BuildSummary]:
    """The builds with these exact ids (with their recipe versions); unknown ids are absent."""
    if not build_ids:
        return {}
    query = (
        select(Build, RecipeVersion)
        .join(RecipeVersion, Build.recipe_version_id == RecipeVersion.id)
        .where(Build.id.in_(sorted(set(build_ids))))
    )
    with _session() as session:
        return {b.id: BuildSummary(build=b, recipe=r) for b, r in session.exec(query).all()}


def recorded_targets() -> list[tuple[str, dict[str, Any]]]:
    """(target name, target spec) of every distinct target some recorded build used."""
    query = (
        select(Build.target, RecipeVersion.recipe_json)
        .join(RecipeVersion, Build.recipe_version_id == RecipeVersion.id)
        .distinct()
    )
    seen: dict[str, tuple[str, dict[str, Any]]] = {}
    with _session() as session:
        for target, recipe_json in session.exec(query).all():
            spec = json.loads(recipe_json or "{}").get("targets", {}).get(target)
            if spec is not None:
                seen.setdefault(json.dumps([target, spec], sort_keys=True), (target, spec))
    return list(seen.values())
