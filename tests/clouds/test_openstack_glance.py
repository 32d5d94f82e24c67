"""OpenStackCloud against a real Keystone and Glance (from PyPI, on 127.0.0.1): upload by import and by PUT,
properties and tags, members, deactivation, deletion, listing by property, checksum verification, bases,
password prompting, and publishing a local image as the same bits."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from openstack import exceptions as os_exc

from clouds import openstack as openstack_cloud
from clouds.base import TAG_BUILD, TAG_COMMIT, TAG_RECIPE, TAG_ROLE, TAG_VALID_UNTIL, CloudError, ImageRef, Resource
from clouds.openstack import GLANCE_PROPERTIES, FileDigests, OpenStackCloud, connect
from operations.publish import PublishRefused, publish_image
from provenance import lineage, store
from tests.clouds.conftest import Spec
from tests.openstack_server import ADMIN_PASSWORD, OpenStackServers

pytest_plugins = ["tests.clouds.openstack_fixtures"]
KILN = Path(sys.executable).with_name("kiln")


def tags_for(build: str) -> dict[str, str]:
    return {TAG_BUILD: build, TAG_RECIPE: "glance-tests", TAG_COMMIT: "0123abc"}


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A small qcow2 with a few MiB of random data in it (distinct bits for every test)."""
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * (4 << 20))
    with raw.open("r+b") as handle:
        handle.seek(1 << 20)
        handle.write(uuid.uuid4().bytes * 65536)
    path = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)], check=True)
    return path


def download(cloud: OpenStackCloud, image_id: str) -> tuple[int, bytes]:
    """GET /v2/images/{id}/file as this cloud's user: the HTTP status and the bytes served."""
    response = cloud.conn.image.get(f"/images/{image_id}/file")
    return response.status_code, response.content


@pytest.fixture
def build_id() -> str:
    return uuid.uuid4().hex


def test_publish_imports_the_file_with_kiln_properties_and_glance_holds_the_same_bits(
    glance: OpenStackCloud, disk: Path, build_id: str
) -> None:
    assert glance.offers_import(), "the test Glance enables glance-direct import"
    ref, digests = glance.publish(disk, "kiln-import", tags=tags_for(build_id))
    image = glance.conn.image.get_image(ref.image_id)
    assert image.status == "active"
    assert (image.disk_format, image.container_format) == ("qcow2", "bare")
    assert image.properties["kiln_build_id"] == build_id
    assert image.properties["kiln_recipe"] == "glance-tests"
    assert image.properties["kiln_commit"] == "0123abc"
    assert image.properties["kiln_sha256"] == hashlib.sha256(disk.read_bytes()).hexdigest() == digests.sha256
    assert "kiln" in image.tags
    assert image.checksum == hashlib.md5(disk.read_bytes()).hexdigest()
    assert image.hash_algo == "sha512"
    assert image.hash_value == hashlib.sha512(disk.read_bytes()).hexdigest()
    assert download(glance, ref.image_id) == (200, disk.read_bytes())
    glance.delete_image(ref)


def test_publish_uploads_directly_when_the_cloud_offers_no_import(
    glance: OpenStackCloud, disk: Path, build_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(glance, "offers_import", lambda: False)
    ref, digests = glance.publish(disk, "kiln-put", tags=tags_for(build_id))
    image = glance.conn.image.get_image(ref.image_id)
    assert image.status == "active"
    assert image.hash_value == digests.sha512
    assert image.properties["kiln_build_id"] == build_id
    glance.delete_image(ref)


def test_a_checksum_mismatch_fails_the_publish_and_deletes_the_upload(
    glance: OpenStackCloud, disk: Path, build_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = FileDigests.of(disk)
    lying = FileDigests(real.size, real.md5, real.sha256, "0" * 128)  # as if the bits changed on the way
    monkeypatch.setattr(openstack_cloud.FileDigests, "of", classmethod(lambda cls, path: lying))
    with pytest.raises(CloudError, match="sha512 .* is not the file's"):
        glance.publish(disk, "kiln-corrupt", tags=tags_for(build_id))
    assert glance.owned({TAG_BUILD: build_id}) == []


def test_share_with_makes_the_image_shared_and_the_partner_project_a_member(
    glance: OpenStackCloud, partner: OpenStackCloud, openstack_test_servers: OpenStackServers, disk: Path,
    build_id: str,
) -> None:
    glance.share_with = [openstack_test_servers.partner_project_id]
    ref, _ = glance.publish(disk, "kiln-shared", tags=tags_for(build_id))
    image = glance.conn.image.get_image(ref.image_id)
    assert image.visibility == "shared"
    members = list(glance.conn.image.members(image))
    assert [(m.member_id, m.status) for m in members] == [(openstack_test_servers.partner_project_id, "pending")]
    glance.share_image(ref.image_id, glance.share_with)  # idempotent: no second membership
    assert len(list(glance.conn.image.members(image))) == 1
    partner.conn.image.update_member(openstack_test_servers.partner_project_id, ref.image_id, status="accepted")
    seen = partner.conn.image.get_image(ref.image_id)
    assert seen.hash_value == image.hash_value
    assert ref.image_id in [i.id for i in partner.conn.image.images()]
    glance.delete_image(ref)


def test_deactivated_image_refuses_its_data_to_users_and_is_no_base(
    glance: OpenStackCloud, partner: OpenStackCloud, openstack_test_servers: OpenStackServers, disk: Path,
    build_id: str,
) -> None:
    glance.share_with = [openstack_test_servers.partner_project_id]
    ref, _ = glance.publish(disk, "kiln-revoked", tags=tags_for(build_id))
    partner.conn.image.update_member(openstack_test_servers.partner_project_id, ref.image_id, status="accepted")
    assert download(partner, ref.image_id) == (200, disk.read_bytes())
    glance.deactivate_image(ref.image_id)
    image = glance.conn.image.get_image(ref.image_id)
    assert image.status == "deactivated"
    assert download(partner, ref.image_id)[0] == 403  # only an admin may still read a deactivated image
    with pytest.raises(CloudError, match="deactivated, not active"):
        glance.resolve_base(Spec(image=ref.image_id), "debian")
    glance.reactivate_image(ref.image_id)
    assert glance.conn.image.get_image(ref.image_id).status == "active"
    glance.delete_image(ref)


def test_deactivating_an_unknown_image_names_it(glance: OpenStackCloud) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(CloudError, match=missing):
        glance.deactivate_image(missing)


def test_delete_image_is_idempotent(glance: OpenStackCloud, disk: Path, build_id: str) -> None:
    ref, _ = glance.publish(disk, "kiln-delete", tags=tags_for(build_id))
    glance.delete_image(ref)
    glance.delete_image(ref)
    glance.delete_image(ImageRef(cloud="openstack", image_id=str(uuid.uuid4()), name="never"))
    with pytest.raises(os_exc.NotFoundException):
        glance.conn.image.get_image(ref.image_id)


def test_owned_lists_images_by_property_and_release_deletes_them(
    glance: OpenStackCloud, disk: Path, tmp_path: Path
) -> None:
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    mine, _ = glance.publish(disk, "kiln-owned-1", tags=tags_for(first))
    other, _ = glance.publish(disk, "kiln-owned-2", tags=tags_for(second))
    owned = glance.owned({TAG_BUILD: first})
    assert [(r.kind, r.resource_id) for r in owned] == [("image", mine.image_id)]
    assert owned[0].tags[TAG_BUILD] == first and owned[0].tags[TAG_RECIPE] == "glance-tests"
    assert owned[0].created is not None
    both = {r.resource_id for r in glance.owned({TAG_RECIPE: "glance-tests", TAG_COMMIT: "0123abc"})}
    assert {mine.image_id, other.image_id} <= both
    for resource in owned:
        glance.release(resource)
    glance.release(owned[0])  # gone already is success
    assert glance.owned({TAG_BUILD: first}) == []
    assert [r.resource_id for r in glance.owned({TAG_BUILD: second})] == [other.image_id]
    glance.release(Resource("openstack", "image", other.image_id))


def test_tag_image_sets_kiln_properties_without_colons(glance: OpenStackCloud, disk: Path, build_id: str) -> None:
    ref, _ = glance.publish(disk, "kiln-tagged", tags={})
    glance.tag_image(ref, {**tags_for(build_id), TAG_ROLE: "image", TAG_VALID_UNTIL: "2027-06-03T11:41:53+00:00"})
    properties = glance.conn.image.get_image(ref.image_id).properties
    assert {properties[GLANCE_PROPERTIES[tag]] for tag in (TAG_BUILD, TAG_ROLE)} == {build_id, "image"}
    assert properties["kiln_valid_until"] == "2027-06-03T11:41:53+00:00"  # the recipe's valid_for, as register sets
    assert not [key for key in properties if key.startswith("kiln:")]
    assert [r.resource_id for r in glance.owned({TAG_BUILD: build_id})] == [ref.image_id]
    glance.delete_image(ref)


def test_base_by_id_or_by_name_newest_active_wins_with_its_hash_as_digest(
    glance: OpenStackCloud, disk: Path, tmp_path: Path, build_id: str
) -> None:
    name = f"kiln-base-{build_id[:8]}"
    older, _ = glance.publish(disk, name, tags=tags_for(build_id))
    newer_disk = tmp_path / "newer.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(newer_disk), "8M"], check=True)
    newer, newer_digests = glance.publish(newer_disk, name, tags=tags_for(build_id))
    by_name = glance.resolve_base(Spec(name=name), "ubuntu")
    assert (by_name.image_id, by_name.ssh_user) == (newer.image_id, "ubuntu")
    assert by_name.digest == f"sha512:{newer_digests.sha512}"
    assert glance.resolve_base(Spec(image=name), "ubuntu").image_id == newer.image_id  # image: also takes a name
    assert glance.resolve_base(Spec(name="kiln-base-*"), "ubuntu").image_id == newer.image_id
    by_id = glance.resolve_base(Spec(image=older.image_id), "debian")
    assert by_id.image_id == older.image_id
    assert by_id.digest == f"sha512:{hashlib.sha512(disk.read_bytes()).hexdigest()}"
    assert by_id.region == "kiln-test"
    with pytest.raises(CloudError, match="no active Glance image .* named 'no-such-image'"):
        glance.resolve_base(Spec(name="no-such-image"), "debian")
    with pytest.raises(CloudError, match="starts from a Glance image"):
        glance.resolve_base(Spec(file="disk.qcow2"), "debian")
    glance.delete_image(older)
    glance.delete_image(newer)


# -- credentials -----------------------------------------------------------------------------------------


@pytest.fixture
def passwordless_clouds_yaml(openstack_test_servers: OpenStackServers, tmp_path: Path) -> Path:
    """The admin entry of the test clouds.yaml without its password, like a cloud that asks every time."""
    config = yaml.safe_load(openstack_test_servers.clouds_yaml.read_text())
    del config["clouds"]["kiln-test"]["auth"]["password"]
    path = tmp_path / "clouds.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_missing_password_is_prompted_for_on_a_terminal_and_never_logged(
    passwordless_clouds_yaml: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    prompts: list[str] = []
    monkeypatch.setattr(openstack_cloud.getpass, "getpass", lambda prompt: prompts.append(prompt) or ADMIN_PASSWORD)
    caplog.set_level(logging.DEBUG)
    conn = connect("kiln-test", config_files=[str(passwordless_clouds_yaml)], interactive=True)
    try:
        assert conn.image.get_import_info() is not None
    finally:
        conn.close()
    assert len(prompts) == 1 and "assword" in prompts[0]
    assert ADMIN_PASSWORD not in caplog.text


def test_without_a_terminal_a_missing_password_fails_clearly(
    passwordless_clouds_yaml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(openstack_cloud.getpass, "getpass", lambda prompt: pytest.fail("prompted without a terminal"))
    with pytest.raises(CloudError, match="OpenStack cloud 'kiln-test': authentication failed"):
        connect("kiln-test", config_files=[str(passwordless_clouds_yaml)], interactive=False)


def test_an_unknown_cloud_entry_is_named(openstack_test_servers: OpenStackServers) -> None:
    with pytest.raises(CloudError, match="'no-such-cloud'"):
        connect("no-such-cloud", config_files=[str(openstack_test_servers.clouds_yaml)], interactive=False)


# -- publishing a local image ------------------------------------------------------------------------------


def local_image_row(disk: Path, build_tags: dict[str, str], status: str = "available") -> tuple[str, int]:
    """A local image as the register stage records it (kind built, qcow2, its path and sha256)."""
    image_id = f"img-{uuid.uuid4().hex[:12]}"
    row_id = store.record_image(
        cloud="local", image_id=image_id, name="hello-1.0", format="qcow2", size=disk.stat().st_size,
        sha256=hashlib.sha256(disk.read_bytes()).hexdigest(), path=str(disk), kind="built", tags=build_tags,
        status=status,
    )  # fmt: skip
    return image_id, row_id


def test_publish_image_records_the_glance_image_as_the_same_bits_as_the_local_one(
    glance: OpenStackCloud, disk: Path, build_id: str
) -> None:
    local_id, local_row = local_image_row(disk, tags_for(build_id))
    publication = publish_image(local_id, glance)
    rows = {s.image.image_id: s.image for s in lineage.find_image(publication.sha256)}
    published = rows[publication.image_id]
    assert (published.kind, published.cloud, published.region) == ("published", "openstack", "kiln-test")
    assert published.parent_id == local_row == publication.source_row_id
    assert published.sha256 == rows[local_id].sha256 == hashlib.sha256(disk.read_bytes()).hexdigest()
    assert json.loads(published.tags_json)[TAG_ROLE] == "published"
    image = glance.conn.image.get_image(publication.image_id)
    assert image.properties["kiln_source_image"] == local_id
    assert image.properties["kiln_build_id"] == build_id
    assert image.hash_value == hashlib.sha512(disk.read_bytes()).hexdigest()
    glance.delete_image(ImageRef("openstack", publication.image_id, ""))


def test_publish_refuses_a_file_that_changed_since_the_build(glance: OpenStackCloud, disk: Path, build_id: str) -> None:
    local_id, _ = local_image_row(disk, tags_for(build_id))
    with disk.open("r+b") as handle:
        handle.seek(2 << 20)
        handle.write(b"tampered")
    with pytest.raises(PublishRefused, match="the file changed since kiln built it"):
        publish_image(local_id, glance)
    assert glance.owned({TAG_BUILD: build_id}) == []


def test_publish_refuses_revoked_and_unknown_images(glance: OpenStackCloud, disk: Path, build_id: str) -> None:
    revoked, _ = local_image_row(disk, tags_for(build_id), status="revoked")
    with pytest.raises(PublishRefused, match="is revoked"):
        publish_image(revoked, glance)
    with pytest.raises(PublishRefused, match="no local image with this id"):
        publish_image("img-000000000000", glance)
    assert glance.owned({TAG_BUILD: build_id}) == []


def test_kiln_publish_exits_2_for_bad_input_and_1_when_the_cloud_fails(
    openstack_test_servers: OpenStackServers, disk: Path, build_id: str
) -> None:
    local_id, _ = local_image_row(disk, tags_for(build_id))
    env = {**os.environ, "OS_CLIENT_CONFIG_FILE": str(openstack_test_servers.clouds_yaml)}

    def kiln_publish(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(KILN), "publish", *args], capture_output=True, text=True, env=env, timeout=300)

    unknown = kiln_publish("img-000000000000", "--to", "kiln-test")
    assert unknown.returncode == 2 and "no local image with this id" in unknown.stderr
    no_cloud = kiln_publish(local_id, "--to", "no-such-cloud")
    assert no_cloud.returncode == 1 and "'no-such-cloud'" in no_cloud.stderr
    assert ADMIN_PASSWORD not in no_cloud.stdout + no_cloud.stderr
