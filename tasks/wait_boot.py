"""Stage 3: wait until SSH authenticates with the build key and cloud-init is done; pin the host key."""

from __future__ import annotations

import time
from collections.abc import Callable

from clouds import ssh
from clouds.base import CloudError, Instance, OpensSessions, ShowsConsole
from provenance import store
from tasks.common import BuildPlan, StepLog, stage
from tasks.launch import Guest


def connect_when_booted(plan: BuildPlan, guest: Guest, step_log: StepLog) -> None:
    """Open guest.session once the guest answers; the host key must match what its console announced.
    A machine the cloud reaches without SSH (a container) gives its session once its systemd is up."""
    cloud, instance = plan.cloud, guest.instance
    if isinstance(cloud, OpensSessions):
        started = time.monotonic()
        session = cloud.open_session(instance, plan.recipe.timeouts.boot, step_log)
        if session is not None:
            guest.session = session
            step_log(f"{instance.instance_id} is up (its systemd reports the system running) after "
                     f"{time.monotonic() - started:.1f}s")  # fmt: skip
            return
    host, port = cloud.endpoint(instance, 22)
    shows_console = isinstance(cloud, ShowsConsole)
    console = held_console(plan, instance) if shows_console else lambda: ""
    step_log(f"waiting for SSH on {host}:{port} as {instance.ssh_user} (timeout {plan.recipe.timeouts.boot}s)")
    guest.session = ssh.wait_for_ssh(
        host,
        port,
        instance.ssh_user,
        guest.key,
        # The host key is pinned to what the console announces, when the cloud shows one.
        expected_host_keys_from=(lambda: ssh.host_key_fingerprints_from_console(console())) if shows_console else None,
        console=console,
        timeout=plan.recipe.timeouts.boot,
        console_poll_seconds=cloud.console_poll_seconds if shows_console else ssh.CONSOLE_POLL_SECONDS,
    )
    how = "pinned from the console" if shows_console else "recorded (this cloud shows no console to pin it from)"
    step_log(f"SSH up, host key {guest.session.host_key_fingerprint} {how}; cloud-init done")


@stage("wait_boot", retries=1, retry_delay_seconds=5)
def wait_boot(plan: BuildPlan, guest: Guest, *, step_log: StepLog) -> None:
    connect_when_booted(plan, guest, step_log)


LEDGER_CHECK_SECONDS = 5.0  # the console is read every 0.5 s on the local cloud: not a database query each time


def held_console(plan: BuildPlan, instance: Instance) -> Callable[[], str]:
    """Reads the console (of a cloud that ShowsConsole) while the build still holds the instance: once Ctrl-C (or
    anyone) released it, the wait ends within LEDGER_CHECK_SECONDS instead of polling a guest that is gone until the
    boot timeout."""
    checked_at = -LEDGER_CHECK_SECONDS

    def console() -> str:
        nonlocal checked_at
        if time.monotonic() - checked_at >= LEDGER_CHECK_SECONDS:
            if not any(row.cloud_id == instance.instance_id for row in store.open_resources(plan.build_id)):
                raise CloudError(f"instance {instance.instance_id} was released while waiting for it to boot")
            checked_at = time.monotonic()
        return plan.cloud.console(instance)

    return console
