"""The EC2 backend against moto's server on loopback: every API path for real (VM Import alone stubbed)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import http.server
import json
import subprocess
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import botocore.exceptions
import pytest
from botocore.stub import ANY, Stubber

from clouds import open_cloud
from clouds.base import TAG_BUILD, TAG_ROLE, BaseImage, CloudError, ImageRef, KeyPair, Resource
from clouds.ec2 import EC2Cloud, boot_mode_of, decode_console, publish_disk
from core.recipe import BaseSpec, EC2Target, Timeouts, load_recipe
from operations.publish import publish_image
from provenance import gitinfo, lineage, store
from tasks.common import BuildPlan, release_open
from tasks.register import replicate
from tests.clouds.moto_ec2 import SSM_AL2023
from tests.conftest import REPO

REGION, OTHER = "us-east-1", "eu-west-1"
TAGS = {TAG_BUILD: "0123456789abcdef", "kiln:recipe": "hello", TAG_ROLE: "build"}
CIDR = "203.0.113.0/24"


@pytest.fixture
def ec2(moto: str) -> EC2Cloud:  # noqa: F811 - the fixture imported above
    return EC2Cloud(REGION, endpoint_url=moto, ssh_cidr=CIDR, regions=[OTHER], poll_seconds=0.2)


@pytest.fixture
def base(ec2: EC2Cloud) -> BaseImage:
    return ec2.resolve_base(BaseSpec(ssm_parameter=SSM_AL2023), "ec2-user")


def launched(ec2: EC2Cloud, base: BaseImage, role: str = "build"):
    name = f"kiln-01234567-{role}-{uuid.uuid4().hex[:6]}"
    key = KeyPair.generate(name)
    ec2.import_key(key, TAGS)
    group = ec2.open_ports(name, [22, 80], TAGS)
    return key, group, ec2.launch(base, key, "#cloud-config\n", TAGS, [22, 80], role=role, firewall=group)


def built_image(ec2: EC2Cloud, base: BaseImage, name: str = "hello-1.0.0-01234567") -> ImageRef:
    _, _, instance = launched(ec2, base)
    ec2.stop(instance, timeout=30)
    return ec2.snapshot(instance, name, TAGS, ["qcow2"])


def kinds(resources: list[Resource]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for resource in resources:
        counts[resource.kind] = counts.get(resource.kind, 0) + 1
    return counts


def release_all(ec2: EC2Cloud) -> None:
    for resource in ec2.owned():
        ec2.release(resource)


# -- base images ------------------------------------------------------------------------------------------


def test_base_by_ssm_parameter_is_the_ami_it_names_with_its_creation_date_as_digest(ec2):
    value = ec2.client("ssm").get_parameter(Name=SSM_AL2023)["Parameter"]["Value"]

    base = ec2.resolve_base(BaseSpec(ssm_parameter=SSM_AL2023), "ec2-user")

    described = ec2.ec2().describe_images(ImageIds=[value])["Images"][0]
    assert base.image_id == value and base.cloud == "ec2" and base.region == REGION
    assert base.digest == f"{value}@{described['CreationDate']}" and base.ssh_user == "ec2-user"
    assert base.details["origin"] == {"ssm_parameter": SSM_AL2023}


def test_base_by_id_and_by_name_with_owners_where_the_newest_wins(ec2, base):
    older = built_image(ec2, base, "golden-2024-01")
    time.sleep(1.1)  # creation dates have one-second resolution
    newer = built_image(ec2, base, "golden-2024-02")

    by_name = ec2.resolve_base(BaseSpec(name="golden-*", owners=["self"]), "admin")
    by_id = ec2.resolve_base(BaseSpec(image=older.image_id), "admin")

    assert by_name.image_id == newer.image_id and by_name.name == "golden-2024-02"
    assert by_id.image_id == older.image_id and by_id.digest.startswith(f"{older.image_id}@")
    with pytest.raises(CloudError, match="no available AMI named 'golden-\\*' owned by 999988887777"):
        ec2.resolve_base(BaseSpec(name="golden-*", owners=["999988887777"]), "admin")


def test_unknown_base_ami_and_bad_ssm_parameter_fail_with_the_name(ec2):
    with pytest.raises(CloudError, match="ami-0123456789abcdef0"):
        ec2.resolve_base(BaseSpec(image="ami-0123456789abcdef0"), "admin")
    with pytest.raises(CloudError, match="/no/such/parameter"):
        ec2.resolve_base(BaseSpec(ssm_parameter="/no/such/parameter"), "admin")


# -- key pairs, security groups, instances ----------------------------------------------------------------------


def test_imported_key_pair_is_tagged_and_holds_only_the_public_half(ec2):
    key = KeyPair.generate("kiln-01234567-build")

    key_id = ec2.import_key(key, TAGS)

    [pair] = ec2.ec2().describe_key_pairs(KeyNames=[key.name], IncludePublicKey=True)["KeyPairs"]
    assert pair["KeyPairId"] == key_id
    assert {t["Key"]: t["Value"] for t in pair["Tags"]} == {**TAGS, "Name": key.name}
    assert "PRIVATE" not in str(pair)
    ec2.release(Resource("ec2", "keypair", key_id, region=REGION))
    ec2.release(Resource("ec2", "keypair", key_id, region=REGION))  # idempotent
    assert ec2.ec2().describe_key_pairs()["KeyPairs"] == []


def test_moto_rejects_key_material_that_is_not_a_public_key(ec2):
    bad = KeyPair(name="kiln-bad", public_key="ssh-ed25519 not-base64 kiln-bad", private_key="")
    with pytest.raises(botocore.exceptions.ClientError, match="InvalidKeyPair.Format"):
        ec2.import_key(bad, TAGS)


def test_security_group_opens_ssh_and_probe_ports_only_to_the_builders_cidr(ec2):
    group_id = ec2.open_ports("kiln-01234567-build", [22, 8080], TAGS)

    [group] = ec2.ec2().describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    rules = sorted((p["FromPort"], p["ToPort"], [r["CidrIp"] for r in p["IpRanges"]]) for p in group["IpPermissions"])
    assert rules == [(22, 22, [CIDR]), (8080, 8080, [CIDR])]
    assert {t["Key"]: t["Value"] for t in group["Tags"]}[TAG_BUILD] == TAGS[TAG_BUILD]


def test_without_ssh_cidr_a_private_build_admits_its_vpc_and_a_public_one_is_refused(moto):  # noqa: F811
    private = EC2Cloud(REGION, endpoint_url=moto, ssh_interface="private", poll_seconds=0.2)
    group_id = private.open_ports("kiln-private", [22], TAGS)
    [vpc] = private.ec2().describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    [group] = private.ec2().describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    assert group["IpPermissions"][0]["IpRanges"][0]["CidrIp"] == vpc["CidrBlock"]

    public = EC2Cloud(REGION, endpoint_url=moto, poll_seconds=0.2)
    with pytest.raises(CloudError, match="no ssh_cidr"):
        public.open_ports("kiln-public", [22], TAGS)
    groups = public.ec2().describe_security_groups()["SecurityGroups"]
    assert "kiln-public" not in [group["GroupName"] for group in groups]  # refused before anything was created


@pytest.fixture
def public_ip_answer():
    """A local HTTP server standing in for checkip.amazonaws.com: answers what the test puts in `answer`."""
    answer = {"text": "198.51.100.7\n", "hits": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            answer["hits"] += 1
            body = answer["text"].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    answer["url"] = f"http://127.0.0.1:{server.server_address[1]}/"
    yield answer
    server.shutdown()
    server.server_close()


def _ingress(ec2: EC2Cloud, group_id: str) -> list[tuple[int, list[str], list[str]]]:
    [group] = ec2.ec2().describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    return sorted((p["FromPort"], [r["CidrIp"] for r in p.get("IpRanges", [])],
                   [r["CidrIpv6"] for r in p.get("Ipv6Ranges", [])]) for p in group["IpPermissions"])


def test_ssh_cidr_auto_opens_the_ports_to_this_machines_public_address_only(moto, public_ip_answer,  # noqa: F811
                                                                            monkeypatch):
    target = EC2Target(region=REGION, base=BaseSpec(image="ami-1"), ssh_cidr="auto", endpoint_url=moto,
                       public_ip_url=public_ip_answer["url"])
    ec2 = EC2Cloud.from_target(target)
    ec2.poll_seconds = 0.2

    first = ec2.open_ports("kiln-auto-build", [22, 80], TAGS)
    second = ec2.open_ports("kiln-auto-verify", [22], TAGS)

    assert _ingress(ec2, first) == [(22, ["198.51.100.7/32"], []), (80, ["198.51.100.7/32"], [])]
    assert _ingress(ec2, second) == [(22, ["198.51.100.7/32"], [])]
    assert public_ip_answer["hits"] == 1  # looked up once per build
    monkeypatch.setenv("KILN_PUBLIC_IP_URL", public_ip_answer["url"])  # the setting, when the recipe names none
    public_ip_answer["text"] = "2001:db8::7"
    from_setting = EC2Cloud(REGION, endpoint_url=moto, ssh_cidr="auto", poll_seconds=0.2)
    group = from_setting.open_ports("kiln-auto-v6", [22], TAGS)
    assert _ingress(from_setting, group) == [(22, [], ["2001:db8::7/128"])]


@pytest.mark.parametrize("answer, message", [("0.0.0.0", "unspecified"), ("<html>busy</html>", "not an IP address")])
def test_ssh_cidr_auto_refuses_an_answer_that_is_no_address(moto, public_ip_answer, answer, message):  # noqa: F811
    public_ip_answer["text"] = answer
    ec2 = EC2Cloud(REGION, endpoint_url=moto, ssh_cidr="auto", public_ip_url=public_ip_answer["url"], poll_seconds=0.2)
    with pytest.raises(CloudError, match=message):
        ec2.open_ports("kiln-auto", [22], TAGS)


def test_an_ipv6_ssh_cidr_is_sent_as_an_ipv6_range(moto):  # noqa: F811
    ec2 = EC2Cloud(REGION, endpoint_url=moto, ssh_cidr="2001:db8:1::/48", poll_seconds=0.2)
    assert _ingress(ec2, ec2.open_ports("kiln-v6", [22], TAGS)) == [(22, [], ["2001:db8:1::/48"])]


def refuse(ec2: EC2Cloud, operation: str, code: str, region: str = REGION) -> None:
    """Make EC2 answer one operation with an error, as AWS does when it refuses (moto would accept)."""
    ec2.ec2(region).meta.events.register(
        f"before-call.ec2.{operation}",
        lambda **_: (SimpleNamespace(status_code=400), {"Error": {"Code": code, "Message": f"{operation} refused"}}),
    )


def test_a_failed_ingress_rule_deletes_the_group_it_was_meant_for(ec2):
    refuse(ec2, "AuthorizeSecurityGroupIngress", "RulesPerSecurityGroupLimitExceeded")
    with pytest.raises(botocore.exceptions.ClientError, match="RulesPerSecurityGroupLimitExceeded"):
        ec2.open_ports("kiln-01234567-build", [22], TAGS)
    assert ec2.owned() == []


def test_launch_tags_instance_and_volume_and_passes_key_user_data_and_group(ec2, base):
    key, group, instance = launched(ec2, base)

    described = ec2.ec2().describe_instances(InstanceIds=[instance.instance_id])["Reservations"][0]["Instances"][0]
    assert described["State"]["Name"] == "running" and described["KeyName"] == key.name
    assert described["InstanceType"] == "t3.small" and described["ImageId"] == base.image_id
    assert [g["GroupId"] for g in described["SecurityGroups"]] == [group]
    assert {t["Key"]: t["Value"] for t in described["Tags"]}[TAG_BUILD] == TAGS[TAG_BUILD]
    user_data = ec2.ec2().describe_instance_attribute(InstanceId=instance.instance_id, Attribute="userData")
    assert base64.b64decode(user_data["UserData"]["Value"]).decode() == "#cloud-config\n"
    volumes = ec2.ec2().describe_volumes(Filters=[{"Name": "attachment.instance-id",
                                                   "Values": [instance.instance_id]}])["Volumes"]  # fmt: skip
    assert volumes and all({t["Key"]: t["Value"] for t in v["Tags"]}[TAG_BUILD] == TAGS[TAG_BUILD] for v in volumes)
    assert ec2.endpoint(instance, 22) == (described["PublicIpAddress"], 22)
    assert instance.ssh_user == "ec2-user" and instance.details["region"] == REGION


def test_subnet_and_private_interface_reach_ssh_on_the_private_address(moto, base):  # noqa: F811
    probe = EC2Cloud(REGION, endpoint_url=moto)
    vpc = probe.ec2().create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnet = probe.ec2().create_subnet(VpcId=vpc, CidrBlock="10.20.1.0/24")["Subnet"]["SubnetId"]
    ec2 = EC2Cloud(REGION, endpoint_url=moto, subnet_id=subnet, ssh_interface="private", poll_seconds=0.2)

    _, group, instance = launched(ec2, base)

    described = ec2.ec2().describe_instances(InstanceIds=[instance.instance_id])["Reservations"][0]["Instances"][0]
    assert described["SubnetId"] == subnet and described["VpcId"] == vpc
    assert ec2.ec2().describe_security_groups(GroupIds=[group])["SecurityGroups"][0]["VpcId"] == vpc
    host, port = ec2.endpoint(instance, 22)
    assert host == described["PrivateIpAddress"] and host.startswith("10.20.1.") and port == 22
    [rule] = ec2.ec2().describe_security_groups(GroupIds=[group])["SecurityGroups"][0]["IpPermissions"][:1]
    assert rule["IpRanges"][0]["CidrIp"] == "10.20.0.0/16"


def test_disk_size_sets_the_root_volume_of_the_base_image(moto, base):  # noqa: F811
    ec2 = EC2Cloud(REGION, endpoint_url=moto, ssh_cidr=CIDR, disk_size_gb=24, instance_type="t3.micro",
                   poll_seconds=0.2)  # fmt: skip

    _, _, instance = launched(ec2, base)

    described = ec2.ec2().describe_instances(InstanceIds=[instance.instance_id])["Reservations"][0]["Instances"][0]
    [root] = [m for m in described["BlockDeviceMappings"] if m["DeviceName"] == base.details["root_device_name"]]
    [volume] = ec2.ec2().describe_volumes(VolumeIds=[root["Ebs"]["VolumeId"]])["Volumes"]
    assert volume["Size"] == 24 and described["InstanceType"] == "t3.micro"


def test_console_output_is_decoded_whether_base64_or_text(ec2, base):
    _, _, instance = launched(ec2, base)
    assert "Linux version" in ec2.console(instance)  # moto sends base64, as EC2 does
    text = "ec2: SHA256:abc ed25519 host key\nlogin: "
    assert decode_console(base64.b64encode(text.encode()).decode()) == text
    assert decode_console(text) == text
    assert decode_console(None) == ""


def test_host_key_fingerprints_are_read_from_the_base64_console_ec2_returns(ec2, base):
    from clouds.ssh import host_key_fingerprints_from_console

    _, _, instance = launched(ec2, base)
    console = (
        "[   12.3] cloud-init[612]: Cloud-init v. 23.1 running 'modules:final'\n"
        "ec2: #############################################################\n"
        "ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----\n"
        "ec2: 256 SHA256:Wq3bB3mUo6GQmUnPp1vO2pD0C2nq8dL0xQm6Jj1kq1c root@ip-10-0-0-5 (ED25519)\n"
        "ec2: -----END SSH HOST KEY FINGERPRINTS-----\n"
        "ec2: #############################################################\n"
    )
    ec2.ec2().meta.events.register(
        "before-call.ec2.GetConsoleOutput",
        lambda **_: (SimpleNamespace(status_code=200), {"InstanceId": instance.instance_id,
                                                         "Output": base64.b64encode(console.encode()).decode()}),
    )  # fmt: skip

    text = ec2.console(instance)

    assert text == console
    assert host_key_fingerprints_from_console(text) == ["SHA256:Wq3bB3mUo6GQmUnPp1vO2pD0C2nq8dL0xQm6Jj1kq1c"]


# -- stop, snapshot, copies, sharing, deletion ----------------------------------------------------------------------


def test_snapshot_stops_then_makes_a_tagged_ami_whose_snapshots_are_tagged(ec2, base):
    _, _, instance = launched(ec2, base)
    with pytest.raises(CloudError, match="stop it before the snapshot"):
        ec2.snapshot(instance, "too-early", TAGS, [])

    stopped = ec2.stop(instance, timeout=30)
    image = ec2.snapshot(instance, "hello-1.0.0-01234567", TAGS, ["qcow2"])

    assert stopped.forced is False
    [described] = ec2.ec2().describe_images(ImageIds=[image.image_id])["Images"]
    assert described["State"] == "available" and described["Name"] == "hello-1.0.0-01234567"
    assert {t["Key"]: t["Value"] for t in described["Tags"]} == {**TAGS, "Name": image.name}
    snapshots = ec2.ec2().describe_snapshots(SnapshotIds=image.details["snapshots"])["Snapshots"]
    assert snapshots and all({t["Key"]: t["Value"] for t in s["Tags"]}[TAG_BUILD] == TAGS[TAG_BUILD] for s in snapshots)
    assert image.region == REGION and image.cloud == "ec2"


def test_delete_image_deregisters_and_deletes_its_snapshots_and_is_idempotent(ec2, base):
    image = built_image(ec2, base)
    snapshots = image.details["snapshots"]

    ec2.delete_image(ImageRef("ec2", image.image_id, "", REGION))
    ec2.delete_image(ImageRef("ec2", image.image_id, "", REGION))

    assert ec2.ec2().describe_images(Owners=["self"])["Images"] == []
    remaining = {s["SnapshotId"] for s in ec2.ec2().describe_snapshots(OwnerIds=["self"])["Snapshots"]}
    assert not remaining & set(snapshots)


def test_revoke_tags_the_ami_and_its_snapshots_and_deprecates_it_from_the_next_minute(ec2, base):
    image = built_image(ec2, base)
    deprecations: list[dict] = []

    def answer_deprecation(**_: object) -> tuple[object, dict]:
        # moto has no EnableImageDeprecation: answer that one call, as EC2 does, before it leaves the client.
        return SimpleNamespace(status_code=200), {"Return": True, "ResponseMetadata": {"HTTPStatusCode": 200}}

    events = ec2.ec2().meta.events
    events.register("provide-client-params.ec2.EnableImageDeprecation", lambda params, **_: deprecations.append(params))
    events.register("before-call.ec2.EnableImageDeprecation", answer_deprecation)
    before = dt.datetime.now(dt.UTC)
    ec2.revoke_image(ImageRef("ec2", image.image_id, "", REGION), "CVE-2026-1234 " + "x" * 300)

    described = ec2.ec2().describe_images(ImageIds=[image.image_id])["Images"][0]
    tags = {tag["Key"]: tag["Value"] for tag in described["Tags"]}
    assert tags["kiln:status"] == "revoked"
    assert tags["kiln:revoked-reason"].startswith("CVE-2026-1234 ") and len(tags["kiln:revoked-reason"]) == 256
    for snapshot in image.details["snapshots"]:
        found = ec2.ec2().describe_snapshots(SnapshotIds=[snapshot])["Snapshots"][0]
        assert {"Key": "kiln:status", "Value": "revoked"} in found["Tags"]
    assert len(deprecations) == 1 and deprecations[0]["ImageId"] == image.image_id
    deprecate_at = deprecations[0]["DeprecateAt"]
    assert deprecate_at > before and deprecate_at.second == 0
    assert deprecate_at - before <= dt.timedelta(minutes=1)


def plan_on(ec2: EC2Cloud) -> BuildPlan:
    """A build of recipes/hello.yaml on this cloud, as far as the register stage's ledger needs one."""
    recipe = load_recipe(REPO / "recipes/hello.yaml")
    git = gitinfo.capture(recipe.path, recipe.referenced_files())
    version = store.record_recipe_version(name=recipe.name, version=recipe.version, fingerprint=recipe.fingerprint(),
                                          recipe_json=json.dumps(recipe.model_dump(mode="json"), sort_keys=True),
                                          git=git)  # fmt: skip
    build_id = store.start_build(recipe_version_id=version, target="ec2", cloud="ec2", region=REGION, trigger="test")
    return BuildPlan(build_id=build_id, recipe=recipe, target_name="ec2", git=git, recipe_version_id=version,
                     cloud=ec2)


def test_replicate_copies_to_each_region_with_tags_and_shares_every_copy_and_its_snapshots(ec2, base):
    image = built_image(ec2, base)
    image_tags = {**TAGS, TAG_ROLE: "image"}
    ec2.share_with = ["111122223333", "444455556666"]

    copies = replicate(plan_on(ec2), image, image_tags, step_log=lambda line: None)

    [copy] = copies
    assert copy.region == OTHER and copy.name == image.name
    [described] = ec2.ec2(OTHER).describe_images(ImageIds=[copy.image_id])["Images"]
    assert described["State"] == "available"
    assert {t["Key"]: t["Value"] for t in described["Tags"]} == {**image_tags, "Name": image.name}
    for each in (image, copy):
        assert ec2.launch_permissions(each) == ["111122223333", "444455556666"]
        snapshots = ec2.volume_permissions(each)  # so the accounts can copy the AMI, not only launch it
        assert snapshots and all(accounts == ["111122223333", "444455556666"] for accounts in snapshots.values())
    copy_snapshots = ec2.ec2(OTHER).describe_snapshots(SnapshotIds=copy.details["snapshots"])["Snapshots"]
    assert all({t["Key"]: t["Value"] for t in s["Tags"]}[TAG_ROLE] == "image" for s in copy_snapshots)


def test_a_failed_share_deletes_the_copies_already_made(ec2, base):
    image = built_image(ec2, base)
    ec2.share_with = ["not-an-account"]
    plan = plan_on(ec2)

    with pytest.raises(botocore.exceptions.ClientError, match="userId"):
        replicate(plan, image, TAGS, step_log=lambda line: None)
    assert release_open(plan) == []  # what a failed build does: the copies were ledgered as they were made

    assert ec2.ec2(OTHER).describe_images(Owners=["self"])["Images"] == []
    assert [r.kind for r in ec2.owned() if r.region == OTHER] == []


# -- ownership and release -------------------------------------------------------------------------------


def test_owned_lists_every_kiln_resource_in_every_region_and_release_removes_them(ec2, base):
    image = built_image(ec2, base)  # its instance, key pair and group stay, as after a killed build
    ec2.copy_image(image, OTHER, TAGS)
    untagged = ec2.ec2().create_security_group(GroupName="not-kiln", Description="someone else's")["GroupId"]

    found = ec2.owned()

    assert kinds(found) == {"instance": 1, "keypair": 1, "security-group": 1, "image": 2, "snapshot": 2}
    assert {r.region for r in found if r.kind == "image"} == {REGION, OTHER}
    assert untagged not in {r.resource_id for r in found}
    assert ec2.owned({TAG_BUILD: "someone-else"}) == []
    for resource in sorted(found, key=lambda r: ["instance", "image", "snapshot", "keypair",
                                                 "security-group"].index(r.kind)):  # fmt: skip
        ec2.release(resource)
        ec2.release(resource)  # gone already is success
    assert ec2.owned() == []


def test_security_group_deletion_waits_out_dependency_violation(ec2, base):
    group = ec2.open_ports("kiln-01234567-build", [22], TAGS)
    refusals = []

    def still_in_use(**kwargs):
        if len(refusals) < 3:
            refusals.append(time.monotonic())
            return SimpleNamespace(status_code=400), {
                "Error": {"Code": "DependencyViolation", "Message": f"resource {group} has a dependent object"}
            }
        return None

    ec2.ec2().meta.events.register("before-call.ec2.DeleteSecurityGroup", still_in_use)

    ec2.release(Resource("ec2", "security-group", group, region=REGION))

    assert len(refusals) == 3
    assert ec2.owned() == []


def test_security_group_deletion_gives_up_after_its_timeout(moto):  # noqa: F811
    ec2 = EC2Cloud(REGION, endpoint_url=moto, ssh_cidr=CIDR, poll_seconds=0.2, group_delete_timeout=1)
    group = ec2.open_ports("kiln-01234567-build", [22], TAGS)
    refuse(ec2, "DeleteSecurityGroup", "DependencyViolation")
    with pytest.raises(botocore.exceptions.ClientError, match="DependencyViolation"):
        ec2.release(Resource("ec2", "security-group", group, region=REGION))


def test_terminated_instance_is_no_longer_owned(ec2, base):
    _, _, instance = launched(ec2, base)
    ec2.terminate(instance)
    ec2.terminate(instance)
    assert [r for r in ec2.owned() if r.kind == "instance"] == []


# -- publishing a local build ------------------------------------------------------------------------------


def _imported_snapshot(ec2: EC2Cloud) -> str:
    """The snapshot VM Import would produce (moto has no import_snapshot): a real one in moto."""
    volume = ec2.ec2().create_volume(Size=1, AvailabilityZone=f"{REGION}a")["VolumeId"]
    return ec2.ec2().create_snapshot(VolumeId=volume, Description="imported")["SnapshotId"]


def _stub_import(
    ec2: EC2Cloud, bucket: str, statuses: list[dict], tags: dict[str, str] = TAGS, name: str = "hello-1.0.0"
) -> Stubber:
    """VM Import's answers (moto has no import_snapshot): the task, then each status the poll reads in turn."""
    stubber = Stubber(ec2.vm_import_client())
    stubber.add_response(
        "import_snapshot",
        {"ImportTaskId": "import-snap-0123456789abcdef0"},
        {
            "Description": f"kiln {name}",
            "DiskContainer": {"Description": name, "Format": "RAW",
                              "UserBucket": {"S3Bucket": bucket, "S3Key": ANY}},
            "ClientToken": ANY,
            "TagSpecifications": [{"ResourceType": "import-snapshot-task",
                                   "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
        },
    )  # fmt: skip
    for detail in statuses:
        stubber.add_response(
            "describe_import_snapshot_tasks",
            {"ImportSnapshotTasks": [{"ImportTaskId": "import-snap-0123456789abcdef0", "SnapshotTaskDetail": detail}]},
            {"ImportTaskIds": ["import-snap-0123456789abcdef0"]},
        )
    return stubber


@pytest.fixture
def bucket(ec2: EC2Cloud) -> str:
    ec2.client("s3").create_bucket(Bucket="kiln-imports")
    return "kiln-imports"


def test_publish_uploads_imports_and_registers_a_tagged_ami_and_removes_the_upload(ec2, bucket, tmp_path):
    disk = tmp_path / "hello.raw"
    disk.write_bytes(b"\0" * 1024 * 1024)
    snapshot_id = _imported_snapshot(ec2)
    stubber = _stub_import(ec2, bucket, [
        {"Status": "active", "Progress": "40"},
        {"Status": "completed", "SnapshotId": snapshot_id},
    ])  # fmt: skip
    lines: list[str] = []

    with stubber:
        image = publish_disk(ec2, disk, bucket=bucket, name="hello-1.0.0", tags=TAGS, progress=lines.append)

    stubber.assert_no_pending_responses()
    [described] = ec2.ec2().describe_images(ImageIds=[image.image_id])["Images"]
    assert described["State"] == "available" and described["Name"] == "hello-1.0.0"
    assert {t["Key"]: t["Value"] for t in described["Tags"]} == {**TAGS, "Name": "hello-1.0.0"}
    [snapshot] = ec2.ec2().describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
    assert {t["Key"]: t["Value"] for t in snapshot["Tags"]}[TAG_BUILD] == TAGS[TAG_BUILD]
    assert ec2.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert any("uploading" in line for line in lines) and any(image.image_id in line for line in lines)


def test_a_failed_import_leaves_no_upload_and_no_image(ec2, bucket, tmp_path):
    disk = tmp_path / "hello.raw"
    disk.write_bytes(b"\0" * 4096)
    failed = {"Status": "deleted", "StatusMessage": "ClientError: Disk validation failed"}
    stubber = _stub_import(ec2, bucket, [failed, failed])  # the poll, then the release reading the task

    with stubber, pytest.raises(CloudError, match="Disk validation failed"):
        publish_disk(ec2, disk, bucket=bucket, name="hello-1.0.0", tags=TAGS)

    assert ec2.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert ec2.ec2().describe_images(Owners=["self"])["Images"] == []


def test_a_failed_registration_deletes_the_imported_snapshot(ec2, bucket, tmp_path):
    disk = tmp_path / "hello.raw"
    disk.write_bytes(b"\0" * 4096)
    snapshot_id = _imported_snapshot(ec2)
    stubber = _stub_import(ec2, bucket, [{"Status": "completed", "SnapshotId": snapshot_id}])

    with stubber, pytest.raises(ValueError, match="boot_mode"):
        publish_disk(ec2, disk, bucket=bucket, name="hello-1.0.0", tags=TAGS, boot_mode="bios")
    refuse(ec2, "RegisterImage", "InvalidBlockDeviceMapping")
    with stubber, pytest.raises(botocore.exceptions.ClientError, match="InvalidBlockDeviceMapping"):
        publish_disk(ec2, disk, bucket=bucket, name="hello-1.0.0", tags=TAGS)

    assert ec2.ec2().describe_snapshots(Filters=[{"Name": "snapshot-id", "Values": [snapshot_id]}])["Snapshots"] == []
    assert ec2.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_an_import_that_times_out_is_cancelled_and_its_ledger_rows_closed(ec2, bucket, tmp_path):
    disk = tmp_path / "hello.raw"
    disk.write_bytes(b"\0" * 4096)
    active = {"Status": "active", "Progress": "10"}
    stubber = _stub_import(ec2, bucket, [active, active])  # the poll (past its deadline), then the release
    stubber.add_response("cancel_import_task", {"ImportTaskId": "import-snap-0123456789abcdef0"},
                         {"ImportTaskId": "import-snap-0123456789abcdef0"})  # fmt: skip
    ledger = RecordingLedger()

    with stubber, pytest.raises(CloudError, match="not done within 0s"):
        publish_disk(ec2, disk, bucket=bucket, name="hello-1.0.0", tags=TAGS, timeout=0, ledger=ledger)

    stubber.assert_no_pending_responses()
    assert ledger.events == [
        ("intent", "object"), ("created", "object"), ("intent", "import-task"),
        ("created", "import-task"), ("released", "import-task"), ("released", "object"),
    ]  # fmt: skip
    assert ec2.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0


class RecordingLedger:
    """publish_disk's ledger, as a list of what was written in which order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def intent(self, kind: str, name: str) -> str:
        self.events.append(("intent", kind))
        return kind

    def created(self, handle: str, cloud_id: str) -> None:
        self.events.append(("created", handle))

    def released(self, handle: str) -> None:
        self.events.append(("released", handle))


def test_boot_mode_is_read_from_the_disk_legacy_bios_for_mbr_uefi_for_gpt_with_an_esp(tmp_path):
    mbr, gpt = tmp_path / "mbr.raw", tmp_path / "gpt.raw"
    for disk in (mbr, gpt):
        with disk.open("wb") as handle:
            handle.truncate(64 << 20)
    subprocess.run(["sfdisk", "-q", str(mbr)], input="label: dos\n,,L,*\n", text=True, check=True)
    subprocess.run(["sfdisk", "-q", str(gpt)], input="label: gpt\n,32M,U\n,,L\n", text=True, check=True)

    assert boot_mode_of(mbr) == "legacy-bios"
    assert boot_mode_of(gpt) == "uefi"


def local_build_row(disk: Path) -> tuple[str, int, str]:
    """A local image as kiln records it after a build: (image id, row id, build id), with a real build row."""
    recipe = load_recipe(REPO / "recipes/hello.yaml")
    version = store.record_recipe_version(
        name=recipe.name, version=recipe.version, fingerprint=recipe.fingerprint(),
        recipe_json=json.dumps(recipe.model_dump(mode="json"), sort_keys=True),
        git=gitinfo.capture(recipe.path, recipe.referenced_files()),
    )  # fmt: skip
    build_id = store.start_build(recipe_version_id=version, target="local", cloud="local", trigger="test")
    image_id = f"img-{uuid.uuid4().hex[:12]}"
    tags = {TAG_BUILD: build_id, "kiln:recipe": "hello", TAG_ROLE: "image"}
    row_id = store.record_image(
        cloud="local", image_id=image_id, name="hello-1.0.0", format="qcow2", size=disk.stat().st_size,
        sha256=hashlib.sha256(disk.read_bytes()).hexdigest(), path=str(disk), kind="built", tags=tags,
        build_id=build_id,
    )  # fmt: skip
    store.finish_build(build_id, "succeeded")
    return image_id, row_id, build_id


@pytest.fixture
def local_qcow2(tmp_path: Path) -> Path:
    raw = tmp_path / "disk.raw"
    subprocess.run(["truncate", "-s", "8M", str(raw)], check=True)
    subprocess.run(["sfdisk", "-q", str(raw)], input="label: dos\n,,L,*\n", text=True, check=True)
    path = tmp_path / "hello-1.0.0.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)], check=True)
    return path


def test_publish_image_to_ec2_registers_a_shared_ami_recorded_as_the_same_bits_as_the_local_image(
    ec2, bucket, local_qcow2
):
    local_id, local_row, build_id = local_build_row(local_qcow2)
    ec2.share_with = ["111122223333"]
    published_tags = {TAG_BUILD: build_id, "kiln:recipe": "hello", TAG_ROLE: "published"}
    snapshot_id = _imported_snapshot(ec2)
    stubber = _stub_import(ec2, bucket, [{"Status": "completed", "SnapshotId": snapshot_id}], published_tags)

    registered: list[dict] = []  # moto ignores BootMode (it reports its own default): read what kiln sent
    ec2.ec2().meta.events.register("provide-client-params.ec2.RegisterImage",
                                   lambda params, **_: registered.append(dict(params)))  # fmt: skip

    with stubber:
        publication = publish_image(local_id, ec2, bucket=bucket)

    rows = {s.image.image_id: s.image for s in lineage.find_image(publication.image_id)}
    published = rows[publication.image_id]
    assert (published.kind, published.cloud, published.region) == ("published", "ec2", REGION)
    assert published.parent_id == local_row and published.build_id == build_id
    assert published.sha256 == hashlib.sha256(local_qcow2.read_bytes()).hexdigest() == publication.sha256
    [described] = ec2.ec2().describe_images(ImageIds=[publication.image_id])["Images"]
    assert [call["BootMode"] for call in registered] == ["legacy-bios"]  # read from the disk's MBR
    assert {t["Key"]: t["Value"] for t in described["Tags"]} == {**published_tags, "Name": "hello-1.0.0"}
    ref = ImageRef("ec2", publication.image_id, "", REGION)
    assert ec2.launch_permissions(ref) == ["111122223333"]
    assert list(ec2.volume_permissions(ref).values()) == [["111122223333"]]
    assert ec2.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert store.open_resources(build_id) == []
    kinds_ledgered = [r.kind for r in _ledger_rows(build_id)]
    assert sorted(kinds_ledgered) == ["import-task", "object"]


def _ledger_rows(build_id: str) -> list:
    from sqlmodel import Session, select

    from provenance.models import Resource as LedgerRow

    with Session(store.engine()) as session:
        return list(session.exec(select(LedgerRow).where(LedgerRow.build_id == build_id)).all())


def test_kiln_publish_to_ec2_prints_the_ami_and_exits_2_without_a_bucket_or_for_an_unknown_image(
    ec2, bucket, local_qcow2, monkeypatch
):
    from typer.testing import CliRunner

    from kiln.cli import app

    local_id, _, build_id = local_build_row(local_qcow2)
    published_tags = {TAG_BUILD: build_id, "kiln:recipe": "hello", TAG_ROLE: "published"}
    snapshot_id = _imported_snapshot(ec2)
    stubber = _stub_import(ec2, bucket, [{"Status": "completed", "SnapshotId": snapshot_id}], published_tags)
    monkeypatch.setattr(EC2Cloud, "vm_import_client", lambda self, region=None: stubber.client)
    runner = CliRunner()
    common = ["--to", "ec2", "--region", REGION, "--endpoint-url", ec2.endpoint_url]

    no_bucket = runner.invoke(app, ["publish", local_id, *common])
    unknown = runner.invoke(app, ["publish", "img-000000000000", *common, "--bucket", bucket])
    with stubber:
        done = runner.invoke(app, ["publish", local_id, *common, "--bucket", bucket, "--share", "111122223333",
                                   "--json"])  # fmt: skip

    assert no_bucket.exit_code == 2 and "--bucket is required" in no_bucket.output
    assert unknown.exit_code == 2 and "no local image with this id" in unknown.output
    assert done.exit_code == 0, done.output
    publication = json.loads(done.stdout)
    assert publication["cloud"] == "ec2" and publication["source_image_id"] == local_id
    assert publication["shared_with"] == ["111122223333"]
    assert ec2.ec2().describe_images(ImageIds=[publication["image_id"]])["Images"][0]["State"] == "available"


# -- the target ---------------------------------------------------------------------------------------------


def test_open_cloud_builds_the_ec2_backend_from_the_target_and_recipe_timeouts(moto):  # noqa: F811
    target = EC2Target(region="eu-central-1", profile=None, endpoint_url=moto, instance_type="t3.micro",
                       regions=["eu-central-1", "us-west-2"], share_with=["111122223333"], ssh_cidr="198.51.100.0/24",
                       base=BaseSpec(ssm_parameter=SSM_AL2023))  # fmt: skip

    cloud = open_cloud(target, Timeouts(boot=120, image=7200))

    assert isinstance(cloud, EC2Cloud) and cloud.name == "ec2"
    assert (cloud.region, cloud.regions, cloud.share_with) == ("eu-central-1", ["us-west-2"], ["111122223333"])
    assert (cloud.boot_timeout, cloud.image_timeout, cloud.instance_type) == (120, 7200, "t3.micro")
    assert cloud.resolve_base(target.base, "ec2-user").region == "eu-central-1"


def test_waits_time_out_with_a_message_naming_the_wait(ec2, base):
    _, _, instance = launched(ec2, base)
    started = dt.datetime.now()
    with pytest.raises(CloudError, match="instance_stopped not reached within 1s"):
        ec2._wait("instance_stopped", 1, InstanceIds=[instance.instance_id])
    assert (dt.datetime.now() - started).total_seconds() < 10
