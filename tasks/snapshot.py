"""Stage 6: clean shutdown, then the cloud's image from the instance; the build instance is released at once."""

from __future__ import annotations

from clouds.base import ImageRef
from tasks.common import BuildPlan, StepLog, ledgered, stage
from tasks.launch import Guest, release_guest


def image_name(plan: BuildPlan) -> str:
    return f"{plan.recipe.name}-{plan.recipe.version}-{plan.short_id}"


@stage("snapshot")
def snapshot(plan: BuildPlan, guest: Guest, *, step_log: StepLog) -> ImageRef:
    if guest.session:
        guest.session.close()
        guest.session = None
    step_log(f"stopping {guest.instance.instance_id}")
    plan.cloud.stop(guest.instance, timeout=plan.recipe.timeouts.boot)
    formats = list(plan.recipe.outputs.formats)
    name = image_name(plan)
    with ledgered(plan, kind="image", name=name, role="image") as created:
        image = plan.cloud.snapshot(guest.instance, name, plan.tags, formats)
        created(image.image_id)
    for file in image.files:
        step_log(f"{file.format}: {file.path} {file.size} bytes sha256 {file.sha256}")
    step_log(f"image {image.image_id}")
    release_guest(plan, guest, step_log)
    return image
