"""The whole build_image flow on an OpenStack target, and the EGI path: a local build published to Glance.

Keystone and Glance are real (tests.openstack_server). Nova and Neutron are the in-memory fake of
tests.clouds.openstack_fake behind requests-mock, registered in the real Keystone's catalog; its servers are
local QEMU guests booted from the Glance image's own bits, and its createImage uploads the guest's disk to
the real Glance. endpoint() is the one test-only override: a guest's port is reached through QEMU's forward.
Marked vm: each build boots two guests, one at a time."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests_mock

from clouds.base import BaseImage, Instance, KeyPair
from clouds.local import LocalCloud
from clouds.openstack import OpenStackCloud
from core import settings
from provenance import lineage, store
from tests.clouds.openstack_fake import FakeOpenStack, FakeServer, user_data_of
from tests.conftest import REPO
from tests.flows.conftest import committed_recipe
from tests.openstack_server import OpenStackServers, admin_connection, in_catalog

pytest_plugins = ["tests.clouds.openstack_fixtures"]
pytestmark = pytest.mark.vm

NOVA = "http://nova.kiln.test/v2.1"
NEUTRON = "http://neutron.kiln.test"
KILN = Path(sys.executable).with_name("kiln")


@pytest.fixture(scope="module")
def catalog_with_fake_compute(openstack_test_servers: OpenStackServers) -> Iterator[OpenStackServers]:
    """Nova and Neutron in the real Keystone's catalog, at addresses only requests-mock answers; removed after
    this module, so the other modules see a Glance-only cloud."""
    with in_catalog(openstack_test_servers, {"compute": NOVA, "network": NEUTRON}) as servers:
        yield servers


class QemuBackedNova:
    """Hooks that make the fake Nova's servers real local guests and its server images real Glance images."""

    def __init__(self, fake: FakeOpenStack, servers: OpenStackServers, work: Path) -> None:
        self.fake, self.work = fake, work
        self.local = LocalCloud()
        self.glance = admin_connection(servers)
        self.guests: dict[str, Instance] = {}
        self.booted_digests: list[str] = []  # sha512 of every disk a guest booted from, checked against Glance
        fake.on_server_created = self.boot
        fake.on_server_stopped = lambda server: self.local.stop(self.guests[server.id], timeout=120)
        fake.on_server_deleted = lambda server: self.local.terminate(self.guests.pop(server.id))
        fake.on_create_image = self.create_image
        fake.console_for = lambda server: self.local.console(self.guests[server.id])

    def boot(self, server: FakeServer) -> None:
        image_id = server.body["imageRef"]
        disk = self.work / f"{image_id}.qcow2"
        if not disk.exists():
            response = self.glance.image.get(f"/images/{image_id}/file")
            assert response.status_code == 200, f"Glance served HTTP {response.status_code} for {image_id}"
            disk.write_bytes(response.content)
        digest = hashlib.sha512(disk.read_bytes()).hexdigest()
        assert digest == self.glance.image.get_image(image_id).hash_value, "the guest boots Glance's very bits"
        self.booted_digests.append(digest)
        base = BaseImage(cloud="local", image_id=str(disk), digest=digest, ssh_user="debian",
                         details={"path": str(disk), "format": "qcow2"})
        key = KeyPair(name=server.body["key_name"], public_key=self.fake.keypairs[server.body["key_name"]]
                      ["public_key"], private_key="")
        self.guests[server.id] = self.local.launch(base, key, user_data_of(server), server.body.get("metadata", {}),
                                                   self.ports_of(server), role="build")
        server.status = "ACTIVE"

    def ports_of(self, server: FakeServer) -> list[int]:
        groups = {group["name"] for group in server.body.get("security_groups", [])}
        return sorted({rule["port_range_min"] for rule in self.fake.rules.values()
                       if rule["security_group_id"] in groups} | {22})

    def create_image(self, server: FakeServer, name: str, metadata: dict[str, str]) -> str:
        local_image = self.local.snapshot(self.guests[server.id], name, {}, ["qcow2"])
        try:
            image = self.glance.image.create_image(
                name, filename=local_image.files[0].path, disk_format="qcow2", container_format="bare",
                allow_duplicates=True, validate_checksum=False, wait=False, **metadata,
            )  # fmt: skip
        finally:
            self.local.delete_image(local_image)
        return image.id

    def endpoint(self, instance: Instance, port: int) -> tuple[str, int]:
        return self.local.endpoint(self.guests[instance.instance_id], port)

    def close(self) -> None:
        for server_id in list(self.guests):
            self.local.terminate(self.guests.pop(server_id))
        self.glance.close()


@pytest.fixture
def fake_nova(
    catalog_with_fake_compute: OpenStackServers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[FakeOpenStack, QemuBackedNova]]:
    fake = FakeOpenStack(compute_url=NOVA, network_url=NEUTRON, networks=[
        {"id": "net-private", "name": "private", "router:external": False}])
    backing = QemuBackedNova(fake, catalog_with_fake_compute, tmp_path)
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(catalog_with_fake_compute.clouds_yaml))
    monkeypatch.setattr(OpenStackCloud, "endpoint", lambda self, instance, port: backing.endpoint(instance, port))
    with requests_mock.Mocker(real_http=True) as mocker:  # Keystone and Glance on 127.0.0.1 are real
        fake.register(mocker)
        try:
            yield fake, backing
        finally:
            backing.close()


@pytest.fixture
def glance_base(openstack_test_servers: OpenStackServers, bootstrap_base: BaseImage) -> Iterator[str]:
    """The debian-bookworm bootstrap base uploaded to the test Glance; its image id."""
    cloud = OpenStackCloud(openstack_test_servers.admin_cloud, config_files=[str(openstack_test_servers.clouds_yaml)])
    ref, _ = cloud.publish(bootstrap_base.details["path"], "debian-bookworm-base", tags={})
    yield ref.image_id
    cloud.delete_image(ref)
    cloud.close()


RECIPE = """\
name: hello-openstack
version: 1.0.0
targets:
  local:
    base: {bootstrap: debian-bookworm}
    ssh_user: debian
    memory_mb: 1024
  sierra:
    cloud: openstack
    os_cloud: kiln-test
    base: {image: BASE_IMAGE}
    ssh_user: debian
    flavor: m1.small
    network: private
    ssh_cidr: 127.0.0.1/32
    share_with: [PARTNER]
scripts:
  - scripts/hello.sh
sanitize:
  disable: [zero-free-space]
verify:
  - command: {run: cat /etc/kiln-hello, expect: hello from kiln}
  - port: {port: 22}
"""


def recipe_file(tmp_path: Path, base_image: str, partner: str) -> Path:
    text = RECIPE.replace("BASE_IMAGE", base_image).replace("PARTNER", partner)
    return committed_recipe(tmp_path, text, {"scripts/hello.sh": (REPO / "recipes/scripts/hello.sh").read_text()})


def test_build_image_on_openstack_snapshots_to_glance_verifies_and_leaves_nothing(
    tmp_path: Path, prefect_api: str, fake_nova: tuple[FakeOpenStack, QemuBackedNova], glance_base: str,  # noqa: F811
    openstack_test_servers: OpenStackServers,
) -> None:
    from flows.build import build_image

    fake, backing = fake_nova
    recipe = recipe_file(tmp_path, glance_base, openstack_test_servers.partner_project_id)
    result = build_image(str(recipe), "sierra")
    assert result["status"] == "succeeded", result
    build_id, image_id = result["build_id"], result["image_id"]

    conn = admin_connection(openstack_test_servers)
    image = conn.image.get_image(image_id)
    assert image.status == "active"
    assert (image.properties["kiln_build_id"], image.properties["kiln_recipe"]) == (build_id, "hello-openstack")
    assert image.properties["kiln_role"] == "image" and "kiln" in image.tags
    assert [m.member_id for m in conn.image.members(image)] == [openstack_test_servers.partner_project_id]
    assert len(backing.booted_digests) == 2 and backing.booted_digests[1] == image.hash_value  # verify booted it
    [row] = [s for s in lineage.find_image(image_id) if s.image.cloud == "openstack"]
    assert (row.image.kind, row.image.region, row.build_id) == ("built", "kiln-test", build_id)
    [parent] = lineage.find_image(row.parent_image_id)
    assert parent.image.image_id == glance_base and parent.image.kind == "base"
    assert parent.image.sha256 == f"sha512:{conn.image.get_image(glance_base).hash_value}"

    assert store.open_resources(build_id) == []
    assert fake.leftovers() == {}, "servers, key pairs, security groups and floating IPs are all released"
    assert backing.guests == {}
    assert [m for m, p in fake.calls if p.startswith("compute:") and m == "POST" and p.endswith("/servers")] == [
        "POST", "POST"]  # the build server and the verify server
    conn.image.delete_image(image_id)
    conn.close()


def test_a_local_build_published_to_glance_is_the_same_bits(
    tmp_path: Path, prefect_api: str, openstack_test_servers: OpenStackServers,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.build import build_image

    recipe = recipe_file(tmp_path, "unused-here", openstack_test_servers.partner_project_id)
    local = build_image(str(recipe), "local")
    assert local["status"] == "succeeded", local
    [built] = [s.image for s in lineage.find_image(local["image_id"]) if s.image.kind == "built"]

    env = {**os.environ, "OS_CLIENT_CONFIG_FILE": str(openstack_test_servers.clouds_yaml)}
    published = subprocess.run([str(KILN), "publish", local["image_id"], "--to", "sierra", "--recipe", str(recipe),
                                "--json"], capture_output=True, text=True, env=env, timeout=900)
    assert published.returncode == 0, published.stdout + published.stderr
    publication = json.loads(published.stdout)

    conn = admin_connection(openstack_test_servers)
    image = conn.image.get_image(publication["image_id"])
    assert image.status == "active"
    assert image.properties["kiln_build_id"] == local["build_id"]
    assert image.properties["kiln_recipe"] == "hello-openstack"
    assert image.properties["kiln_sha256"] == built.sha256
    assert image.hash_value == hashlib.sha512(Path(built.path).read_bytes()).hexdigest()
    assert image.visibility == "shared"
    assert [m.member_id for m in conn.image.members(image)] == [openstack_test_servers.partner_project_id]
    [row] = [s.image for s in lineage.find_image(publication["image_id"])]
    assert (row.kind, row.cloud, row.region) == ("published", "openstack", "kiln-test")
    assert row.parent_id == built.id and row.sha256 == built.sha256 and row.build_id == local["build_id"]
    assert row.id in {s.image.id for s in lineage.find_image(built.sha256)}  # one digest finds both
    assert store.open_resources(local["build_id"]) == []
    assert list(settings.state_dir().iterdir()) == []
    conn.image.delete_image(publication["image_id"])
    conn.close()
