"""Revocation: mark an image and its descendants in provenance, then flag them where users find images —
the cloud itself (EC2 deprecation, Glance deactivation, the local image's meta.json) and kiln's catalog entry.

A backend offers revocation through an optional method, `revoke_image(image: ImageRef, reason: str) -> None`
(or its own deactivate_image/deprecate_image(image_id)); one without any is reported, not failed.
Provenance is written first: it is what refuses a revoked base.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clouds import open_cloud
from clouds.base import ImageRef
from provenance import lineage, store
from provenance.redact import describe
from provenance.store import RevokedImage
from spec import settings
from spec.recipe import recorded_target


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
    """Ask the image's cloud to flag it revoked, when the backend can."""
    action = CloudAction(row.image_id, row.cloud, row.region, "skipped")
    if row.kind == "copy" and not _is_cloud_object(row):
        action.detail = "another file form of the same local image: flagged with it"
        return action
    if row.kind == "base" and not _is_cloud_object(row):
        action.detail = "a base file in kiln's cache, not a cloud image"
        return action
    try:
        cloud = _open_cloud_of(row)
    except Exception as exc:  # credentials or endpoint missing: provenance is revoked all the same
        action.outcome, action.detail = "failed", f"could not open {row.cloud}: {describe(exc)}"
        return action
    try:
        flag = _revocation_call(cloud, row)
        if flag is None:
            action.outcome = "unsupported"
            action.detail = f"the {row.cloud} backend offers no revocation; revoked in provenance only"
            return action
        flag()
    except Exception as exc:
        action.outcome, action.detail = "failed", describe(exc)
        return action
    finally:
        if callable(getattr(cloud, "close", None)):
            cloud.close()
    action.outcome = "flagged"
    if row.region:
        action.detail = f"on {row.region}"
    return action


def _revocation_call(cloud: Any, row: RevokedImage) -> Callable[[], None] | None:
    """The backend's way to flag an image: revoke_image(ImageRef, reason), else the cloud's own verb
    (Glance's deactivate_image(id), EC2's deprecate_image(id)); None when it has none."""
    if cloud is None:
        return None
    revoke_image = getattr(cloud, "revoke_image", None)
    if callable(revoke_image):
        ref = ImageRef(cloud=row.cloud, image_id=row.image_id, name=row.name, region=row.region)
        return lambda: revoke_image(ref, row.reason)
    for verb in ("deactivate_image", "deprecate_image"):
        method = getattr(cloud, verb, None)
        if callable(method):
            return lambda method=method: method(row.image_id)
    return None


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
    if row.cloud == "local":
        return row.image_id.startswith("img-") and "." not in row.image_id
    return not row.image_id.startswith("/")


def _open_cloud_of(row: RevokedImage) -> Any:
    """The backend that holds the image. An OpenStack image lives on the clouds.yaml entry its row's region
    names — a Glance copy published from a local build is not on the build's target; any other image is on
    its build's recipe target (opened with the target's name, which an OpenStack target without os_cloud uses
    as its entry), else a local image on the default local cloud."""
    target, target_name = _build_target(row)
    if row.cloud == "openstack":
        from clouds.openstack import OpenStackCloud

        if target is not None and target.cloud == "openstack" and target.effective_os_cloud(target_name) == row.region:
            return open_cloud(target, target_name=target_name)  # the target's own settings (flavor, share_with…)
        return OpenStackCloud(row.region)
    if target is not None and target.cloud == row.cloud:
        return open_cloud(target, target_name=target_name)
    if row.cloud == "local":
        from clouds.local import LocalCloud

        return LocalCloud()
    return None


def _build_target(row: RevokedImage) -> tuple[Any, str]:
    """The recipe target (and its name) of the build that made the image; (None, "") when there is none."""
    build = lineage.get_build(row.build_id) if row.build_id else None
    if build is None:
        return None, ""
    spec = json.loads(build.recipe.recipe_json).get("targets", {}).get(build.build.target)
    if spec is None:
        return None, ""
    return recorded_target(spec), build.build.target
