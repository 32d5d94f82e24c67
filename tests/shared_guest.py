"""Test-only seam: cloud instances (EC2 on moto, OpenStack on the fake Nova) whose SSH side is ONE pre-booted
local QEMU guest.

moto and the fake Nova boot nothing. Booting a QEMU guest per instance costs about a minute under TCG each, too
much for CI with several builds, so every instance such a cloud launches is played by one guest the test booted
beforehand: launch installs the new instance's key as the ssh user's only key (through a separate admin user that
sanitize does not touch), endpoint and console are the shared guest's; releasing the instance removes that key
and ends the user's sessions (a build that lost its instance stops, as on a real cloud); stop, snapshot and
terminate happen in the cloud's books only. Builds on it must take turns, and their recipe keeps the host keys
and cloud-init state (sanitize disables ssh-hostkeys and cloud-init-state, so the image audit does not check
them) so the guest stays reachable. Everything kiln sends to the cloud still goes to moto or the fake; customize,
sanitize and verify run for real over SSH.

A process uses the seam when KILN_TEST_SHARED_GUEST names the guest's JSON description: the scale-out test's
workers through tests/scale/entry.py (install), the fault tests' `kiln build` subprocesses through
tests/faults/plugin/sitecustomize.py (route). `booted` boots the guest for a test.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from clouds import ssh
from clouds.base import BaseImage, Instance, KeyPair, Resource

ENV = "KILN_TEST_SHARED_GUEST"
ADMIN = "kilnadmin"
PLAYED = ("ec2", "openstack")  # the clouds whose instances the guest plays; local guests boot for real


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

    def authorize(self, user: str, key: KeyPair) -> None:
        """The new instance's key becomes `user`'s only key, as cloud-init does at an instance's first boot."""
        user = shlex.quote(user)
        self.admin_run(
            f"install -d -m 700 -o {user} -g {user} ~{user}/.ssh && "
            f"printf '%s\\n' {shlex.quote(key.public_key)} > ~{user}/.ssh/authorized_keys && "
            f"chown {user}:{user} ~{user}/.ssh/authorized_keys && chmod 600 ~{user}/.ssh/authorized_keys"
        )

    def evict(self, user: str) -> None:
        """The instance is gone: its key no longer opens the guest, and its SSH sessions end (as a terminated
        machine's would), so a build that lost its instance cannot carry on over SSH."""
        user = shlex.quote(user)
        self.admin_run(f"rm -f ~{user}/.ssh/authorized_keys; pkill -KILL -u {user}; true")


def play(cloud: Any, guest: SharedGuest) -> Any:
    """Make every instance `cloud` launches the shared guest: launch authorizes the instance's key there (and
    terminates the instance if that fails), releasing the instance evicts it, endpoint and console are the
    guest's. Returns the cloud."""
    launch, release, terminate = cloud.launch, cloud.release, cloud.terminate
    users: dict[str, str] = {}  # instance id -> its ssh user on the guest

    def launched(base: BaseImage, key: KeyPair, *args: Any, **kwargs: Any) -> Instance:
        instance = launch(base, key, *args, **kwargs)
        try:
            guest.authorize(base.ssh_user, key)
        except BaseException:
            terminate(instance)
            raise
        users[instance.instance_id] = base.ssh_user
        return instance

    def released(resource: Resource) -> None:
        release(resource)
        if resource.kind == "instance" and resource.resource_id in users:
            guest.evict(users.pop(resource.resource_id))

    def terminated(instance: Instance) -> None:
        terminate(instance)
        if instance.instance_id in users:
            guest.evict(users.pop(instance.instance_id))

    cloud.launch, cloud.release, cloud.terminate = launched, released, terminated
    cloud.endpoint = lambda instance, port: (guest.host, guest.ports[str(port)])
    cloud.console = lambda instance: guest.console()
    if hasattr(cloud, "poll_seconds"):
        cloud.poll_seconds = 0.2  # moto answers at once: no need to wait EC2's poll interval
    return cloud


def route(open_cloud: Callable[..., Any]) -> Callable[..., Any]:
    """An open_cloud whose ec2 and openstack clouds are played by the guest KILN_TEST_SHARED_GUEST describes."""

    def opened(target: Any, *args: Any, **kwargs: Any) -> Any:
        cloud = open_cloud(target, *args, **kwargs)
        if target.cloud in PLAYED:
            play(cloud, SharedGuest.load(os.environ[ENV]))
        return cloud

    return opened


def install() -> None:
    """Route flows.build's clouds through the seam when this process was given a shared guest."""
    if os.environ.get(ENV):
        import flows.build

        flows.build.open_cloud = route(flows.build.open_cloud)


@contextmanager
def booted(cloud: Any, base: BaseImage, workdir: Path) -> Iterator[Path]:
    """Boot the guest on the local cloud with an admin user sanitize leaves alone; yields its JSON description
    (for KILN_TEST_SHARED_GUEST) and terminates it afterwards."""
    admin = KeyPair.generate("kiln-test-admin")
    users = [
        {"name": "debian", "shell": "/bin/bash", "lock_passwd": True, "sudo": "ALL=(ALL) NOPASSWD:ALL"},
        {"name": ADMIN, "shell": "/bin/bash", "lock_passwd": True, "sudo": "ALL=(ALL) NOPASSWD:ALL",
         "ssh_authorized_keys": [admin.public_key]},
    ]  # fmt: skip
    user_data = "#cloud-config\n" + yaml.safe_dump({"users": users, "ssh_pwauth": False}, sort_keys=False)
    instance = cloud.launch(base, admin, user_data, {"kiln:role": "shared-test-guest"}, [22])
    try:
        host, port = cloud.endpoint(instance, 22)
        session = ssh.wait_for_ssh(
            host, port, ADMIN, admin,
            expected_host_keys_from=lambda: ssh.host_key_fingerprints_from_console(cloud.console(instance)),
            console=lambda: cloud.console(instance), timeout=600,
        )  # fmt: skip
        session.close()
        description = workdir / "shared-guest.json"
        console = instance.details.get("console") or str(cloud.state_dir / instance.instance_id / "console.log")
        SharedGuest(host, {"22": port}, console, admin.public_key, admin.private_key).save(description)
        yield description
    finally:
        cloud.terminate(instance)
