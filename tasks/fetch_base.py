"""Stage 1: resolve the recipe's base for this cloud and record it (id and digest) as the build's parent image."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from clouds.base import BaseImage
from provenance import lineage, store
from provenance.models import Image
from tasks.common import BuildPlan, StepLog, stage


class RevokedBaseError(RuntimeError):
    """The base image was revoked in provenance; building on it would propagate the problem."""


@dataclass(frozen=True)
class ResolvedBase:
    image: BaseImage
    row_id: int  # the base's Image row: the parent of what this build makes

    @property
    def image_id(self) -> str:
        """The base's id in provenance, the same on every host (a local disk: its content, not its path)."""
        return self.image.provenance_id


@stage("fetch_base")
def fetch_base(plan: BuildPlan, *, step_log: StepLog) -> ResolvedBase:
    target = plan.target
    step_log(f"resolving base ({target.base.kind}) for target {plan.target_name} on {plan.cloud.name}")
    spec = target.base
    if spec.file is not None:  # recipe-relative, like every path in a recipe
        spec = spec.model_copy(update={"file": str(plan.recipe.resolve(spec.file))})
    base = plan.cloud.resolve_base(spec, target.ssh_user)
    step_log(f"base {base.provenance_id} digest {base.digest}"
             + (f" at {base.details['path']}" if base.details.get("path") else ""))
    row_id = _base_row(base)
    store.mark_expired_images(row_id=row_id)
    row = lineage.image_row(row_id)
    if row.status in ("revoked", "parent-revoked"):
        raise RevokedBaseError(
            f"base {base.provenance_id} is {row.status} in provenance: choose another base for target "
            f"{plan.target_name}"
        )
    if row.status == "expired":
        warn_expired_base(plan, row, step_log)
    plan.base_digest = base.digest
    return ResolvedBase(image=base, row_id=row_id)


def warn_expired_base(plan: BuildPlan, row: Image, step_log: StepLog) -> None:
    """An expired base still builds (unlike a revoked one), but the build says so, in its log and Prefect's."""
    until = row.valid_until.isoformat(timespec="seconds") if row.valid_until else "an earlier date"
    message = (f"warning: base {row.image_id} expired on {until} (its recipe's valid_for): rebuild it, or "
               f"choose a newer base for target {plan.target_name}")
    step_log(message)
    with contextlib.suppress(MissingContextError):  # no Prefect run: the step log is all there is
        get_run_logger().warning("%s", message)


def _base_row(base: BaseImage) -> int:
    """A base kiln built itself keeps its own row, so lineage runs through it; any other base gets one, under its
    host-independent id, which every host sharing the database finds."""
    known = lineage.find_image_row(base.cloud, base.provenance_id, base.region)
    if known is not None:
        return known
    return store.record_image(
        cloud=base.cloud,
        region=base.region,
        image_id=base.provenance_id,
        name=base.name,
        sha256=base.digest,
        path=str(base.details.get("path", "")),
        size=base.details.get("size"),
        format=base.details.get("format", ""),
        kind="base",
    )
