"""Publish a locally built image to another cloud (OpenStack Glance, EC2) and record it as the same bits.

EGI's way: build once on the local cloud, then upload the very same file to every cloud, so the image on
each cloud is provably one file. The file is checked against its recorded sha256 before the upload, and the
digests of what the cloud was given against it after (on OpenStack Glance also checks its own checksum and
multihash against the file); the published row's parent is the local image and its sha256 is the local file's.
Whatever the cloud creates on the way (the image, EC2's S3 object and import task) is ledgered under the image's
build before each call, so a killed publish leaves nothing `kiln gc` cannot find. Any cloud with the
PublishesImages capability takes a publication."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clouds import open_cloud, registry
from clouds.base import TAG_ROLE, Cloud, CloudError, HoldsConnection, ImageRef, PublishesImages
from core.digests import sha256_file
from core.recipe import load_recipe
from provenance import lineage, store
from provenance.redact import describe

log = logging.getLogger("kiln.publish")
PUBLISHABLE_FORMATS = ("qcow2", "raw")


class PublishRefused(ValueError):
    """The image cannot be published as asked (unknown, revoked, missing file, bits changed, a cloud or option that
    takes no publication): nothing uploaded."""


class PublishFailed(RuntimeError):
    """The cloud refused or failed the publication; whatever it had made of it is gone again."""


@dataclass(frozen=True)
class Publication:
    """A local image published to a cloud: both ids, both provenance rows, and the one sha256 they share."""

    source_image_id: str
    source_row_id: int
    cloud: str
    region: str
    image_id: str
    row_id: int
    name: str
    sha256: str
    size: int
    shared_with: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def destination(
    to: str, *, recipe_path: str | None = None, share: list[str] = (), region: str | None = None,
    endpoint_url: str | None = None, profile: str | None = None,
) -> PublishesImages:  # fmt: skip
    """The cloud `kiln publish --to TO` means: a target of the recipe (its cloud settings), else a cloud kind or a
    named place (a clouds.yaml entry) with the command's options; shared with its share_with and `share`.
    PublishRefused when that cloud takes no publication; RecipeError for a bad recipe."""
    if recipe_path is None:
        try:
            cloud: Cloud = registry.open_destination(to, region=region, endpoint_url=endpoint_url, profile=profile)
        except ValueError as exc:
            raise PublishRefused(str(exc)) from None
    else:
        recipe = load_recipe(recipe_path)
        target = recipe.targets.get(to)
        if target is None:
            raise PublishRefused(f"{recipe_path}: targets.{to}: no such target (have: {', '.join(recipe.targets)})")
        cloud = open_cloud(target, recipe.timeouts, target_name=to)
    if not isinstance(cloud, PublishesImages):
        where = f"{recipe_path}: targets.{to}: " if recipe_path else ""
        raise PublishRefused(f"{where}the {cloud.name} cloud takes no published image")
    cloud.share_with = list(dict.fromkeys([*cloud.share_with, *share]))
    return cloud


def local_image_row(image_id: str):  # noqa: ANN201 - a provenance.models.Image row
    """The provenance row of an image kiln built whose disk file is on this host (its primary file), or
    PublishRefused."""
    rows = [s.image for s in lineage.find_image(image_id) if s.image.image_id == image_id and s.image.path]
    if not rows:
        raise PublishRefused(f"{image_id}: no local image with this id in the provenance database (see `kiln images`)")
    row = rows[0]
    if row.status != "available":
        raise PublishRefused(f"{image_id} is {row.status}{f' ({row.revoked_reason})' if row.revoked_reason else ''}: "
                             "a revoked image is not published")
    if row.format not in PUBLISHABLE_FORMATS:
        formats = " or ".join(PUBLISHABLE_FORMATS)
        raise PublishRefused(f"{image_id} is a {row.format or 'cloud'} image; kiln publishes {formats} files")
    if not Path(row.path).is_file():
        raise PublishRefused(f"{image_id}: its file {row.path or '(none recorded)'} is gone")
    return row


def publish_image(
    image_id: str,
    cloud: PublishesImages,
    *,
    name: str | None = None,
    bucket: str | None = None,
    progress: Callable[[str], None] = log.info,
) -> Publication:
    """Publish local image `image_id` to `cloud` (shared with cloud.share_with) and record the row."""
    row = local_image_row(image_id)
    if problem := cloud.publish_problem(bucket=bucket):
        raise PublishRefused(problem)
    path = Path(row.path)
    _check_bits(image_id, row, path, progress)
    tags = {**json.loads(row.tags_json or "{}"), TAG_ROLE: "published"}
    published_name = name or row.name or image_id
    failures = (CloudError, *registry.cloud_errors(cloud.name))
    try:
        ref, uploaded = cloud.publish(path, published_name, tags=tags, properties={"kiln_source_image": image_id},
                                      disk_format=row.format, progress=progress, bucket=bucket,
                                      ledger=_BuildLedger(row.build_id, cloud))  # fmt: skip
    except failures as exc:
        raise PublishFailed(describe(exc)) from exc
    if uploaded.sha256 != row.sha256:  # the file changed between the check and the upload
        cloud.delete_image(ref)
        raise PublishRefused(f"{image_id}: {path} changed during the upload; nothing published")
    return _record(row, ref, published_name, tags, uploaded.size, cloud.delete_image, list(cloud.share_with),
                   progress)  # fmt: skip


def _check_bits(image_id: str, row: Any, path: Path, progress: Callable[[str], None]) -> None:
    progress(f"checking {path} against its recorded sha256")
    digest = sha256_file(path)
    if digest != row.sha256:
        raise PublishRefused(f"{image_id}: {path} has sha256 {digest}, not the recorded {row.sha256}; "
                             "the file changed since kiln built it")


def _record(
    row: Any,
    ref: ImageRef,
    name: str,
    tags: dict[str, str],
    size: int,
    delete: Callable[[ImageRef], None],
    shared_with: list[str],
    progress: Callable[[str], None],
) -> Publication:
    """The published row (parent: the local row, the local file's sha256); the image is deleted if it fails."""
    try:
        row_id = store.record_image(
            cloud=ref.cloud,
            region=ref.region,
            image_id=ref.image_id,
            name=name,
            format=row.format,
            size=size,
            sha256=row.sha256,
            build_id=row.build_id,
            parent_id=row.id,
            kind="published",
            tags=tags,
        )
    except BaseException:
        delete(ref)  # an image provenance does not know is one nobody can trust
        raise
    progress(f"recorded {ref.image_id} on {ref.region} as the same bits as {row.image_id} (sha256 {row.sha256})")
    return Publication(
        source_image_id=row.image_id,
        source_row_id=row.id,
        cloud=ref.cloud,
        region=ref.region,
        image_id=ref.image_id,
        row_id=row_id,
        name=name,
        sha256=row.sha256,
        size=size,
        shared_with=shared_with,
    )


def done_with(cloud: Cloud) -> None:
    """Close what the cloud holds open (OpenStack's connection)."""
    if isinstance(cloud, HoldsConnection):
        cloud.close()


class _BuildLedger:
    """The publication's ledger: rows under the local image's build, released as the cloud releases them."""

    def __init__(self, build_id: str | None, cloud: Cloud) -> None:
        self.build_id, self.cloud = build_id, cloud

    def intent(self, kind: str, name: str) -> int | None:
        if self.build_id is None:  # an image recorded without a build: its strays are found by tag only
            return None
        return store.ledger_intent(self.build_id, cloud=self.cloud.name, kind=kind, name=name,
                                   region=self.cloud.region)  # fmt: skip

    def created(self, handle: int | None, cloud_id: str) -> None:
        if handle is not None:
            store.ledger_created(handle, cloud_id)

    def released(self, handle: int | None) -> None:
        if handle is not None:
            store.ledger_released(handle)
