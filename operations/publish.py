"""Publish a locally built image to another cloud (OpenStack Glance, EC2) and record it as the same bits.

EGI's way: build once on the local cloud, then upload the very same file to every cloud, so the image on
each cloud is provably one file. The file is checked against its recorded sha256 before the upload (and on
OpenStack, Glance's own checksum and multihash against the file after it); the published row's parent is the
local image and its sha256 is the local file's. On EC2 the disk travels as raw through S3 and VM Import
(import_snapshot, register_image); the S3 object and the import task are ledgered under the image's build
before each call, so a killed publish leaves nothing `kiln gc` cannot find."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clouds import qemu
from clouds.base import TAG_ROLE, ImageRef
from clouds.ec2 import EC2Cloud, publish_disk
from clouds.openstack import FileDigests, OpenStackCloud
from provenance import lineage, store
from spec import settings

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
    _check_bits(image_id, row, path, progress)
    tags = {**json.loads(row.tags_json or "{}"), TAG_ROLE: "published"}
    published_name = name or row.name or image_id
    ref, uploaded = cloud.publish(path, published_name, tags=tags, properties={"kiln_source_image": image_id},
                                  disk_format=row.format, progress=progress)
    if uploaded.sha256 != row.sha256:  # the file changed between the check and the upload
        cloud.delete_image(ref)
        raise PublishRefused(f"{image_id}: {path} changed during the upload; nothing published")
    return _record(row, ref, published_name, tags, uploaded.size, cloud.delete_image, list(cloud.share_with),
                   progress)  # fmt: skip


def publish_image_to_ec2(
    image_id: str,
    cloud: EC2Cloud,
    *,
    bucket: str,
    name: str | None = None,
    progress: Callable[[str], None] = log.info,
) -> Publication:
    """Local image `image_id` as an AMI in cloud.region (S3 upload, VM Import, register_image), shared with
    cloud.share_with, recorded as a published sibling whose parent is the local row."""
    row = local_image_row(image_id)
    path = Path(row.path)
    _check_bits(image_id, row, path, progress)
    tags = {**json.loads(row.tags_json or "{}"), TAG_ROLE: "published"}
    published_name = name or row.name or image_id
    with _as_raw(path, row.format, progress) as raw:
        if row.format != "raw" and FileDigests.of(path).sha256 != row.sha256:
            raise PublishRefused(f"{image_id}: {path} changed while it was converted; nothing published")
        ref = publish_disk(cloud, raw, bucket=bucket, name=published_name, tags=tags, progress=progress,
                           ledger=_BuildLedger(row.build_id, cloud), timeout=cloud.image_timeout)  # fmt: skip
    try:
        cloud.share_image(ref, list(cloud.share_with))
    except BaseException:
        cloud.delete_image(ref)
        raise
    return _record(row, ref, published_name, tags, path.stat().st_size, cloud.delete_image, list(cloud.share_with),
                   progress)  # fmt: skip


def _check_bits(image_id: str, row: Any, path: Path, progress: Callable[[str], None]) -> None:
    progress(f"checking {path} against its recorded sha256")
    digests = FileDigests.of(path)
    if digests.sha256 != row.sha256:
        raise PublishRefused(f"{image_id}: {path} has sha256 {digests.sha256}, not the recorded {row.sha256}; "
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


@contextmanager
def _as_raw(path: Path, fmt: str, progress: Callable[[str], None]) -> Iterator[Path]:
    """The disk as a raw file (VM Import takes RAW, VMDK or VHD): the file itself, or a temporary conversion."""
    if fmt == "raw":
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="kiln-publish-", dir=settings.cache_dir()) as tmp:
        raw = Path(tmp) / f"{path.stem}.raw"
        progress(f"converting {path.name} ({fmt}) to raw for VM Import")
        qemu.run([qemu.QEMU_IMG, "convert", "-O", "raw", str(path), str(raw)], what="qemu-img convert to raw",
                 timeout=3600)  # fmt: skip
        yield raw


class _BuildLedger:
    """publish_disk's ledger: rows under the local image's build, released as publish_disk releases them."""

    def __init__(self, build_id: str | None, cloud: EC2Cloud) -> None:
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
