"""Revocation: mark an image and its descendants in provenance, then flag them where users find images —
the cloud itself (EC2 deprecation, Glance deactivation, the local image's meta.json) and kiln's catalog entry.

A cloud flags images when it has the RevokesImages capability; one without it is reported, not failed.
Provenance is written first: it is what refuses a revoked base.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from clouds import registry
from clouds.base import Cloud, HoldsConnection, ImageRef, RevokesImages
from core import settings
from provenance import lineage, store
from provenance.redact import describe
from provenance.store import RevokedImage


@dataclass
class CloudAction:
    """What happened on a cloud for one revoked image."""

    image_id: str
    cloud: str
    region: str
    outcome: str  # flagged | unsupported | skipped | failed
    detail: str = ""


@dataclass
class Revocation:
    """A revocation's record: the rows whose status changed and what each cloud did."""

    image_id: str
    reason: str
    cascade: bool
    changed: list[RevokedImage] = field(default_factory=list)
    actions: list[CloudAction] = field(default_factory=list)

    @property
    def cloud_failures(self) -> list[CloudAction]:
        return [action for action in self.actions if action.outcome == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "reason": self.reason,
            "cascade": self.cascade,
            "changed": [row.__dict__ for row in self.changed],
            "cloud_actions": [action.__dict__ for action in self.actions],
        }


def revoke(image_id: str, reason: str, *, cascade: bool = False) -> Revocation:
    """Revoke the image kiln knows by this id or digest (lineage.UnknownImage if none), then act on the clouds."""
    subject = lineage.resolve_image(image_id)
    assert subject.id is not None
    result = Revocation(image_id=subject.image_id, reason=reason, cascade=cascade)
    result.changed = store.revoke_image(subject.id, reason, cascade=cascade)
    for row in result.changed:
        flag_catalog_entry(row)
        if row.status == "revoked":
            result.actions.append(act_on_cloud(row))
    return result


def act_on_cloud(row: RevokedImage) -> CloudAction:
    """Ask the image's cloud to flag it revoked, when the cloud can."""
    action = CloudAction(row.image_id, row.cloud, row.region, "skipped")
    if row.kind in ("copy", "base") and not _is_cloud_object(row):
        action.detail = ("another file form of the same local image: flagged with it" if row.kind == "copy"
                         else "a base file in kiln's cache, not a cloud image")  # fmt: skip
        return action
    try:
        cloud = _open_cloud_of(row)
    except Exception as exc:  # credentials or endpoint missing: provenance is revoked all the same
        action.outcome, action.detail = "failed", f"could not open {row.cloud}: {describe(exc)}"
        return action
    if cloud is None:
        action.outcome = "unsupported"
        action.detail = (f"no recorded target says how to reach {row.cloud} {row.region}".rstrip()
                         + "; revoked in provenance only")  # fmt: skip
        return action
    try:
        if not isinstance(cloud, RevokesImages):
            action.outcome = "unsupported"
            action.detail = f"the {row.cloud} cloud offers no revocation; revoked in provenance only"
            return action
        cloud.revoke_image(ImageRef(cloud=row.cloud, image_id=row.image_id, name=row.name, region=row.region),
                           row.reason)  # fmt: skip
    except Exception as exc:
        action.outcome, action.detail = "failed", describe(exc)
        return action
    finally:
        if isinstance(cloud, HoldsConnection):
            cloud.close()
    action.outcome = "flagged"
    if row.region:
        action.detail = f"on {row.region}"
    return action


def flag_catalog_entry(row: RevokedImage) -> None:
    """Mark kiln's catalog entry for the image (written by register), if it has one."""
    path = settings.data_dir() / "catalog" / f"{row.image_id}.json"
    if not path.is_file():
        return
    entry = json.loads(path.read_text())
    entry["status"] = row.status
    entry["revoked"] = {"reason": row.reason, "at": dt.datetime.now(dt.UTC).isoformat()}
    path.write_text(json.dumps(entry, indent=2) + "\n")


def _is_cloud_object(row: RevokedImage) -> bool:
    """A cloud image id (AMI, Glance uuid, img-…), not a file path or a file form like img-….raw."""
    return registry.backend(row.cloud).is_image_id(row.image_id)


def _open_cloud_of(row: RevokedImage) -> Cloud | None:
    """The cloud that holds the image: its build's recipe target when that reaches the image's place (a Glance
    copy published from a local build is on the clouds.yaml entry its row names, not on the build's target), else
    the cloud at that place alone."""
    build = lineage.get_build(row.build_id) if row.build_id else None
    target, target_name = None, ""
    if build is not None:
        target = json.loads(build.recipe.recipe_json or "{}").get("targets", {}).get(build.build.target)
        target_name = build.build.target
    return registry.reopen(row.cloud, target=target, target_name=target_name, region=row.region)
