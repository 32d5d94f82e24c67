"""The whole build_image flow on an ec2 target against moto, each instance's SSH side played by a local QEMU guest.

moto's instances never boot, so the test maps what the Cloud protocol exposes of a guest (endpoint, console,
the stop) onto a local QEMU guest launched with the same key and user-data; snapshot makes both the AMI in
moto and the local image that later boots for verify. Every EC2 call goes to moto; customize, sanitize and
verify run for real over SSH. Nothing of this mapping exists in product code: it is the subclass below.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import flows.build
from clouds.base import TAG_BUILD, TAG_ROLE, BaseImage, ImageRef, Instance, KeyPair, Resource, StopResult
from clouds.ec2 import EC2Cloud
from clouds.local import LocalCloud
from kiln.recipe import BaseSpec
from provenance import lineage, store
from tests.clouds.moto_ec2 import SSM_AL2023, moto, moto_server  # noqa: F401 - fixtures
from tests.conftest import REPO
from tests.flows.conftest import committed_recipe, prefect_api  # noqa: F401 - fixture

pytestmark = pytest.mark.vm

REGION, OTHER, ACCOUNT = "us-east-1", "eu-west-1", "111122223333"
STAGES = ["fetch_base", "launch", "wait_boot", "customize", "sanitize", "snapshot", "verify", "register"]


class GuestBackedEC2(EC2Cloud):
    """EC2Cloud whose instances' SSH side (endpoint, console, power) is a local QEMU guest; AMIs map to local images."""

    local: LocalCloud
    local_base: BaseImage

    def attach(self, local: LocalCloud, local_base: BaseImage) -> GuestBackedEC2:
        self.local, self.local_base = local, local_base
        self.guests: dict[str, Instance] = {}  # EC2 instance id -> local guest
        self.images: dict[str, ImageRef] = {}  # AMI id -> local image of the same bits
        self.launched_from: list[str] = []  # which AMI each instance was launched from, in order
        return self

    def launch(self, base: BaseImage, key: KeyPair, user_data: str, tags: dict[str, str], ports: list[int],
               *, role: str = "build", firewall: str | None = None) -> Instance:  # fmt: skip
        instance = super().launch(base, key, user_data, tags, ports, role=role, firewall=firewall)
        local = self.images.get(base.image_id)  # verify boots the local twin of the new AMI
        local_base = self.local_base if local is None else self.local.resolve_base(BaseSpec(image=local.image_id),
                                                                                   base.ssh_user)  # fmt: skip
        try:
            self.guests[instance.instance_id] = self.local.launch(local_base, key, user_data, tags, ports, role=role)
        except BaseException:
            super().terminate(instance)
            raise
        self.launched_from.append(base.image_id)
        return instance

    def endpoint(self, instance: Instance, port: int) -> tuple[str, int]:
        return self.local.endpoint(self.guests[instance.instance_id], port)

    def console(self, instance: Instance) -> str:
        return self.local.console(self.guests[instance.instance_id])

    def stop(self, instance: Instance, timeout: float = 120) -> StopResult:
        result = self.local.stop(self.guests[instance.instance_id], timeout)
        super().stop(instance, timeout)
        return result

    def snapshot(self, instance: Instance, name: str, tags: dict[str, str], formats: list[str]) -> ImageRef:
        image = super().snapshot(instance, name, tags, formats)
        self.images[image.image_id] = self.local.snapshot(self.guests[instance.instance_id], name, tags, ["qcow2"])
        return image

    def release(self, resource: Resource) -> None:
        super().release(resource)
        if resource.kind == "instance" and resource.resource_id in self.guests:
            self.local.terminate(self.guests.pop(resource.resource_id))
        if resource.kind == "image" and resource.resource_id in self.images:
            self.local.delete_image(self.images.pop(resource.resource_id))

    def terminate(self, instance: Instance) -> None:
        self.release(Resource(self.name, "instance", instance.instance_id, region=self.region))

    def delete_image(self, image: ImageRef) -> None:
        super().delete_image(image)
        if image.image_id in self.images:
            self.local.delete_image(self.images.pop(image.image_id))


@pytest.fixture(scope="module", autouse=True)
def prefect_drained(prefect_api: str) -> Iterator[None]:  # noqa: F811
    """Flush Prefect's log and event workers while the server still runs: else they retry at exit, for minutes."""
    yield
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)


@pytest.fixture
def ec2_build(moto: str, bootstrap_base: BaseImage, monkeypatch: pytest.MonkeyPatch) -> Iterator[list]:  # noqa: F811
    """build_image opens a GuestBackedEC2 for ec2 targets; yields the clouds it opened, cleans their local images."""
    opened: list[GuestBackedEC2] = []

    def open_cloud(target, timeouts=None, **_):  # noqa: ANN001, ANN003, ANN202 - stands in for clouds.open_cloud
        cloud = GuestBackedEC2.from_target(target, timeouts).attach(LocalCloud(memory_mb=1024), bootstrap_base)
        cloud.poll_seconds = 0.2
        opened.append(cloud)
        return cloud

    monkeypatch.setattr(flows.build, "open_cloud", open_cloud)
    yield opened
    for cloud in opened:
        for local in cloud.images.values():
            cloud.local.delete_image(local)


def ec2_recipe(tmp_path: Path, name: str, endpoint: str, script: str) -> Path:
    return committed_recipe(
        tmp_path,
        f"""name: {name}
version: 1.0.0
targets:
  ec2:
    region: {REGION}
    endpoint_url: {endpoint}
    base: {{ssm_parameter: {SSM_AL2023}}}
    ssh_user: debian
    ssh_cidr: 127.0.0.0/8
    regions: [{OTHER}]
    share_with: ["{ACCOUNT}"]
scripts: [scripts/setup.sh]
sanitize: {{disable: [zero-free-space]}}
verify:
  - command: {{run: cat /etc/kiln-hello, expect: hello from kiln}}
  - port: {{port: 22}}
""",
        {"scripts/setup.sh": script},
    )


def kiln_leftovers(cloud: EC2Cloud) -> dict[str, list[str]]:
    """What kiln-tagged resources remain, by kind, in the home region and the copy region."""
    found: dict[str, list[str]] = {}
    for resource in cloud.owned():
        found.setdefault(resource.kind, []).append(f"{resource.region}:{resource.resource_id}")
    return found


def test_ec2_build_makes_a_verified_ami_copied_shared_and_recorded_and_leaves_nothing_else(
    tmp_path, ec2_build, moto, prefect_api  # noqa: F811
):
    recipe = ec2_recipe(tmp_path, "hello-ec2", moto, (REPO / "recipes/scripts/hello.sh").read_text())

    result = flows.build.build_image(str(recipe), "ec2")

    [cloud] = ec2_build
    assert result["status"] == "succeeded", result
    ami, build_id = result["image_id"], result["build_id"]
    assert len(cloud.launched_from) == 2 and cloud.launched_from[1] == ami, "verify booted the new AMI"
    detail = lineage.get_build(build_id)
    assert [(s.stage, s.status) for s in detail.steps] == [(s, "succeeded") for s in STAGES]
    assert {p.name: p.passed for p in detail.probes} == {
        "command cat /etc/kiln-hello": True, "port :22": True, "build key rejected": True,
    }  # fmt: skip
    left = kiln_leftovers(cloud)
    assert sorted(left) == ["image", "snapshot"], f"only the images and their snapshots remain: {left}"
    assert len(left["image"]) == 2 and {r.split(":")[0] for r in left["image"]} == {REGION, OTHER}
    images = {region: cloud.ec2(region).describe_images(Owners=["self"])["Images"] for region in (REGION, OTHER)}
    [home], [copy] = images[REGION], images[OTHER]
    assert home["ImageId"] == ami
    for each, region in ((home, REGION), (copy, OTHER)):
        tags = {t["Key"]: t["Value"] for t in each["Tags"]}
        assert tags[TAG_BUILD] == build_id and tags[TAG_ROLE] == "image" and tags["kiln:recipe"] == "hello-ec2"
        assert cloud.launch_permissions(ImageRef("ec2", each["ImageId"], "", region)) == [ACCOUNT]
    rows = {summary.image.region: summary for summary in lineage.list_images(cloud="ec2", recipe="hello-ec2")}
    assert set(rows) == {REGION, OTHER}
    assert rows[REGION].image.image_id == ami and rows[REGION].image.kind == "built"
    assert rows[OTHER].image.image_id == copy["ImageId"] and rows[OTHER].image.kind == "copy"
    assert rows[REGION].build_id == rows[OTHER].build_id == build_id
    assert rows[REGION].image.parent_id == rows[OTHER].image.parent_id
    base_ami = cloud.client("ssm").get_parameter(Name=SSM_AL2023)["Parameter"]["Value"]
    assert rows[REGION].parent_image_id == rows[OTHER].parent_image_id == base_ami
    assert {i.image.image_id for i in detail.images} >= {ami, copy["ImageId"]}
    assert store.open_resources(build_id) == []


def test_ec2_build_failing_in_customize_leaves_no_instance_key_group_or_image(
    tmp_path, ec2_build, moto, prefect_api  # noqa: F811
):
    recipe = ec2_recipe(tmp_path, "broken-ec2", moto, "#!/bin/sh\necho about to fail\nexit 3\n")

    with pytest.raises(Exception, match="exit code 3"):
        flows.build.build_image(str(recipe), "ec2")

    [cloud] = ec2_build
    assert kiln_leftovers(cloud) == {}
    [build] = lineage.list_builds(recipe="broken-ec2")
    detail = lineage.get_build(build.build.id)
    assert detail.build.status == "failed" and detail.build.stage == "customize"
    assert [s.stage for s in detail.steps] == STAGES[:4] and "about to fail" in detail.steps[-1].log
    assert [i.image.image_id for i in lineage.list_images(cloud="ec2", recipe="broken-ec2")] == []
    assert detail.images == []
    assert store.open_resources(build.build.id) == []
