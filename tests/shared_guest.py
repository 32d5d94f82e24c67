"""Test-only seam for the scale-out test: EC2 (moto) instances whose SSH side is ONE pre-booted local QEMU guest.

moto boots nothing. Booting a QEMU guest per EC2 instance costs about a minute under TCG each, too much for CI
with several builds, so every instance moto launches is mapped onto one guest the test booted beforehand:
launch installs the new instance's key as the ssh user's only key (through a separate admin user that
sanitize does not touch), endpoint and console are the shared guest's, stop/snapshot/terminate happen in moto
only. Builds on it must take turns (the test sets kiln-vms-ec2-us-east-1 to 1), and their recipe keeps the host
keys and cloud-init state (sanitize disables ssh-hostkeys and cloud-init-state) so the guest stays reachable.
Everything kiln sends to EC2 still goes to moto; customize, sanitize and verify run for real over SSH.

The worker processes load this through tests/scale/entry.py, the deployment's entrypoint; the guest is
described by the JSON file KILN_TEST_SHARED_GUEST names.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

import flows.build
from clouds import open_cloud as real_open_cloud
from clouds import ssh
from clouds.base import Instance, KeyPair, StopResult
from clouds.ec2 import EC2Cloud

ENV = "KILN_TEST_SHARED_GUEST"
ADMIN = "kilnadmin"


@dataclass(frozen=True)
class SharedGuest:
    """How to reach the pre-booted guest: SSH forward, serial console file, the admin user's key."""

    host: str
    ports: dict[str, int]  # guest port -> 127.0.0.1 port
    console_path: str
    admin_public: str
    admin_private: str

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))
        path.chmod(0o600)

    @classmethod
    def load(cls, path: str) -> SharedGuest:
        return cls(**json.loads(Path(path).read_text()))

    @property
    def admin_key(self) -> KeyPair:
        return KeyPair(name="kiln-test-admin", public_key=self.admin_public, private_key=self.admin_private)

    def console(self) -> str:
        return Path(self.console_path).read_text(errors="replace")

    def admin_run(self, command: str) -> None:
        """Run a root command as the admin user, pinning the host key its console announced."""
        pinned = ssh.host_key_fingerprints_from_console(self.console())
        with ssh.connect(self.host, self.ports["22"], ADMIN, self.admin_key, expected_host_keys=pinned) as session:
            session.run(command, sudo=True, timeout=120)


class SharedGuestEC2(EC2Cloud):
    """EC2Cloud on moto whose every instance is played by the one shared guest."""

    guest: SharedGuest

    def launch(self, base, key, user_data, tags, ports, *, role="build", firewall=None) -> Instance:  # noqa: ANN001
        instance = super().launch(base, key, user_data, tags, ports, role=role, firewall=firewall)
        user = shlex.quote(base.ssh_user)
        try:
            self.guest.admin_run(
                f"install -d -m 700 -o {user} -g {user} ~{user}/.ssh && "
                f"printf '%s\\n' {shlex.quote(key.public_key)} > ~{user}/.ssh/authorized_keys && "
                f"chown {user}:{user} ~{user}/.ssh/authorized_keys && chmod 600 ~{user}/.ssh/authorized_keys"
            )
        except BaseException:
            super().terminate(instance)
            raise
        return instance

    def endpoint(self, instance: Instance, port: int) -> tuple[str, int]:
        return self.guest.host, self.guest.ports[str(port)]

    def console(self, instance: Instance) -> str:
        return self.guest.console()

    def stop(self, instance: Instance, timeout: float = 120) -> StopResult:
        result = super().stop(instance, timeout)  # the shared guest keeps running for the next build
        return StopResult(forced=result.forced, seconds=result.seconds, detail="stopped in moto; the guest is shared")


def open_cloud(target, timeouts=None, **kwargs):  # noqa: ANN001, ANN003, ANN201 - stands in for clouds.open_cloud
    """ec2 targets get a SharedGuestEC2; every other cloud opens as usual."""
    if target.cloud != "ec2":
        return real_open_cloud(target, timeouts, **kwargs)
    cloud = SharedGuestEC2.from_target(target, timeouts)
    cloud.guest = SharedGuest.load(os.environ[ENV])
    cloud.poll_seconds = 0.2
    return cloud


def install() -> None:
    """Route flows.build's clouds through the seam when this process was given a shared guest."""
    if os.environ.get(ENV):
        flows.build.open_cloud = open_cloud
