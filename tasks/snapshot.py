"""Stage 6: clean shutdown, then the cloud's image from the instance; the build instance is released at once."""

from __future__ import annotations

import time

from clouds.base import CloudError, ImageRef, PowersOffFromInside
from tasks.common import BuildPlan, StepLog, ledgered, stage
from tasks.launch import Guest, release_guest


def image_name(plan: BuildPlan) -> str:
    return f"{plan.recipe.name}-{plan.recipe.version}-{plan.short_id}"


# systemd's forced power-off: no orderly stop of every service, but every process is killed and every filesystem
# unmounted or remounted read-only before the power goes (unlike --force --force), so ext4 is left clean.
# Detached and delayed a second so the SSH command returns before sshd is killed.
_GUEST_POWEROFF = (
    "command -v systemctl >/dev/null || exit 3; "
    "setsid -f sh -c 'sleep 1; systemctl poweroff --force' </dev/null >/dev/null 2>&1"
)


def power_off_from_inside(cloud: PowersOffFromInside, guest: Guest, step_log: StepLog) -> bool:
    """Ask the guest to power itself off now; False (and the cloud's own stop does it all) when it cannot."""
    try:
        guest.session.run(_GUEST_POWEROFF, timeout=30, label="systemctl poweroff --force")
    except CloudError as exc:
        step_log(f"guest power-off from inside not possible ({exc}); stopping through the cloud")
        return False
    step_log("guest powering off (systemctl poweroff --force: processes killed, filesystems read-only)")
    cloud.expect_power_off(guest.instance)  # stop() then waits for it before any power-down event
    return True


@stage("snapshot")
def snapshot(plan: BuildPlan, guest: Guest, *, step_log: StepLog) -> ImageRef:
    if guest.session:
        if isinstance(plan.cloud, PowersOffFromInside):
            power_off_from_inside(plan.cloud, guest, step_log)
        guest.session.close()
        guest.session = None
    step_log(f"stopping {guest.instance.instance_id}")
    stopped = plan.cloud.stop(guest.instance, timeout=plan.recipe.timeouts.boot)
    if stopped is not None:
        step_log(f"stopped in {stopped.seconds:.1f}s ({stopped.detail})")
    formats = list(plan.recipe.outputs.formats)
    name = image_name(plan)
    started = time.monotonic()
    with ledgered(plan, kind="image", name=name, role="image") as created:
        image = plan.cloud.snapshot(guest.instance, name, plan.tags, formats)
        created(image.image_id)
    step_log(f"image written in {time.monotonic() - started:.1f}s")
    for file in image.files:
        step_log(f"{file.format}: {file.path} {file.size} bytes sha256 {file.sha256}")
    step_log(f"image {image.image_id}")
    release_guest(plan, guest, step_log)
    return image
