"""Queries over the provenance database: builds with their steps, probes and images, and images with the
recipe version, commit and parent they came from. Read-only; store.py is the writer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select
from sqlalchemy.orm import aliased
from sqlmodel import Session, SQLModel, select

from provenance import store
from provenance.models import Build, Image, Probe, RecipeVersion, StepRun


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


def list_images(cloud: str | None = None, recipe: str | None = None) -> list[ImageSummary]:
    """Images, newest first, optionally on one cloud and/or built from one recipe (by name)."""
    conditions: list[ColumnElement[bool]] = []
    if cloud is not None:
        conditions.append(Image.cloud == cloud)
    if recipe is not None:
        conditions.append(RecipeVersion.name == recipe)
    with _session() as session:
        return _image_summaries(session, *conditions)


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
    """The status of one Image row (available, revoked, parent-revoked, deleted)."""
    with _session() as session:
        image = session.get(Image, image_row_id)
        if image is None:
            raise LookupError(f"no image row {image_row_id}")
        return image.status


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


def equivalent_build(*, fingerprint: str, target: str, base_digest: str, kiln_version: str) -> EquivalentBuild | None:
    """A succeeded build of the same recipe fingerprint and target, on the same base bits, by the same kiln."""
    parent = aliased(Image)
    query = (
        select(Build.id, Image.image_id)
        .join(RecipeVersion, Build.recipe_version_id == RecipeVersion.id)
        .join(Image, (Image.build_id == Build.id) & (Image.kind == "built"))
        .join(parent, Image.parent_id == parent.id)
        .where(
            RecipeVersion.fingerprint == fingerprint,
            Build.target == target,
            Build.status == "succeeded",
            Build.kiln_version == kiln_version,
            parent.sha256 == base_digest,
            Image.status == "available",
        )
        .order_by(Build.finished.desc())
        .limit(1)
    )
    with _session() as session:
        row = session.exec(query).first()
        return EquivalentBuild(*row) if row else None
