"""One conformance suite for every registered cloud: each backend is opened through the registry from a recipe
target, launches a machine as the launch stage does, is reached the way wait_boot reaches it, shows its console,
stops, snapshots, tags the image, lists all it made for kiln gc and releases each kind (twice: gone already is
success) — and every capability it declares (each protocol it implements) does what it says; one it declares but
the suite cannot show working fails the test.

Local: the build container on the cached bootstrap base (no QEMU). EC2: moto's server (VM Import and
EnableImageDeprecation answered before they leave the client: moto has neither). OpenStack: the real Keystone and
Glance of tests.openstack_server with the fake Nova and Neutron of tests.clouds.openstack_fake in their catalog,
whose createImage uploads a small disk to the real Glance."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests_mock

from clouds import registry
from clouds.base import (
    RELEASE_ORDER,
    TAG_BUILD,
    TAG_COMMIT,
    TAG_RECIPE,
    TAG_ROLE,
    TAG_VALID_UNTIL,
    BaseImage,
    Cloud,
    Collectable,
    ExpiresImages,
    HoldsConnection,
    ImageRef,
    KeepsLayers,
    KeyPair,
    OpensSessions,
    PowersOffFromInside,
    PublishesImages,
    ReplicatesImages,
    Resource,
    RevokesImages,
    SharesImages,
    ShowsConsole,
)
from core import settings
from core.digests import sha256_file
from core.recipe import CLOUD_KINDS, BaseSpec, EC2Target, LocalTarget, OpenStackTarget, Timeouts
from tasks.launch import Guest, user_data
from tasks.snapshot import power_off_from_inside
from tests.clouds.moto_ec2 import SSM_AL2023
from tests.clouds.openstack_fake import FakeOpenStack, FakeServer
from tests.openstack_server import OpenStackServers, admin_connection, in_catalog

pytest_plugins = ["tests.clouds.openstack_fixtures"]

CAPABILITIES = (ShowsConsole, OpensSessions, KeepsLayers, PowersOffFromInside, ReplicatesImages, SharesImages,
                ExpiresImages, RevokesImages, PublishesImages, HoldsConnection)  # fmt: skip
TIMEOUTS = Timeouts(boot=300, image=300)
REGION, OTHER, ACCOUNT = "us-east-1", "eu-west-1", "111122223333"
NOVA, NEUTRON = "http://nova.conformance.kiln.test/v2.1", "http://neutron.conformance.kiln.test"
CONSOLE = "kiln conformance console: SSH host key fingerprints follow"


@dataclass
class Subject:
    """One backend as the suite drives it, with how to look behind it where the protocol says nothing."""

    cloud: Cloud
    base: BaseImage
    console_says: str  # what its console shows once the machine is up
    shared_with: Callable[[ImageRef], list[str]] = lambda image: []  # who may launch the image
    revoked: Callable[[ImageRef], bool] = lambda image: False  # whether the cloud shows the image revoked
    bucket: str | None = None  # where it stages a published disk, when it does
    expiries: list[dict] = field(default_factory=list)  # what EC2 was asked to deprecate


# -- the backends ---------------------------------------------------------------------------------------------


@pytest.fixture(params=CLOUD_KINDS)
def subject(request: pytest.FixtureRequest) -> Iterator[Subject]:
    yield from {"local": _local, "ec2": _ec2, "openstack": _openstack}[request.param](request)


def _local(request: pytest.FixtureRequest) -> Iterator[Subject]:
    if os.geteuid() != 0:
        pytest.skip("the local build container needs root (loop devices, mounts, nspawn)")
    base: BaseImage = request.getfixturevalue("bootstrap_base")
    target = LocalTarget(base=BaseSpec(bootstrap="debian-bookworm"), build_in="container")
    cloud = registry.open_cloud(target, TIMEOUTS, target_name="local")

    def revoked(image: ImageRef) -> bool:
        return "revoked" in json.loads((settings.images_dir() / image.image_id / "meta.json").read_text())

    yield Subject(cloud, base, console_says="", revoked=revoked)


def _ec2(request: pytest.FixtureRequest) -> Iterator[Subject]:
    endpoint = request.getfixturevalue("moto")
    target = EC2Target(region=REGION, endpoint_url=endpoint, ssh_cidr="203.0.113.0/24", regions=[OTHER],
                       share_with=[ACCOUNT], base=BaseSpec(ssm_parameter=SSM_AL2023), ssh_user="ec2-user")  # fmt: skip
    cloud = registry.open_cloud(target, TIMEOUTS, target_name="ec2")
    cloud.poll_seconds = 0.2  # moto answers at once
    subject = Subject(cloud, cloud.resolve_base(target.base, target.ssh_user), console_says="",
                      shared_with=cloud.launch_permissions, bucket="kiln-conformance")  # fmt: skip
    for region in (REGION, OTHER):
        _answer(cloud.ec2(region), "EnableImageDeprecation", {"Return": True}, subject.expiries)
    cloud.client("s3").create_bucket(Bucket=subject.bucket)

    def revoked(image: ImageRef) -> bool:
        described = cloud.ec2(image.region).describe_images(ImageIds=[image.image_id])["Images"][0]
        return {"Key": "kiln:status", "Value": "revoked"} in described.get("Tags", [])

    subject.revoked = revoked
    yield subject


def _answer(client, operation: str, answer: dict, calls: list[dict] | None = None) -> None:  # noqa: ANN001
    """Answer an EC2 call before it leaves the client (moto lacks it), as EC2 would, remembering its parameters."""
    if calls is not None:
        client.meta.events.register(f"provide-client-params.ec2.{operation}",
                                    lambda params, **_: calls.append(dict(params)))  # fmt: skip
    client.meta.events.register(f"before-call.ec2.{operation}", lambda **_: (
        SimpleNamespace(status_code=200), {**answer, "ResponseMetadata": {"HTTPStatusCode": 200}}))


def _openstack(request: pytest.FixtureRequest) -> Iterator[Subject]:
    servers: OpenStackServers = request.getfixturevalue("openstack_test_servers")
    work: Path = request.getfixturevalue("tmp_path")
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(servers.clouds_yaml))
    glance = admin_connection(servers)
    disk = small_disk(work)
    base_image = glance.image.create_image("conformance-base", filename=str(disk), disk_format="qcow2",
                                           container_format="bare", allow_duplicates=True, wait=True)  # fmt: skip
    fake = FakeOpenStack(compute_url=NOVA, network_url=NEUTRON,
                         networks=[{"id": "net-private", "name": "private", "router:external": False}])

    def server_image(server: FakeServer, name: str, metadata: dict[str, str]) -> str:
        return glance.image.create_image(name, filename=str(disk), disk_format="qcow2", container_format="bare",
                                         allow_duplicates=True, wait=False, **metadata).id  # fmt: skip

    fake.on_create_image = server_image
    fake.console_for = lambda server: CONSOLE
    target = OpenStackTarget(os_cloud=servers.admin_cloud, flavor="m1.small", network="private",
                             ssh_cidr="198.51.100.7/32", share_with=[servers.partner_project_id],
                             base=BaseSpec(image=base_image.id), ssh_user="debian")  # fmt: skip
    with in_catalog(servers, {"compute": NOVA, "network": NEUTRON}), requests_mock.Mocker(real_http=True) as mocker:
        fake.register(mocker)
        cloud = registry.open_cloud(target, TIMEOUTS, target_name="sierra")

        def shared_with(image: ImageRef) -> list[str]:
            return sorted(member.member_id for member in glance.image.members(image.image_id))

        def revoked(image: ImageRef) -> bool:
            return glance.image.get_image(image.image_id).status == "deactivated"

        try:
            yield Subject(cloud, cloud.resolve_base(target.base, target.ssh_user), console_says=CONSOLE,
                          shared_with=shared_with, revoked=revoked)  # fmt: skip
        finally:
            if isinstance(cloud, HoldsConnection):
                cloud.close()
            glance.image.delete_image(base_image, ignore_missing=True)
            glance.close()


def small_disk(directory: Path) -> Path:
    """An 8 MiB disk with an MBR (VM Import reads its boot mode from it), as qcow2."""
    raw, path = directory / "small.raw", directory / "small.qcow2"
    subprocess.run(["truncate", "-s", "8M", str(raw)], check=True)
    subprocess.run(["sfdisk", "-q", str(raw)], input="label: dos\n,,L,*\n", text=True, check=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)], check=True)
    return path


# -- the suite ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CLOUD_KINDS)
def test_every_recipe_cloud_has_one_registered_backend_opened_from_its_target_model(kind: str) -> None:
    backend = registry.backend(kind)

    assert backend.kind == kind and backend.target_model.model_fields["cloud"].default == kind
    assert set(registry.BACKENDS) == set(CLOUD_KINDS)


def test_a_cloud_does_what_the_stages_and_gc_ask_and_each_capability_it_declares_works(
    subject: Subject, tmp_path: Path
) -> None:
    cloud = subject.cloud
    assert isinstance(cloud, Cloud) and isinstance(cloud, Collectable)
    declared = {capability for capability in CAPABILITIES if isinstance(cloud, capability)}
    worked: set[type] = set()
    build_id = uuid.uuid4().hex
    tags = {TAG_BUILD: build_id, TAG_RECIPE: "conformance", TAG_COMMIT: "none"}
    mine = {TAG_BUILD: build_id}
    try:
        # launch, as the launch stage does it
        key = KeyPair.generate(f"kiln-{build_id[:8]}-build")
        key_id = cloud.import_key(key, {**tags, TAG_ROLE: "build"})
        firewall = cloud.open_ports(f"kiln-{build_id[:8]}-build", [22], {**tags, TAG_ROLE: "build"})
        instance = cloud.launch(subject.base, key, user_data(subject.base.ssh_user, key), {**tags, TAG_ROLE: "build"},
                                [22], role="build", firewall=firewall)  # fmt: skip
        found = kinds_of(cloud.owned(mine))
        assert found.get("instance") == [instance.instance_id]
        assert (key_id is None) != ("keypair" in found) and (firewall is None) != ("security-group" in found)

        # reached as wait_boot reaches it: a session of the cloud's own, else an address
        session = None
        if isinstance(cloud, OpensSessions):
            session = cloud.open_session(instance, 120, lambda line: None)
            assert session is not None, "a cloud that opens sessions opens one to its build machine"
            assert session.run("echo kiln-conformance", timeout=60).stdout.strip() == "kiln-conformance"
            assert cloud.access_hint(instance)
            worked.add(OpensSessions)
        else:
            host, port = cloud.endpoint(instance, 22)
            assert host and port > 0
        if isinstance(cloud, ShowsConsole):
            text = cloud.console(instance)
            assert isinstance(text, str) and subject.console_says in text and cloud.console_poll_seconds > 0
            worked.add(ShowsConsole)
        if isinstance(cloud, KeepsLayers):
            layers = cloud.layers(instance)
            assert layers is not None and session is not None
            layers.begin()
            session.run("echo conformance > /etc/kiln-conformance", timeout=60)
            layer_key = hashlib.sha256(build_id.encode()).hexdigest()
            layer = layers.keep(layer_key, step="conformance", build_id=build_id, parent="")
            assert layer.size > 0 and [each.key for each in layers.reusable([layer_key])] == [layer_key]
            worked.add(KeepsLayers)

        # stopped (powered off from inside where the cloud allows it), then snapshot and tagged as register does
        if isinstance(cloud, PowersOffFromInside):
            assert session is not None
            assert power_off_from_inside(cloud, Guest(instance, key, "build", session), lambda line: None)
            session.close()
            worked.add(PowersOffFromInside)
        stopped = cloud.stop(instance, timeout=120)
        assert stopped is None or not stopped.forced
        image = cloud.snapshot(instance, f"conformance-{build_id[:8]}", {**tags, TAG_ROLE: "image"}, ["qcow2"])
        until = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
        cloud.tag_image(image, {TAG_VALID_UNTIL: until.isoformat()})
        [listed] = [each for each in cloud.owned(mine) if (each.kind, each.resource_id) == ("image", image.image_id)]
        assert listed.tags[TAG_VALID_UNTIL] == until.isoformat()

        # the image capabilities
        if isinstance(cloud, ReplicatesImages):
            assert cloud.regions
            copy = cloud.copy_image(image, cloud.regions[0], {**tags, TAG_ROLE: "image"})
            assert copy.region == cloud.regions[0]
            assert (copy.region, copy.image_id) in {(r.region, r.resource_id) for r in cloud.owned(mine)}
            worked.add(ReplicatesImages)
        if isinstance(cloud, SharesImages):
            assert cloud.share_with
            cloud.share_image(image, cloud.share_with)
            assert set(cloud.share_with) <= set(subject.shared_with(image))
            worked.add(SharesImages)
        if isinstance(cloud, ExpiresImages):
            assert cloud.set_expiry(image, until) >= until
            assert [call["ImageId"] for call in subject.expiries] == [image.image_id]
            worked.add(ExpiresImages)
        if isinstance(cloud, RevokesImages):
            cloud.revoke_image(image, "conformance")
            assert subject.revoked(image)
            worked.add(RevokesImages)
        if isinstance(cloud, PublishesImages):
            (tmp_path / "published").mkdir()
            disk = small_disk(tmp_path / "published")
            assert cloud.publish_problem(bucket=subject.bucket) is None
            if subject.bucket:  # VM Import, which moto lacks, makes a snapshot of the disk the upload holds
                answer_vm_import(cloud)
            published, digests = cloud.publish(disk, f"conformance-published-{build_id[:8]}",
                                               tags={**tags, TAG_ROLE: "published"}, disk_format="qcow2",
                                               bucket=subject.bucket)  # fmt: skip
            assert digests.sha256 == sha256_file(disk)
            assert published.image_id in found_ids(cloud.owned(mine), "image")
            worked.add(PublishesImages)
        if isinstance(cloud, HoldsConnection):
            cloud.close()
            assert image.image_id in found_ids(cloud.owned(mine), "image")  # opened again when used
            worked.add(HoldsConnection)
    finally:
        leftovers = sorted(cloud.owned(mine), key=lambda r: RELEASE_ORDER.index(r.kind))
        for resource in leftovers:
            cloud.release(resource)
        for resource in leftovers:
            cloud.release(resource)  # gone already is success
    assert leftovers and cloud.owned(mine) == []
    assert worked == declared, f"declared but not shown working: {sorted(c.__name__ for c in declared - worked)}"


def kinds_of(resources: list[Resource]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for resource in resources:
        found.setdefault(resource.kind, []).append(resource.resource_id)
    return found


def found_ids(resources: list[Resource], kind: str) -> set[str]:
    return {resource.resource_id for resource in resources if resource.kind == kind}


def answer_vm_import(cloud: Cloud) -> None:
    """VM Import's answers: the task, and at once its snapshot (a real one in moto, which has no import_snapshot)."""
    ec2 = cloud.ec2()
    volume = ec2.create_volume(Size=1, AvailabilityZone=f"{REGION}a")["VolumeId"]
    snapshot = ec2.create_snapshot(VolumeId=volume, Description="imported")["SnapshotId"]
    importer, task = cloud.vm_import_client(), "import-snap-0c0f0a0c0e0000000"
    _answer(importer, "ImportSnapshot", {"ImportTaskId": task})
    _answer(importer, "DescribeImportSnapshotTasks", {"ImportSnapshotTasks": [
        {"ImportTaskId": task, "SnapshotTaskDetail": {"Status": "completed", "SnapshotId": snapshot}}]})
