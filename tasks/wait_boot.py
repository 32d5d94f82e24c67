"""Stage 3: wait until SSH authenticates with the build key and cloud-init is done; pin the host key."""

from __future__ import annotations

from clouds import ssh
from tasks.common import BuildPlan, StepLog, stage
from tasks.launch import Guest


def connect_when_booted(plan: BuildPlan, guest: Guest, step_log: StepLog) -> None:
    """Open guest.session once the guest answers; the host key must match what its console announced."""
    cloud, instance = plan.cloud, guest.instance
    host, port = cloud.endpoint(instance, 22)
    step_log(f"waiting for SSH on {host}:{port} as {instance.ssh_user} (timeout {plan.recipe.timeouts.boot}s)")
    guest.session = ssh.wait_for_ssh(
        host,
        port,
        instance.ssh_user,
        guest.key,
        expected_host_keys_from=lambda: ssh.host_key_fingerprints_from_console(cloud.console(instance)),
        console=lambda: cloud.console(instance),
        timeout=plan.recipe.timeouts.boot,
    )
    step_log(f"SSH up, host key {guest.session.host_key_fingerprint} pinned from the console; cloud-init done")


@stage("wait_boot", retries=1, retry_delay_seconds=5)
def wait_boot(plan: BuildPlan, guest: Guest, *, step_log: StepLog) -> None:
    connect_when_booted(plan, guest, step_log)
