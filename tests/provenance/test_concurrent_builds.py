"""20 builds at once against moto, each in its own process, writing provenance to one SQLite file or one
PostgreSQL database: every row is there and nothing fails with "database is locked".

Each process runs the real stages that need no guest: prepare (recipe version, build row), fetch_base (the
shared base row), launch (key pair, security group, instance: ledgered, on moto), snapshot (stop, AMI, build
guest released) and register's provenance writes (image rows, hand-over), then finish_build. wait_boot,
customize, sanitize and verify are not run: they need a guest reachable over SSH, and moto's instances never
boot (there is no honest stand-in for them without a VM per build). The provenance they write (steps, logs) is
the same kind the stages run here write.
"""

from __future__ import annotations

import multiprocessing
import os

from clouds.base import TAG_BUILD, KeyPair
from clouds.ec2 import EC2Cloud
from provenance import lineage, store
from tests.clouds.moto_ec2 import SSM_AL2023
from tests.flows.conftest import committed_recipe
from tests.secret_scan import key_needles, scan_database

BUILDS = 20
REGION = "us-east-1"
STAGES_RUN = ["fetch_base", "launch", "snapshot"]
PRELOAD = ["prefect.logging", "flows.build", "flows.stages", "tasks.common", "tasks.fetch_base", "tasks.launch",
           "tasks.register", "tasks.snapshot", "clouds.ec2", "boto3"]  # fmt: skip


def one_build(recipe: str, database_url: str) -> tuple[str, str, str]:
    """A build of the ec2 target in this process, through the stages that need no guest; (build id, AMI, and
    the build's private key, handed to the test alone so it can prove the key reached no row)."""
    os.environ["KILN_DATABASE_URL"] = database_url  # the fork server's environment is the first test's
    from prefect.logging import disable_run_logger

    from flows.build import prepare
    from flows.stages import conclude_failure
    from tasks.common import hand_over
    from tasks.fetch_base import fetch_base
    from tasks.launch import launch
    from tasks.register import record_image_rows
    from tasks.snapshot import snapshot

    with disable_run_logger():
        plan = prepare(recipe, "ec2", trigger="test", on_error="cleanup", require_clean=True)
        plan.cloud.poll_seconds = 0.2
        try:
            base = fetch_base.fn(plan)
            guest = launch.fn(plan, base.image)
            image = snapshot.fn(plan, guest)
            record_image_rows(plan, base, image, plan.tags)
            hand_over(plan, image.image_id)
        except BaseException as exc:
            conclude_failure(plan, exc)
            raise
        store.finish_build(plan.build_id, "succeeded", stage="snapshot")
        return plan.build_id, image.image_id, plan.build_key.private_key


def test_twenty_concurrent_builds_on_moto_record_every_row(db_url, moto, tmp_path):  # noqa: F811
    recipe = committed_recipe(tmp_path, f"""name: concurrent
version: 1.0.0
targets:
  ec2:
    region: {REGION}
    endpoint_url: {moto}
    base: {{ssm_parameter: {SSM_AL2023}}}
    ssh_user: debian
    ssh_cidr: 127.0.0.0/8
scripts: [{{inline: 'true', name: nothing}}]
verify: [{{port: {{port: 22}}}}]
""")  # fmt: skip
    store.upgrade()  # the schema once, so the workers race on rows, not on migrations
    store.dispose()

    # Fresh processes, as separate builds are, forked from a server that imported kiln and Prefect once: twenty
    # spawned interpreters importing them each spent most of this test's time on a 2-core machine.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    with context.Pool(BUILDS) as pool:
        results = pool.starmap(one_build, [(str(recipe), db_url)] * BUILDS, chunksize=1)

    assert os.environ["KILN_DATABASE_URL"] == db_url
    builds = {summary.build.id: summary.build for summary in lineage.list_builds(recipe="concurrent", limit=100)}
    assert sorted(builds) == sorted(build_id for build_id, _, _ in results)
    assert {b.status for b in builds.values()} == {"succeeded"}
    assert len({b.recipe_version_id for b in builds.values()}) == 1, "one recipe version, found by all"
    images = lineage.list_images(cloud="ec2", recipe="concurrent")
    assert sorted(i.image.image_id for i in images) == sorted(ami for _, ami, _ in results)
    assert len({i.image.parent_id for i in images}) == 1, "one base row, shared"
    for build_id in builds:
        detail = lineage.get_build(build_id)
        assert [(s.stage, s.status) for s in detail.steps] == [(s, "succeeded") for s in STAGES_RUN]
        assert all(s.log for s in detail.steps), "every stage's log arrived"
        assert store.open_resources(build_id) == []
    cloud = EC2Cloud(REGION, endpoint_url=moto)
    left = {(r.kind, r.tags[TAG_BUILD]) for r in cloud.owned() if r.tags.get(TAG_BUILD) in builds}
    assert {kind for kind, _ in left} <= {"image", "snapshot"}, f"only the AMIs and their snapshots remain: {left}"
    needles = {f"{name} of build {build_id[:8]}": needle for build_id, _, private in results
               for name, needle in key_needles(KeyPair("k", "", private)).items()}  # fmt: skip
    assert scan_database(db_url, needles) == [], "no build key and no secret in any row, step logs included"
