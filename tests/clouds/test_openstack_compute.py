"""OpenStackCloud's Nova and Neutron calls (servers, key pairs, security groups, floating IPs, server images)
through openstacksdk's ConnectionFixture and requests-mock: the exact calls, and cleanup on success and failure."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import openstack.config
import openstack.connection
import pytest
import requests_mock
from openstack.fixture.connection import ConnectionFixture

from clouds.base import TAG_BUILD, TAG_COMMIT, TAG_RECIPE, BaseImage, CloudError, Instance, KeyPair, Resource
from clouds.openstack import OpenStackCloud
from tests.clouds.openstack_fake import FakeOpenStack, user_data_of

BUILDER_CIDR = "198.51.100.7/32"


@pytest.fixture
def build_id() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def tags(build_id: str) -> dict[str, str]:
    return {TAG_BUILD: build_id, TAG_RECIPE: "compute-tests", TAG_COMMIT: "abc123"}


@pytest.fixture
def fake() -> Iterator[FakeOpenStack]:
    """The fake Nova/Neutron/Glance behind requests-mock; any other address fails the test (no real HTTP)."""
    fixture = ConnectionFixture(project_id="kiln-project")
    fixture.setUp()
    state = FakeOpenStack(
        compute_url="https://compute.example.com/v2.1/",
        network_url="https://network.example.com",
        image_url="https://image.example.com",
    )
    with requests_mock.Mocker() as mocker:
        mocker.post("https://identity.example.com/v3/auth/tokens", json=fixture.v3_token,
                    headers={"X-Subject-Token": "kiln-test-token"}, status_code=201)
        state.register(mocker)
        yield state
    fixture.cleanUp()


def connection() -> openstack.connection.Connection:
    loader = openstack.config.OpenStackConfig(load_yaml_config=False, load_envvars=False)
    region = loader.get_one(
        auth_type="v3password",
        auth={"auth_url": "https://identity.example.com/v3", "username": "kiln", "password": "not-real",
              "project_id": "kiln-project", "user_domain_id": "default"},
        region_name="RegionOne",
    )
    return openstack.connection.Connection(config=region)


def make_cloud(**options: object) -> OpenStackCloud:
    settings = {"flavor": "m1.small", "network": "private", "ssh_cidr": BUILDER_CIDR, "boot_timeout": 30,
                "image_timeout": 30, **options}
    return OpenStackCloud("fake", connection=connection(), **settings)  # type: ignore[arg-type]


BASE = BaseImage(cloud="openstack", image_id="base-image-id", digest="sha512:00", ssh_user="ubuntu", name="base")


def launch(cloud: OpenStackCloud, tags: dict[str, str], ports: list[int]) -> tuple[Instance, KeyPair, str]:
    """What the launch stage does: key pair, security group, server."""
    key = KeyPair.generate(f"kiln-{tags[TAG_BUILD][:8]}-build")
    assert cloud.import_key(key, tags) == key.name
    firewall = cloud.open_ports(key.name, ports, tags)
    assert firewall is not None
    instance = cloud.launch(BASE, key, "#cloud-config\nusers: []\n", tags, ports, role="build", firewall=firewall)
    return instance, key, firewall


def test_launch_imports_the_key_opens_ports_to_the_builder_and_boots_tagged(
    fake: FakeOpenStack, tags: dict[str, str]
) -> None:
    cloud = make_cloud()
    instance, key, firewall = launch(cloud, tags, [22, 80])
    writes = [call for call in fake.calls if call[0] != "GET"]
    assert writes == [
        ("POST", "compute:/v2.1/os-keypairs"),
        ("POST", "network:/v2.0/security-groups"),
        ("PUT", f"network:/v2.0/security-groups/{firewall}/tags"),
        ("POST", "network:/v2.0/security-group-rules"),
        ("POST", "network:/v2.0/security-group-rules"),
        ("POST", "compute:/v2.1/servers"),
    ]
    assert fake.keypairs[key.name]["public_key"] == key.public_key
    rules = sorted((r["port_range_min"], r["port_range_max"], r["protocol"], r["remote_ip_prefix"], r["direction"])
                   for r in fake.rules.values())
    assert rules == [(22, 22, "tcp", BUILDER_CIDR, "ingress"), (80, 80, "tcp", BUILDER_CIDR, "ingress")]
    assert sorted(fake.security_groups[firewall]["tags"]) == sorted(f"{k}={v}" for k, v in tags.items())
    server = fake.servers[instance.instance_id]
    assert server.body["imageRef"] == "base-image-id"
    assert server.body["flavorRef"] == "f-small"
    assert server.body["networks"] == [{"uuid": "net-private"}]
    assert server.body["key_name"] == key.name
    assert server.body["security_groups"] == [{"name": firewall}]
    assert server.body["metadata"] == tags
    assert user_data_of(server) == "#cloud-config\nusers: []\n"
    assert (instance.ssh_user, instance.tags) == ("ubuntu", tags)
    assert cloud.endpoint(instance, 22) == ("10.0.0.5", 22)
    assert cloud.endpoint(instance, 80) == ("10.0.0.5", 80)


def test_released_in_reverse_order_nothing_is_left(fake: FakeOpenStack, tags: dict[str, str]) -> None:
    cloud = make_cloud()
    instance, key, firewall = launch(cloud, tags, [22])
    for kind, rid in (("instance", instance.instance_id), ("security-group", firewall), ("keypair", key.name)):
        cloud.release(Resource("openstack", kind, rid))
    assert fake.leftovers() == {}
    deletes = [call for call in fake.calls if call[0] == "DELETE"]
    assert deletes == [
        ("DELETE", f"compute:/v2.1/servers/{instance.instance_id}"),
        ("DELETE", f"network:/v2.0/security-groups/{firewall}"),
        ("DELETE", f"compute:/v2.1/os-keypairs/{key.name}"),
    ]
    # the server was gone (404 on GET) before its security group was deleted
    after_delete = fake.calls[fake.calls.index(deletes[0]) + 1:fake.calls.index(deletes[1])]
    assert ("GET", f"compute:/v2.1/servers/{instance.instance_id}") in after_delete
    for kind, rid in (("instance", instance.instance_id), ("security-group", firewall), ("keypair", key.name)):
        cloud.release(Resource("openstack", kind, rid))  # gone already is success


def test_a_floating_ip_is_attached_for_ssh_and_released_with_the_server(
    fake: FakeOpenStack, tags: dict[str, str]
) -> None:
    cloud = make_cloud(floating_ip=True)
    instance, key, firewall = launch(cloud, tags, [22])
    (floating,) = fake.floating_ips.values()
    assert floating["floating_network_id"] == "net-public"
    assert floating["port_id"] in fake.ports
    assert sorted(floating["tags"]) == sorted(f"{k}={v}" for k, v in tags.items())
    assert cloud.endpoint(instance, 22) == ("203.0.113.10", 22)
    cloud.release(Resource("openstack", "instance", instance.instance_id))
    assert fake.floating_ips == {} and fake.servers == {}
    deletes = [path for method, path in fake.calls if method == "DELETE"]
    assert deletes[:2] == [f"network:/v2.0/floatingips/{floating['id']}",
                           f"compute:/v2.1/servers/{instance.instance_id}"]


def test_a_server_that_fails_to_boot_is_deleted_before_launch_raises(fake: FakeOpenStack, tags: dict[str, str]) -> None:
    fake.fail_boot = True
    cloud = make_cloud(floating_ip=True)
    key = KeyPair.generate("kiln-failboot-build")
    with pytest.raises(CloudError, match="did not start"):
        cloud.launch(BASE, key, "", tags, [22], firewall=None)
    assert fake.servers == {} and fake.floating_ips == {}
    assert len(fake.calls_matching("DELETE", r"compute:/v2\.1/servers/.*")) == 1


def test_no_external_network_for_the_floating_ip_deletes_the_server(fake: FakeOpenStack, tags: dict[str, str]) -> None:
    fake.networks = [n for n in fake.networks if not n["router:external"]]
    cloud = make_cloud(floating_ip=True)
    with pytest.raises(CloudError, match="no external network"):
        cloud.launch(BASE, KeyPair.generate("kiln-noext-build"), "", tags, [22], firewall=None)
    assert fake.servers == {} and fake.floating_ips == {}


def test_unknown_flavor_or_network_fails_before_any_server(fake: FakeOpenStack, tags: dict[str, str]) -> None:
    with pytest.raises(CloudError, match="flavor: 'm9.huge' is not a flavor of fake"):
        make_cloud(flavor="m9.huge").launch(BASE, KeyPair.generate("kiln-x-build"), "", tags, [22])
    with pytest.raises(CloudError, match="network: 'nowhere' is not a network of fake"):
        make_cloud(network="nowhere").launch(BASE, KeyPair.generate("kiln-x-build"), "", tags, [22])
    assert fake.calls_matching("POST", r"compute:/v2\.1/servers") == []


def test_stop_then_snapshot_makes_an_active_image_with_kiln_properties(
    fake: FakeOpenStack, tags: dict[str, str], build_id: str
) -> None:
    cloud = make_cloud()
    instance, _, _ = launch(cloud, tags, [22])
    result = cloud.stop(instance, timeout=30)
    assert not result.forced
    assert fake.servers[instance.instance_id].status == "SHUTOFF"
    assert cloud.stop(instance, timeout=30).detail == "already stopped"
    image = cloud.snapshot(instance, "web-1.0-abcdef12", tags, ["qcow2", "raw"])
    actions = [body for method, path, body in fake.bodies if path.endswith("/action")]
    assert actions[0] == {"os-stop": None}
    create = next(body["createImage"] for body in actions if body and "createImage" in body)
    assert create["name"] == "web-1.0-abcdef12"
    assert create["metadata"] == {"kiln_build_id": build_id, "kiln_recipe": "compute-tests",
                                  "kiln_commit": "abc123", "kiln_role": "image"}
    stored = fake.images[image.image_id]
    assert stored["status"] == "active" and "kiln" in stored["tags"]
    assert (image.cloud, image.name, image.region, image.files) == ("openstack", "web-1.0-abcdef12", "fake", ())
    cloud.delete_image(image)
    cloud.delete_image(image)
    assert fake.images == {}


def test_snapshot_of_a_running_server_stops_it_first(fake: FakeOpenStack, tags: dict[str, str]) -> None:
    cloud = make_cloud()
    instance, _, _ = launch(cloud, tags, [22])
    cloud.snapshot(instance, "img", tags, ["qcow2"])
    actions = [next(iter(body)) for method, path, body in fake.bodies if path.endswith("/action")]
    assert actions == ["os-stop", "createImage"]


def test_an_image_that_fails_is_deleted_and_the_snapshot_raises(fake: FakeOpenStack, tags: dict[str, str]) -> None:
    fake.image_final_status = "killed"
    cloud = make_cloud()
    instance, _, _ = launch(cloud, tags, [22])
    cloud.stop(instance)
    with pytest.raises(CloudError, match="did not become active"):
        cloud.snapshot(instance, "img", tags, ["qcow2"])
    assert fake.images == {}
    assert len(fake.calls_matching("DELETE", r"image:/v2/images/.*")) == 1


def test_console_is_novas_console_log(fake: FakeOpenStack, tags: dict[str, str]) -> None:
    cloud = make_cloud()
    instance, _, _ = launch(cloud, tags, [22])
    fake.servers[instance.instance_id].console = "-----BEGIN SSH HOST KEY FINGERPRINTS-----\n256 SHA256:abc"
    assert cloud.console(instance).startswith("-----BEGIN SSH HOST KEY FINGERPRINTS-----")
    assert ("POST", f"compute:/v2.1/servers/{instance.instance_id}/action") in fake.calls


def test_owned_finds_every_kind_kiln_made_for_a_build_and_release_removes_it(
    fake: FakeOpenStack, tags: dict[str, str], build_id: str
) -> None:
    cloud = make_cloud(floating_ip=True)
    instance, key, firewall = launch(cloud, tags, [22])
    image = cloud.snapshot(instance, "img", tags, ["qcow2"])
    other_tags = {**tags, TAG_BUILD: uuid.uuid4().hex}
    launch(cloud, other_tags, [22])  # another build's resources must not be listed
    owned = cloud.owned({TAG_BUILD: build_id})
    found = sorted((r.kind, r.resource_id) for r in owned)
    (floating_id,) = [ip["id"] for ip in fake.floating_ips.values() if f"{TAG_BUILD}={build_id}" in ip["tags"]]
    assert found == sorted([
        ("instance", instance.instance_id), ("keypair", key.name), ("security-group", firewall),
        ("floating-ip", floating_id), ("image", image.image_id),
    ])
    tag_queries = [path for method, path in fake.calls if method == "GET" and "security-groups" in path]
    assert tag_queries, "security groups are listed by Neutron tag"
    order = {"instance": 0, "floating-ip": 1, "image": 2, "security-group": 3, "keypair": 4}
    for resource in sorted(owned, key=lambda r: order[r.kind]):
        cloud.release(resource)
    assert cloud.owned({TAG_BUILD: build_id}) == []
    left = fake.leftovers()
    assert len(left["servers"]) == 1 and len(left["keypairs"]) == 1  # the other build's, untouched


def test_release_of_an_unknown_kind_is_an_error(fake: FakeOpenStack) -> None:
    with pytest.raises(CloudError, match="no 'volume' resources"):
        make_cloud().release(Resource("openstack", "volume", "v-1"))


def test_the_builder_cidr_is_required_when_it_cannot_be_worked_out(fake: FakeOpenStack) -> None:
    cloud = make_cloud(ssh_cidr=None)
    try:
        cidr = cloud.builder_cidr()
    except CloudError as exc:
        assert "set ssh_cidr" in str(exc)
    else:
        assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+/32", cidr)
