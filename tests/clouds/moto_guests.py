"""moto's EC2 whose instances really boot: each running moto instance is played by a local QEMU guest.

moto keeps EC2's books (instances, key pairs, security groups, AMIs, snapshots, copies, permissions) but boots
nothing. This harness runs moto's server on 127.0.0.1 and a watcher that gives every instance moto starts a body:

- a VPC 127.77.0.0/16 with a subnet 127.77.1.0/24, so moto hands out private addresses on the loopback network;
  a target with `subnet_id` and `ssh_interface: private` makes kiln connect to 127.77.1.x:22, as it would to a
  real instance's private address from inside its VPC;
- for each running instance a QEMU guest (kiln's debian-bookworm bootstrap base, or the bits of the AMI it was
  launched from) seeded with the instance's own user-data (describe_instance_attribute), and a TCP forward from
  the instance's private address to the guest for every port its security groups open, admitting only the
  groups' source CIDRs;
- EC2's console output (get_console_output) is the guest's serial console, so the host key is pinned from it;
- stop_instances leaves the instance `stopping` until the guest has powered off (ACPI), then `stopped`, as EC2
  does; a create_image from it (its snapshot says "Created by CreateImage(i-…)") copies the guest's disk, so an
  instance launched from that AMI boots those bits; a terminated instance's guest is killed, a deregistered
  AMI's disk deleted.

Nothing of this is in kiln's code: kiln talks to moto's endpoint exactly as to AWS.

    python -m tests.clouds.moto_guests serve --port 5055 --recipe-dir /tmp/kiln-ec2-demo
    python -m tests.clouds.moto_guests report --endpoint http://127.0.0.1:5055

`serve` writes a git-committed recipe (hello-ec2.yaml: the moto endpoint, the subnet, a copy to eu-west-1) into
--recipe-dir and runs until SIGINT/SIGTERM, then kills every guest and removes every disk it made.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ipaddress
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

from clouds.base import TAG_BUILD, BaseImage, ImageRef, Instance, KeyPair
from clouds.local import LocalCloud
from core.recipe import BaseSpec

log = logging.getLogger("moto_guests")

HOME, OTHER = "us-east-1", "eu-west-1"
VPC_CIDR, SUBNET_CIDR = "127.77.0.0/16", "127.77.1.0/24"
SSM_AL2023 = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
CREATED_BY = re.compile(r"Created by CreateImage\((i-[0-9a-f]+)\) for (ami-[0-9a-f]+)")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": HOME}
REPO = Path(__file__).resolve().parents[2]
ACCOUNT = "123456789012"  # moto's default account: the one this harness's credentials act as


def aws_environment(config_dir: Path) -> dict[str, str]:
    """Dummy credentials and empty AWS config files: never the user's real AWS account."""
    return {
        **CREDENTIALS,
        "AWS_CONFIG_FILE": str(config_dir / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(config_dir / "credentials"),
        "MOTO_ENABLE_KEYPAIR_VALIDATION": "true",
        "MOTO_ENABLE_AMI_VALIDATION": "true",
    }


# -- moto: console output from the guest, stop that waits for the guest -------------------------------------


class _Bodies:
    """What moto's patched handlers need to know: which instances have a guest, and their consoles."""

    def __init__(self) -> None:
        self.consoles: dict[str, Path] = {}  # instance id -> the guest's serial console file
        self.stopping: set[str] = set()  # instances stop_instances was called on, guest not yet off
        self.lock = threading.Lock()


BODIES = _Bodies()
_patched = False


def patch_moto() -> None:
    """Make moto's console output the guest's, and its stop a real one (stopping until the guest is off)."""
    global _patched
    if _patched:
        return
    from moto.core.responses import ActionResult
    from moto.core.utils import utcnow
    from moto.ec2.models.instances import Instance as MotoInstance
    from moto.ec2.responses.general import General
    from moto.ec2.utils import Base64EncodedString

    original_console, original_stop = General.get_console_output, MotoInstance.stop

    def get_console_output(self: Any) -> Any:
        instance_id = self._get_param("InstanceId")
        with BODIES.lock:
            console = BODIES.consoles.get(instance_id)
        if console is None:
            return original_console(self)
        self.ec2_backend.get_instance(instance_id)  # unknown ids fail as EC2 fails them
        text = console.read_text(errors="replace") if console.is_file() else ""
        output = Base64EncodedString.from_raw_string(text)
        return ActionResult({"InstanceId": instance_id, "Timestamp": utcnow(), "Output": output})

    def stop(self: Any) -> Any:
        previous = original_stop(self)
        with BODIES.lock:
            if self.id in BODIES.consoles:
                BODIES.stopping.add(self.id)
                self._state.name, self._state.code = "stopping", 64
        return previous

    General.get_console_output = get_console_output
    MotoInstance.stop = stop
    _patched = True


def finish_stop(region: str, instance_id: str) -> None:
    """The guest is off: moto's instance becomes `stopped`."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    instance = ec2_backends[DEFAULT_ACCOUNT_ID][region].get_instance(instance_id)
    with BODIES.lock:
        BODIES.stopping.discard(instance_id)
        if instance._state.name == "stopping":
            instance._state.name, instance._state.code = "stopped", 80


# -- TCP forwards from an instance's private address to its guest ---------------------------------------------


class Forward:
    """Listen on (address, port); pipe each admitted connection to the guest's 127.0.0.1 forward."""

    def __init__(self, address: str, port: int, target: tuple[str, int], admit: list[str]) -> None:
        self.target = target
        self.admit = [ipaddress.ip_network(cidr) for cidr in admit]
        self.server = socket.create_server((address, port), reuse_port=False)
        self.server.settimeout(0.5)
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._accept, name=f"forward-{address}:{port}", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, peer = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not any(ipaddress.ip_address(peer[0]) in network for network in self.admit):
                log.info("refused %s: not in the security group's %s", peer[0], [str(n) for n in self.admit])
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()  # the guest's sshd is not up yet: a refused connection, as from a booting machine
            return
        sockets = [client, upstream]
        try:
            while not self.closed.is_set():
                readable, _, _ = select.select(sockets, [], [], 0.5)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            return
        finally:
            for sock in sockets:
                sock.close()

    def close(self) -> None:
        """Stop listening at once (the address may be handed to the next instance) and end the pipes."""
        self.closed.set()
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept() in the other thread
        self.thread.join(timeout=5)
        self.server.close()


# -- the watcher ------------------------------------------------------------------------------------------


@dataclass
class Body:
    """The QEMU guest playing one moto instance, and the forwards to it."""

    guest: Instance
    region: str
    forwards: list[Forward] = field(default_factory=list)


class MotoGuests:
    """moto's server plus the watcher that boots, stops, snapshots and kills a guest for every instance."""

    def __init__(self, workdir: Path, port: int = 0, *, memory_mb: int = 1024, poll_seconds: float = 0.5) -> None:
        self.workdir = Path(workdir)
        self.port = port
        self.poll_seconds = poll_seconds
        self.local = LocalCloud(
            state_dir=self.workdir / "guests", images_dir=self.workdir / "disks", memory_mb=memory_mb
        )
        self.bodies: dict[str, Body] = {}  # instance id -> body
        self.disks: dict[str, ImageRef] = {}  # AMI id -> local image holding its bits
        self.failed: dict[str, str] = {}  # instance id -> why it got no body
        self.bodiless: set[str] = set()  # AMIs seen that no guest's disk backs (copies, imports)
        self._clients: dict[tuple[str, str], Any] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base: BaseImage | None = None
        self.server: Any = None
        self.endpoint = ""
        self.subnet_id = ""

    # lifecycle

    def start(self) -> MotoGuests:
        from moto import settings
        from moto.server import ThreadedMotoServer

        settings.ENABLE_KEYPAIR_VALIDATION = True  # moto reads the variables at import, which may be done already
        settings.ENABLE_AMI_VALIDATION = True
        patch_moto()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port or _free_port(), verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.server._port}"
        # moto's backends are global to the process: another moto server here (the EC2 API tests') shares them.
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST"), timeout=30)
        ec2 = self.client(HOME)
        vpc = ec2.create_vpc(CidrBlock=VPC_CIDR)["Vpc"]["VpcId"]
        self.subnet_id = ec2.create_subnet(VpcId=vpc, CidrBlock=SUBNET_CIDR)["Subnet"]["SubnetId"]
        self._thread = threading.Thread(target=self._watch, name="moto-guests", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Kill every guest, remove every disk, stop moto."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        for instance_id in list(self.bodies):
            self._kill(instance_id)
        for ami in list(self.disks):
            self.local.delete_image(self.disks.pop(ami))
        if self.server is not None:
            self.server.stop()

    def __enter__(self) -> MotoGuests:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def client(self, region: str, service: str = "ec2") -> Any:
        if (region, service) not in self._clients:
            session = boto3.session.Session(region_name=region)
            self._clients[region, service] = session.client(service, endpoint_url=self.endpoint)
        return self._clients[region, service]

    def base(self) -> BaseImage:
        if self._base is None:
            self._base = self.local.resolve_base(BaseSpec(bootstrap="debian-bookworm"), "debian")
        return self._base

    # the loop

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync(HOME)
            except Exception as exc:  # noqa: BLE001 - keep watching; the error is reported
                log.exception("moto guests: %s", exc)
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.poll_seconds)

    def sync(self, region: str) -> None:
        """One pass: new AMIs get their source guest's disk, then instances get, stop or lose their guest."""
        ec2 = self.client(region)
        instances = [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]
        images = {image["ImageId"]: image for image in ec2.describe_images(Owners=["self"])["Images"]}
        for ami, image in images.items():
            if ami not in self.disks and ami not in self.bodiless:
                self._take_disk(ec2, image)
        for ami in [ami for ami in self.disks if ami not in images]:
            self.local.delete_image(self.disks.pop(ami))
            log.info("%s deregistered: its disk is deleted", ami)
        for described in instances:
            instance_id, state = described["InstanceId"], described["State"]["Name"]
            if state in ("pending", "running") and instance_id not in self.bodies and instance_id not in self.failed:
                self._give_body(ec2, region, described)
            elif state == "stopping" and instance_id in self.bodies:
                self._power_off(region, instance_id)
            elif state in ("shutting-down", "terminated") and instance_id in self.bodies:
                self._kill(instance_id)

    def _take_disk(self, ec2: Any, image: dict[str, Any]) -> None:
        """A new AMI made by create_image from an instance with a guest: that guest's disk, as it is now."""
        snapshot_ids = [m["Ebs"]["SnapshotId"] for m in image.get("BlockDeviceMappings", []) if "Ebs" in m]
        snapshots = ec2.describe_snapshots(SnapshotIds=snapshot_ids)["Snapshots"] if snapshot_ids else []
        sources = [m.group(1) for s in snapshots if (m := CREATED_BY.search(s.get("Description", "")))]
        body = next((self.bodies[i] for i in sources if i in self.bodies), None)
        if body is None:
            self.bodiless.add(image["ImageId"])  # a copy, an import or someone else's: no guest disk to take
            return
        self.local.stop(body.guest, timeout=300)  # create_image without NoReboot would reboot; kiln stops first
        self.disks[image["ImageId"]] = self.local.snapshot(body.guest, image.get("Name", image["ImageId"]), {}, [])
        log.info("%s: the disk of %s's guest", image["ImageId"], sources[0])

    def _give_body(self, ec2: Any, region: str, described: dict[str, Any]) -> None:
        instance_id = described["InstanceId"]
        address = described.get("PrivateIpAddress", "")
        if not ipaddress.ip_address(address or "0.0.0.0").is_loopback:
            self.failed[instance_id] = f"private address {address!r} is not on loopback (launch it in the subnet)"
            log.warning("%s gets no guest: %s", instance_id, self.failed[instance_id])
            return
        ami = described["ImageId"]
        owned = ec2.describe_images(ImageIds=[ami])["Images"][0].get("OwnerId") == ACCOUNT
        if owned and ami not in self.disks:
            self.failed[instance_id] = f"{ami} is one of this account's AMIs but no guest disk backs it"
            log.warning("%s gets no guest: %s", instance_id, self.failed[instance_id])
            return
        base = self.local.resolve_base(BaseSpec(image=self.disks[ami].image_id), "debian") if owned else self.base()
        user_data = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        text = base64.b64decode(user_data.get("UserData", {}).get("Value", "")).decode()
        rules = self._ingress(ec2, described)
        key = KeyPair(name=described.get("KeyName", ""), public_key="", private_key="")
        tags = {t["Key"]: t["Value"] for t in described.get("Tags", []) if t["Key"] == TAG_BUILD}
        guest = self.local.launch(base, key, text, tags, sorted(rules), role=f"moto-{instance_id}")
        body = Body(guest=guest, region=region)
        with BODIES.lock:
            BODIES.consoles[instance_id] = Path(guest.details["console"])
        self.bodies[instance_id] = body
        for port, cidrs in sorted(rules.items()):
            body.forwards.append(Forward(address, port, self.local.endpoint(guest, port), cidrs))
        log.info("%s (%s) is guest %s at %s, ports %s", instance_id, ami, guest.instance_id, address, sorted(rules))

    def _ingress(self, ec2: Any, described: dict[str, Any]) -> dict[int, list[str]]:
        """TCP ports the instance's security groups open, each with the CIDRs admitted."""
        groups = [*described.get("SecurityGroups", [])]  # moto lists a subnet launch's groups on its interface only
        groups += [g for nic in described.get("NetworkInterfaces", []) for g in nic.get("Groups", [])]
        group_ids = list(dict.fromkeys(g["GroupId"] for g in groups))
        rules: dict[int, list[str]] = {}
        for group in ec2.describe_security_groups(GroupIds=group_ids)["SecurityGroups"] if group_ids else []:
            for permission in group.get("IpPermissions", []):
                if permission.get("IpProtocol") not in ("tcp", "-1") or "FromPort" not in permission:
                    continue
                for port in range(permission["FromPort"], permission["ToPort"] + 1):
                    rules.setdefault(port, []).extend(r["CidrIp"] for r in permission.get("IpRanges", []))
        return rules

    def _power_off(self, region: str, instance_id: str) -> None:
        result = self.local.stop(self.bodies[instance_id].guest, timeout=300)
        finish_stop(region, instance_id)
        log.info("%s stopped (%s)", instance_id, result.detail)

    def _kill(self, instance_id: str) -> None:
        body = self.bodies.pop(instance_id)
        for forward in body.forwards:
            forward.close()
        self.local.terminate(body.guest)
        with BODIES.lock:
            BODIES.consoles.pop(instance_id, None)
            BODIES.stopping.discard(instance_id)
        log.info("%s terminated: its guest is gone", instance_id)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the demo recipe and the report -----------------------------------------------------------------------


def write_recipe(directory: Path, endpoint: str, subnet_id: str, script: str | None = None) -> Path:
    """A committed recipe building hello on the moto endpoint's subnet, copied to eu-west-1."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "scripts").mkdir(exist_ok=True)
    hello = script if script is not None else (REPO / "recipes/scripts/hello.sh").read_text()
    (directory / "scripts/setup.sh").write_text(hello)
    recipe = directory / "hello-ec2.yaml"
    recipe.write_text(
        f"""name: hello-ec2
version: 1.0.0
description: hello, built on moto's EC2 (each instance a local QEMU guest)
targets:
  ec2:
    region: {HOME}
    endpoint_url: {endpoint}
    base: {{ssm_parameter: {SSM_AL2023}}}
    ssh_user: debian
    subnet_id: {subnet_id}
    ssh_interface: private
    ssh_cidr: 127.0.0.0/8
    regions: [{OTHER}]
    share_with: ["111122223333"]
scripts: [scripts/setup.sh]
sanitize: {{disable: [zero-free-space]}}
verify:
  - command: {{run: cat /etc/kiln-hello, expect: hello from kiln}}
  - port: {{port: 22}}
"""
    )
    git = ["git", "-C", str(directory), "-c", "user.name=kiln demo", "-c", "user.email=demo@kiln.invalid"]
    if not (directory / ".git").exists():
        subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "hello-ec2 on moto"], check=True)
    return recipe


def report(endpoint: str, regions: tuple[str, ...] = (HOME, OTHER)) -> dict[str, Any]:
    """What the account holds, per region: AMIs (tags, launch permissions), and every other kind, counted."""
    found: dict[str, Any] = {}
    for region in regions:
        ec2 = boto3.session.Session(region_name=region).client("ec2", endpoint_url=endpoint)
        instances = [
            i["InstanceId"]
            for r in ec2.describe_instances()["Reservations"]
            for i in r["Instances"]
            if i["State"]["Name"] != "terminated"
        ]
        groups = [g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"] if g["GroupName"] != "default"]
        amis = []
        for image in ec2.describe_images(Owners=["self"])["Images"]:
            permissions = ec2.describe_image_attribute(ImageId=image["ImageId"], Attribute="launchPermission")
            amis.append({
                "id": image["ImageId"], "name": image.get("Name"), "state": image["State"],
                "tags": {t["Key"]: t["Value"] for t in image.get("Tags", [])},
                "launch_permissions": [p.get("UserId") for p in permissions.get("LaunchPermissions", [])],
            })  # fmt: skip
        kiln_tagged = [{"Name": "tag-key", "Values": [TAG_BUILD]}]  # moto's catalog AMIs bring a thousand others
        kiln_snapshots = ec2.describe_snapshots(OwnerIds=["self"], Filters=kiln_tagged)["Snapshots"]
        found[region] = {
            "amis": amis,
            "instances_not_terminated": instances,
            "key_pairs": [k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"]],
            "security_groups_besides_default": groups,
            "kiln_snapshots": [s["SnapshotId"] for s in kiln_snapshots],
        }
    return found


def serve(port: int, recipe_dir: Path | None, workdir: Path | None) -> int:
    """Run moto with guests until SIGINT/SIGTERM; print the endpoint and the recipe."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="moto-guests-"))
    config = workdir / "aws"
    config.mkdir(parents=True, exist_ok=True)
    os.environ.update(aws_environment(config))
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(key, None)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    with MotoGuests(workdir, port) as harness:
        harness.base()  # the bootstrap base, built or taken from the cache before anything launches
        lines = {"endpoint": harness.endpoint, "subnet_id": harness.subnet_id, "workdir": str(workdir)}
        if recipe_dir is not None:
            lines["recipe"] = str(write_recipe(recipe_dir, harness.endpoint, harness.subnet_id))
        print(json.dumps(lines), flush=True)
        while not stopping.wait(1):
            pass
        print("stopping: killing every guest, deleting every disk", flush=True)
    shutil.rmtree(workdir / "guests", ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.clouds.moto_guests", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run moto on 127.0.0.1 with a QEMU guest behind each instance")
    run.add_argument("--port", type=int, default=5055)
    run.add_argument("--recipe-dir", type=Path, help="write a committed hello-ec2.yaml for this endpoint here")
    run.add_argument("--workdir", type=Path, help="guests and disks (default: a new temporary directory)")
    show = commands.add_parser("report", help="AMIs with tags and permissions, and what else is left, per region")
    show.add_argument("--endpoint", default="http://127.0.0.1:5055")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.command == "serve":
        return serve(args.port, args.recipe_dir, args.workdir)
    for key, value in CREDENTIALS.items():
        os.environ.setdefault(key, value)
    print(json.dumps(report(args.endpoint), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
