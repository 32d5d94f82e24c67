"""The EGI path: the session's local build (one container build and its verify boot, shared with the other flow
tests) published by `kiln publish --to sierra` to a real Glance (tests.openstack_server): the same bits, the
kiln properties, shared with the partner project, and recorded as a published image of the same build."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from core import settings
from provenance import lineage, store
from tests.clouds.test_openstack_build import recipe_file
from tests.flows.conftest import KILN, HelloBuild
from tests.openstack_server import OpenStackServers, admin_connection

pytest_plugins = ["tests.clouds.openstack_fixtures"]
pytestmark = pytest.mark.vm  # the session's local build boots its image to verify it


def test_a_local_build_published_to_glance_is_the_same_bits(
    tmp_path: Path, hello_build: HelloBuild, openstack_test_servers: OpenStackServers
) -> None:
    recipe = recipe_file(tmp_path, "unused-here", openstack_test_servers.partner_project_id)  # its sierra target
    [built] = [s.image for s in lineage.find_image(hello_build.image_id) if s.image.kind == "built"]
    build_id = hello_build.outcome["build_id"]

    env = {**os.environ, "OS_CLIENT_CONFIG_FILE": str(openstack_test_servers.clouds_yaml)}
    command = [str(KILN), "publish", hello_build.image_id, "--to", "sierra", "--recipe", str(recipe), "--json"]
    published = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert published.returncode == 0, published.stdout + published.stderr
    publication = json.loads(published.stdout)
    hello_build.children.append(publication["image_id"])  # a child of the built image in its lineage

    conn = admin_connection(openstack_test_servers)
    image = conn.image.get_image(publication["image_id"])
    assert image.status == "active"
    assert image.properties["kiln_build_id"] == build_id
    assert image.properties["kiln_recipe"] == "hello-web"  # the build's recipe, not the one naming the target
    assert image.properties["kiln_sha256"] == built.sha256
    assert image.hash_value == hashlib.sha512(Path(built.path).read_bytes()).hexdigest()
    assert image.visibility == "shared"
    assert [m.member_id for m in conn.image.members(image)] == [openstack_test_servers.partner_project_id]
    [row] = [s.image for s in lineage.find_image(publication["image_id"])]
    assert (row.kind, row.cloud, row.region) == ("published", "openstack", "kiln-test")
    assert row.parent_id == built.id and row.sha256 == built.sha256 and row.build_id == build_id
    assert row.id in {s.image.id for s in lineage.find_image(built.sha256)}  # one digest finds both
    assert store.open_resources(build_id) == []
    assert list(settings.state_dir().iterdir()) == []
    conn.image.delete_image(publication["image_id"])
    conn.close()
