"""`kiln build RECIPE --target ec2` for real against moto, each moto instance played by a local QEMU guest.

The `kiln` command runs as a user runs it, with kiln's unmodified EC2 backend: every EC2 call goes to moto's
server, and the harness in tests/clouds/moto_guests.py gives each instance moto starts a QEMU guest at the
instance's private address (127.77.1.x), its user-data, its console and its power state; create_image takes the
guest's disk, so verify boots the new AMI's bits. customize, sanitize and verify run over SSH for real.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from clouds.base import TAG_BUILD, TAG_ROLE, ImageRef
from clouds.ec2 import EC2Cloud
from provenance import lineage, store
from tests.clouds.moto_guests import HOME, OTHER, SSM_AL2023, MotoGuests, aws_environment, write_recipe
from tests.flows.conftest import run_kiln

pytestmark = pytest.mark.vm

ACCOUNT = "111122223333"
STAGES = ["fetch_base", "launch", "wait_boot", "customize", "sanitize", "snapshot", "verify", "register"]


@pytest.fixture(scope="module")
def moto_guests(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Iterator[MotoGuests]:  # noqa: F811
    """moto on loopback with a guest behind every instance; dummy AWS credentials for this process and `kiln`."""
    work = tmp_path_factory.mktemp("moto-guests")
    (work / "aws").mkdir()
    env = aws_environment(work / "aws")
    saved = {key: os.environ.get(key) for key in [*env, "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    os.environ.update(env)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    harness = MotoGuests(work, poll_seconds=0.3).start()
    try:
        harness.base()
        yield harness
    finally:
        harness.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def left_behind(harness: MotoGuests) -> dict[str, list[str]]:
    """Every instance not terminated, key pair and non-default security group, in both regions."""
    found: dict[str, list[str]] = {}
    for region in (HOME, OTHER):
        ec2 = harness.client(region)
        for r in ec2.describe_instances()["Reservations"]:
            found.setdefault("instance", []).extend(
                i["InstanceId"] for i in r["Instances"] if i["State"]["Name"] != "terminated"
            )
        found.setdefault("keypair", []).extend(k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"])
        found.setdefault("security-group", []).extend(
            g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"] if g["GroupName"] != "default"
        )
    return {kind: ids for kind, ids in found.items() if ids}


def built_on_ec2() -> set[str]:
    """AMIs kiln built or copied (not the base rows fetch_base records, which depend on which tests ran first)."""
    return {i.image.image_id for i in lineage.list_images(cloud="ec2") if i.image.kind != "base"}


def test_kiln_build_on_ec2_makes_a_verified_ami_copied_shared_and_recorded_and_leaves_nothing_else(
    tmp_path: Path, moto_guests: MotoGuests
) -> None:
    recipe = write_recipe(tmp_path / "recipe", moto_guests.endpoint, moto_guests.subnet_id)

    result = run_kiln("build", str(recipe), "--target", "ec2", "--json")

    assert result.returncode == 0, result.stderr[-3000:]
    [built] = json.loads(result.stdout)
    ami, build_id = built["image_id"], built["build_id"]
    assert moto_guests.errors == []
    detail = lineage.get_build(build_id)
    assert [(s.stage, s.status) for s in detail.steps] == [(s, "succeeded") for s in STAGES]
    assert {p.name: p.passed for p in detail.probes} == {
        "command cat /etc/kiln-hello": True, "port :22": True, "build key rejected": True,
    }  # fmt: skip
    assert left_behind(moto_guests) == {}
    cloud = EC2Cloud(HOME, endpoint_url=moto_guests.endpoint, regions=[OTHER])
    [home] = cloud.ec2(HOME).describe_images(Owners=["self"])["Images"]
    [copy] = cloud.ec2(OTHER).describe_images(Owners=["self"])["Images"]
    assert home["ImageId"] == ami
    for each, region in ((home, HOME), (copy, OTHER)):
        tags = {t["Key"]: t["Value"] for t in each["Tags"]}
        assert tags[TAG_BUILD] == build_id and tags[TAG_ROLE] == "image" and tags["kiln:recipe"] == "hello-ec2"
        ref = ImageRef("ec2", each["ImageId"], "", region)
        assert cloud.launch_permissions(ref) == [ACCOUNT]
        assert set(map(tuple, cloud.volume_permissions(ref).values())) == {(ACCOUNT,)}
    rows = {summary.image.region: summary for summary in lineage.list_images(cloud="ec2", recipe="hello-ec2")}
    assert set(rows) == {HOME, OTHER}
    assert rows[HOME].image.image_id == ami and rows[HOME].image.kind == "built"
    assert rows[OTHER].image.image_id == copy["ImageId"] and rows[OTHER].image.kind == "copy"
    assert rows[HOME].build_id == rows[OTHER].build_id == build_id
    base_ami = moto_guests.client(HOME, "ssm").get_parameter(Name=SSM_AL2023)["Parameter"]["Value"]
    assert rows[HOME].parent_image_id == rows[OTHER].parent_image_id == base_ami
    assert store.open_resources(build_id) == []
    lineage_json = run_kiln("lineage", ami, "--format", "json")
    assert lineage_json.returncode == 0, lineage_json.stderr
    assert copy["ImageId"] in lineage_json.stdout and OTHER in lineage_json.stdout


def test_kiln_build_on_ec2_failing_in_customize_leaves_no_instance_key_group_or_image(
    tmp_path: Path, moto_guests: MotoGuests
) -> None:
    recipe = write_recipe(tmp_path / "recipe", moto_guests.endpoint, moto_guests.subnet_id,
                          script="#!/bin/sh\necho about to fail\nexit 3\n")  # fmt: skip
    before = built_on_ec2()

    result = run_kiln("build", str(recipe), "--target", "ec2", "--json")

    assert result.returncode == 1, result.stderr[-3000:]
    [outcome] = json.loads(result.stdout)
    assert outcome["status"] == "failed" and outcome["stage"] == "customize" and "exit code 3" in outcome["error"]
    assert left_behind(moto_guests) == {}
    detail = lineage.get_build(outcome["build_id"])
    assert detail.build.stage == "customize" and [s.stage for s in detail.steps] == STAGES[:4]
    assert "about to fail" in detail.steps[-1].log
    assert detail.images == [] and built_on_ec2() == before
    assert store.open_resources(outcome["build_id"]) == []
    images = moto_guests.client(HOME).describe_images(Owners=["self"], Filters=[
        {"Name": f"tag:{TAG_BUILD}", "Values": [outcome["build_id"]]}])["Images"]  # fmt: skip
    assert images == []
