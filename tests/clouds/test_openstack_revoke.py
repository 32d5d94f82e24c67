"""`kiln revoke` of an image published to Glance acts on the Glance cloud the image's row names (its clouds.yaml
entry), not on the cloud of the build's target: against a real Keystone and Glance on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import subprocess
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clouds.base import TAG_BUILD, ImageRef
from clouds.local import LocalCloud
from clouds.openstack import OpenStackCloud
from core import settings
from kiln.cli import app
from operations.publish import publish_image
from provenance import lineage, store
from provenance.gitinfo import GitInfo
from tests.openstack_server import OpenStackServers

pytest_plugins = ["tests.clouds.openstack_fixtures"]
runner = CliRunner()

LOCAL_RECIPE = {"name": "golden", "version": "1.0.0",
                "targets": {"local": {"cloud": "local", "base": {"bootstrap": "debian-bookworm"}}}}  # fmt: skip


def locally_built_image(disk: Path) -> str:
    """A local image as the local cloud and the register stage leave it — its directory (disk and meta.json)
    under the images directory, and its row from a build of a recipe whose only target is local."""
    image_id = f"img-{uuid.uuid4().hex[:12]}"
    directory = settings.images_dir() / image_id
    directory.mkdir(parents=True)
    path = directory / "golden.qcow2"
    path.write_bytes(disk.read_bytes())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    files = [{"format": "qcow2", "path": str(path), "size": path.stat().st_size, "sha256": digest}]
    (directory / "meta.json").write_text(json.dumps({"image_id": image_id, "name": "golden-1.0.0", "tags": {},
                                                     "created": "2026-11-22T00:00:00Z", "files": files}))
    git = GitInfo(in_git=True, path="golden.yaml", root="/src/images", commit="c0" * 20, branch="main", dirty=False)
    version = store.record_recipe_version(name="golden", version="1.0.0", fingerprint=uuid.uuid4().hex * 2,
                                          recipe_json=json.dumps(LOCAL_RECIPE), git=git)  # fmt: skip
    build = store.start_build(recipe_version_id=version, target="local", cloud="local", trigger="test")
    store.record_image(cloud="local", image_id=image_id, name="golden-1.0.0", format="qcow2", sha256=digest,
                       size=files[0]["size"], path=str(path), build_id=build, kind="built", tags={TAG_BUILD: build})
    store.finish_build(build, "succeeded", stage="register")
    return image_id


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(uuid.uuid4().bytes * 65536)
    path = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)], check=True)
    return path


def test_revoking_a_published_glance_copy_deactivates_it_on_the_cloud_its_row_names(
    glance: OpenStackCloud, openstack_test_servers: OpenStackServers, disk: Path, monkeypatch
) -> None:
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(openstack_test_servers.clouds_yaml))
    local_id = locally_built_image(disk)
    publication = publish_image(local_id, glance)  # the build's only target is local; the copy is on kiln-test
    try:
        assert glance.conn.image.get_image(publication.image_id).status == "active"

        result = runner.invoke(app, ["revoke", publication.image_id, "--reason", "CVE-2026-4242", "--json"])

        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        # The same bits everywhere: the published copy and the local image it came from are both revoked,
        # each flagged on its own cloud — Glance's copy on kiln-test, the local one in its meta.json.
        assert [(a["image_id"], a["cloud"], a["region"], a["outcome"]) for a in report["cloud_actions"]] == [
            (publication.image_id, "openstack", "kiln-test", "flagged"), (local_id, "local", "", "flagged")]
        assert glance.conn.image.get_image(publication.image_id).status == "deactivated"
        meta = json.loads((settings.images_dir() / local_id / "meta.json").read_text())
        assert meta["revoked"]["reason"] == "CVE-2026-4242"
        rows = {s.image.image_id: s.image for s in lineage.find_image(publication.sha256)}  # both: same bits
        assert {image_id: (row.status, row.revoked_reason) for image_id, row in rows.items()} == {
            local_id: ("revoked", "CVE-2026-4242"), publication.image_id: ("revoked", "CVE-2026-4242")}
    finally:
        glance.delete_image(ImageRef("openstack", publication.image_id, "", region="kiln-test"))
        LocalCloud().delete_image(ImageRef("local", local_id, ""))
