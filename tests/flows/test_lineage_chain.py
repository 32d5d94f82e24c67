"""`kiln lineage` on a chain kiln really built: the bootstrap base → image A (recipes/hello.yaml, the session's
shared build) → image B built on the local cloud from A (`base: {image: A}`), plus an EC2 sibling of A — in all
three directions and all three formats.

The EC2 sibling is an AMI made in moto's server by EC2Cloud (launch, stop, create_image: moto's instances never
boot, so no VM and no customize), recorded through the store as the register stage records an ec2 target of A's
recipe version: a build of the same recipe version on another target. Only B costs a VM build here.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from clouds.base import TAG_BUILD, TAG_ROLE, KeyPair
from clouds.ec2 import EC2Cloud
from core.recipe import BaseSpec
from kiln.cli import app
from provenance import lineage, store
from tests.clouds.moto_ec2 import SSM_AL2023
from tests.flows.conftest import HelloBuild, committed_recipe, run_kiln

pytestmark = pytest.mark.vm

REGION = "us-east-1"
runner = CliRunner()


def child_recipe_text(parent_image_id: str) -> str:
    """The smallest recipe on top of a kiln image: one inline script, a probe that reads both images' marks."""
    return f"""name: hello-child
version: 1.0.0
targets:
  local:
    base: {{image: {parent_image_id}}}
    ssh_user: debian
    memory_mb: 1024
scripts:
  - {{inline: 'echo child of hello > /etc/kiln-child', name: child-mark}}
sanitize: {{disable: [zero-free-space]}}
verify:
  - command: {{run: cat /etc/kiln-hello /etc/kiln-child, expect: child of hello}}
"""


def record_ec2_sibling(hello: HelloBuild, endpoint: str) -> str:
    """An AMI made in moto from an instance of the AL2023 base, recorded as the ec2 target's build of A's recipe
    version (base row, built image row, succeeded build), as fetch_base and register record one."""
    recipe_version = lineage.get_build(hello.outcome["build_id"]).build.recipe_version_id
    build_id = store.start_build(
        recipe_version_id=recipe_version, target="ec2", cloud="ec2", region=REGION, trigger="test"
    )
    cloud = EC2Cloud(REGION, endpoint_url=endpoint, poll_seconds=0.2)
    base = cloud.resolve_base(BaseSpec(ssm_parameter=SSM_AL2023), "admin")
    tags = {TAG_BUILD: build_id, "kiln:recipe": "hello"}
    key = KeyPair.generate(f"kiln-{build_id[:8]}")
    cloud.import_key(key, tags)
    instance = cloud.launch(base, key, "#cloud-config\n", tags, [22])
    try:
        cloud.stop(instance)
        ami = cloud.snapshot(instance, f"hello-{build_id[:8]}", {**tags, TAG_ROLE: "image"}, [])
    finally:
        cloud.terminate(instance)
        cloud.delete_keypair(key)
    base_row = store.record_image(cloud="ec2", region=REGION, image_id=base.image_id, name=base.name, kind="base")
    store.record_image(
        cloud="ec2",
        region=REGION,
        image_id=ami.image_id,
        name=ami.name,
        build_id=build_id,
        parent_id=base_row,
        kind="built",
        tags={**tags, TAG_ROLE: "image"},
    )
    store.finish_build(build_id, "succeeded", stage="register")
    return ami.image_id


def kiln_lineage(*args: str) -> str:
    result = runner.invoke(app, ["lineage", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_lineage_of_a_real_chain_in_every_direction_and_format(tmp_path, hello_build: HelloBuild, moto) -> None:  # noqa: F811
    a = hello_build.image_id
    [a_row] = [s.image for s in lineage.find_image(a) if s.image.image_id == a]
    bootstrap_base = lineage.ancestors(a_row.id)[0].image
    assert bootstrap_base.kind == "base" and bootstrap_base.path.endswith(".qcow2")
    assert bootstrap_base.image_id == f"base:debian-bookworm@sha256:{bootstrap_base.sha256}", "the same on any host"
    recipe_b = committed_recipe(tmp_path, child_recipe_text(a))
    built = run_kiln("build", str(recipe_b), "--target", "local", "--json")
    assert built.returncode == 0, built.stdout + built.stderr
    [outcome] = json.loads(built.stdout)
    b = outcome["image_id"]
    hello_build.children.append(b)
    ami = record_ec2_sibling(hello_build, moto)

    # up, as JSON: B's base is A (with A's build, recipe and commit), then the bootstrap base, and nothing above
    up = json.loads(kiln_lineage(b, "--up", "--format", "json"))
    assert up["image"]["image_id"] == b and up["recipe"]["name"] == "hello-child"
    assert up["base"]["image_id"] == a and up["base"]["kind"] == "built"
    assert [n["image_id"] for n in up["ancestors"]] == [a, bootstrap_base.image_id]
    assert [n["depth"] for n in up["ancestors"]] == [1, 2]
    assert up["ancestors"][0]["recipe"]["commit"] == hello_build.commit
    assert up["ancestors"][0]["build"]["id"] == hello_build.outcome["build_id"]
    assert up["ancestors"][1]["kind"] == "base" and up["ancestors"][1]["build"] is None
    assert "children" not in up and "siblings" not in up

    # down, as JSON: A's children include B; the bootstrap base reaches B through A
    down = json.loads(kiln_lineage(a, "--down", "--format", "json"))
    assert b in down["children"] and down["children"] == hello_build.children
    [b_node] = [n for n in down["descendants"] if n["image_id"] == b]
    assert (b_node["depth"], b_node["parent_row_id"]) == (1, a_row.id)
    from_root = json.loads(kiln_lineage(bootstrap_base.image_id, "--down", "--format", "json"))
    depths = {n["image_id"]: n["depth"] for n in from_root["descendants"]}
    assert depths[a] == 1 and depths[b] == 2

    # siblings, as JSON: the EC2 build of A's recipe version; B (another recipe) is not one
    side = json.loads(kiln_lineage(a, "--siblings", "--format", "json"))
    siblings = {n["image_id"]: n for n in side["siblings"]}
    assert ami in siblings and b not in siblings
    assert (siblings[ami]["cloud"], siblings[ami]["region"], siblings[ami]["build"]["target"]) == ("ec2", REGION, "ec2")
    assert siblings[ami]["recipe"]["fingerprint"] == side["recipe"]["fingerprint"]

    # tree: root first, then A, then B (marked), indented down the chain; A's tree lists B below it and the AMI apart
    lines = kiln_lineage(b, "--up").splitlines()
    order = [next(i for i, line in enumerate(lines) if image in line) for image in (bootstrap_base.image_id, a, b)]
    assert order == sorted(order) and "▶" in lines[order[2]], "\n".join(lines)
    tree_a = kiln_lineage(a)
    assert tree_a.index(a) < tree_a.index(b) < tree_a.index("siblings") < tree_a.index(ami), tree_a
    assert f"commit {hello_build.commit[:10]}" in tree_a and "hello-child@1.0.0" in tree_a
    assert f"{ami}" in kiln_lineage(a, "--siblings") and b in kiln_lineage(a, "--down")

    # dot: parent edges base → A → B, and a dashed sibling edge from A to the AMI
    rows = {image_id: lineage.resolve_image(image_id).id for image_id in (a, b, ami)}
    dot = kiln_lineage(b, "--format", "dot")
    assert f'"{bootstrap_base.id}" -> "{rows[a]}";' in dot and f'"{rows[a]}" -> "{rows[b]}";' in dot
    dot_a = kiln_lineage(a, "--down", "--siblings", "--format", "dot")
    assert f'"{rows[a]}" -> "{rows[b]}";' in dot_a
    assert f'"{rows[a]}" -> "{rows[ami]}" [style=dashed' in dot_a
    assert f'"{bootstrap_base.id}" -> ' not in dot_a, "--down --siblings shows no ancestors"
