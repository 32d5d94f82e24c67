"""Publish a locally built image to an OpenStack cloud's Glance and record it in provenance as the same bits.

EGI's way: build once on the local cloud, then upload the very same qcow2 to every cloud, so the image on
each cloud is provably one file. The file is checked against its recorded sha256 before the upload and
Glance's own checksum and multihash against the file after it; the published row's parent is the local
image and its sha256 is the local file's."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clouds.base import TAG_ROLE
from clouds.openstack import FileDigests, OpenStackCloud
from provenance import lineage, store

log = logging.getLogger("kiln.publish")
PUBLISHABLE_FORMATS = ("qcow2", "raw")


class PublishRefused(ValueError):
    """The image cannot be published as asked (unknown, revoked, missing file, bits changed): nothing uploaded."""


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


def local_image_row(image_id: str):  # noqa: ANN201 - a provenance.models.Image row
    """The provenance row of a local image kiln built (its primary file), or PublishRefused."""
    rows = [s.image for s in lineage.find_image(image_id) if s.image.cloud == "local" and s.image.image_id == image_id]
    if not rows:
        raise PublishRefused(f"{image_id}: no local image with this id in the provenance database (see `kiln images`)")
    row = rows[0]
    if row.status != "available":
        raise PublishRefused(f"{image_id} is {row.status}{f' ({row.revoked_reason})' if row.revoked_reason else ''}: "
                             "a revoked image is not published")
    if row.format not in PUBLISHABLE_FORMATS:
        formats = " or ".join(PUBLISHABLE_FORMATS)
        raise PublishRefused(f"{image_id} is a {row.format or 'cloud'} image; kiln publishes {formats} files")
    if not row.path or not Path(row.path).is_file():
        raise PublishRefused(f"{image_id}: its file {row.path or '(none recorded)'} is gone")
    return row


def publish_image(
    image_id: str,
    cloud: OpenStackCloud,
    *,
    name: str | None = None,
    progress: Callable[[str], None] = log.info,
) -> Publication:
    """Upload local image `image_id` to `cloud`'s Glance (sharing with cloud.share_with) and record the row."""
    row = local_image_row(image_id)
    path = Path(row.path)
    progress(f"checking {path} against its recorded sha256")
    digests = FileDigests.of(path)
    if digests.sha256 != row.sha256:
        raise PublishRefused(f"{image_id}: {path} has sha256 {digests.sha256}, not the recorded {row.sha256}; "
                             "the file changed since kiln built it")
    tags = {**json.loads(row.tags_json or "{}"), TAG_ROLE: "published"}
    published_name = name or row.name or image_id
    ref, uploaded = cloud.publish(path, published_name, tags=tags, properties={"kiln_source_image": image_id},
                                  disk_format=row.format, progress=progress)
    if uploaded.sha256 != row.sha256:  # the file changed between the check and the upload
        cloud.delete_image(ref)
        raise PublishRefused(f"{image_id}: {path} changed during the upload; nothing published")
    try:
        row_id = store.record_image(
            cloud=ref.cloud,
            region=ref.region,
            image_id=ref.image_id,
            name=published_name,
            format=row.format,
            size=uploaded.size,
            sha256=uploaded.sha256,
            build_id=row.build_id,
            parent_id=row.id,
            kind="published",
            tags=tags,
        )
    except BaseException:
        cloud.delete_image(ref)  # an image provenance does not know is one nobody can trust
        raise
    progress(f"recorded {ref.image_id} on {ref.region} as the same bits as {image_id} (sha256 {uploaded.sha256})")
    return Publication(
        source_image_id=image_id,
        source_row_id=row.id,
        cloud=ref.cloud,
        region=ref.region,
        image_id=ref.image_id,
        row_id=row_id,
        name=published_name,
        sha256=uploaded.sha256,
        size=uploaded.size,
        shared_with=list(cloud.share_with),
    )
