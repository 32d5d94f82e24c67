"""Stage 2: a fresh ed25519 key, the cloud's firewall opening, cloud-init user-data, and the tagged instance
(on the local cloud with build_in container, a container on a working copy of the base)."""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from clouds.base import TAG_ROLE, BaseImage, Instance, KeyPair, OpensSessions
from clouds.session import Session
from core import settings
from provenance import store
from tasks.common import BuildPlan, StepLog, ledgered, release_open, stage


@dataclass
class Guest:
    """A launched instance with the key that reaches it and, after wait_boot, an open SSH session."""

    instance: Instance
    key: KeyPair = field(repr=False)
    role: str
    session: Session | None = field(default=None, repr=False)
    facts: dict[str, str] = field(default_factory=dict)  # read before sanitize: what the image must not keep


def user_data(ssh_user: str, key: KeyPair) -> str:
    """cloud-init user-data: the ssh user with only this key, passwordless sudo, no passwords anywhere."""
    config = {
        "users": [
            {
                "name": ssh_user,
                "groups": ["sudo"],
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "shell": "/bin/bash",
                "lock_passwd": True,
                "ssh_authorized_keys": [key.public_key],
            }
        ],
        "ssh_pwauth": False,
        "disable_root": True,
    }
    return "#cloud-config\n" + yaml.safe_dump(config, sort_keys=False)


def start_guest(plan: BuildPlan, base: BaseImage, role: str, step_log: StepLog) -> Guest:
    """Key, firewall and instance, each with its ledger row written before the cloud call.

    A failure part-way releases what this role already made, so a retry starts from nothing.
    """
    key = KeyPair.generate(f"kiln-{plan.short_id}-{role}")
    tags = {**plan.tags, TAG_ROLE: role}
    ports = sorted({22, *plan.recipe.probe_ports()})
    try:
        with ledgered(plan, kind="keypair", name=key.name, role=role) as created:
            key_id = plan.cloud.import_key(key, tags)
            if key_id:
                created(key_id)
        step_log(f"{role} key {key.fingerprint}")
        name = f"kiln-{plan.short_id}-{role}"
        with ledgered(plan, kind="security-group", name=name, role=role) as created:
            firewall = plan.cloud.open_ports(name, ports, tags)
            if firewall:
                created(firewall)
                step_log(f"firewall {firewall} opens ports {ports}")
        with ledgered(plan, kind="instance", name=name, role=role) as created:
            instance = plan.cloud.launch(
                base, key, user_data(base.ssh_user, key), tags, ports, role=role, firewall=firewall
            )
            created(instance.instance_id)
    except BaseException:
        release_open(plan, role=role)
        raise
    step_log(f"{role} instance {instance.instance_id} started from {base.image_id}")
    guest = Guest(instance=instance, key=key, role=role)
    plan.guests.append(guest)
    return guest


def release_guest(plan: BuildPlan, guest: Guest, step_log: StepLog) -> None:
    """Close the session and release this guest's instance, firewall and key now rather than at the end."""
    if guest.session:
        guest.session.close()
        guest.session = None
    errors = release_open(plan, role=guest.role)
    if errors:
        raise RuntimeError(f"could not release the {guest.role} guest: " + "; ".join(errors))
    step_log(f"{guest.role} instance {guest.instance.instance_id} terminated")


def keep_for_debugging(plan: BuildPlan) -> list[str]:
    """--on-error abort: write each kept guest's key (0600, beside kiln's data) and say how to reach it."""
    kept = {row.cloud_id for row in store.open_resources(plan.build_id) if row.kind == "instance"}
    notes = []
    for guest in plan.guests:
        if guest.instance.instance_id not in kept:
            continue
        if isinstance(plan.cloud, OpensSessions) and (hint := plan.cloud.access_hint(guest.instance)):
            notes.append(hint)
            continue
        key_file = settings.data_dir() / "debug" / plan.build_id / f"{guest.role}_ed25519"
        key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_file.touch(mode=0o600)
        key_file.write_text(guest.key.private_key)
        host, port = plan.cloud.endpoint(guest.instance, 22)
        notes.append(
            f"{guest.role} guest {guest.instance.instance_id} kept: "
            f"ssh -i {key_file} -p {port} -o StrictHostKeyChecking=no {guest.instance.ssh_user}@{host}"
        )
    if notes:
        notes.append(f"clean up with: kiln cleanup {plan.build_id}")
    return notes


@stage("launch", retries=2, retry_delay_seconds=10)
def launch(plan: BuildPlan, base: BaseImage, *, step_log: StepLog) -> Guest:
    guest = start_guest(plan, base, "build", step_log)
    plan.build_key = guest.key  # verify proves this key no longer opens the image
    return guest
