"""kiln gc: what builds that are no longer running left behind is released in order; running builds and the
images of successful builds are never touched; dead builds become interrupted at the stage they reached."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clouds.base import TAG_BUILD, TAG_ROLE, Resource
from clouds.local import LocalCloud
from core.recipe import load_recipe
from kiln.cli import app
from operations.gc import RELEASE_ORDER, find_leftovers, parse_duration, release_leftovers
from provenance import gitinfo, lineage, store

REPO = Path(__file__).resolve().parents[2]


def recipe_version() -> int:
    recipe = load_recipe(REPO / "recipes/hello.yaml")
    return store.record_recipe_version(
        name=recipe.name, version=recipe.version, fingerprint=recipe.fingerprint(),
        recipe_json=json.dumps(recipe.model_dump(mode="json"), sort_keys=True),
        git=gitinfo.capture(recipe.path, recipe.referenced_files()),
    )  # fmt: skip


def build_in_a_process_that_ends(stage: str) -> str:
    """A build whose process reached `stage` and then vanished, as after a SIGKILL."""
    code = (
        "from provenance import store; import sys\n"
        "b = store.start_build(recipe_version_id=int(sys.argv[1]), target='local', cloud='local', trigger='test')\n"
        "store.set_build_stage(b, sys.argv[2]); store.start_step(b, sys.argv[2]); print(b)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(recipe_version()), stage], capture_output=True,
                            text=True, check=True, env=os.environ.copy(), cwd=REPO)  # fmt: skip
    return result.stdout.strip()


def running_build() -> str:
    return store.start_build(recipe_version_id=recipe_version(), target="local", cloud="local", trigger="test")


def local_instance(cloud: LocalCloud, build_id: str, created: str = "2026-01-01T00:00:00+00:00") -> str:
    """A stopped local instance's state directory, tagged like launch tags it."""
    instance_id = f"i-{uuid.uuid4().hex[:12]}"
    directory = cloud.state_dir / instance_id
    directory.mkdir(parents=True)
    record = {"instance_id": instance_id, "tags": {TAG_BUILD: build_id, TAG_ROLE: "build"}, "created": created}
    (directory / "instance.json").write_text(json.dumps(record))
    return instance_id


def local_image(cloud: LocalCloud, build_id: str) -> str:
    image_id = f"img-{uuid.uuid4().hex[:12]}"
    directory = cloud.images_dir / image_id
    directory.mkdir(parents=True)
    (directory / "meta.json").write_text(json.dumps({"tags": {TAG_BUILD: build_id, TAG_ROLE: "image"}}))
    (directory / "disk.qcow2").write_bytes(b"not really a disk")
    return image_id


def ledger(build_id: str, kind: str, cloud_id: str | None) -> int:
    row = store.ledger_intent(build_id, cloud="local", kind=kind, name=f"kiln-{build_id[:8]}")
    if cloud_id:
        store.ledger_created(row, cloud_id)
    return row


def mine(report, build_ids: set[str]) -> list:  # noqa: ANN001
    return [item for item in report.leftovers if item.build_id in build_ids]


def test_gc_releases_a_dead_builds_instance_and_image_and_marks_it_interrupted_at_its_stage():
    cloud = LocalCloud()
    dead = build_in_a_process_that_ends("snapshot")
    instance, image = local_instance(cloud, dead), local_image(cloud, dead)
    instance_row, image_row = ledger(dead, "instance", instance), ledger(dead, "image", image)
    intent_only = ledger(dead, "keypair", None)

    report = release_leftovers(find_leftovers())

    assert dead in report.interrupted
    build = lineage.get_build(dead).build
    assert (build.status, build.stage) == ("interrupted", "snapshot")
    assert [s.status for s in lineage.get_build(dead).steps] == ["interrupted"]
    actions = {(i.kind, i.resource_id): (i.action, i.source) for i in mine(report, {dead})}
    assert actions == {
        ("instance", instance): ("released", "ledger+tags"),
        ("image", image): ("released", "ledger+tags"),
        ("keypair", ""): ("closed (never created)", "ledger"),
    }
    assert not (cloud.state_dir / instance).exists() and not (cloud.images_dir / image).exists()
    assert {row.id for row in store.open_resources(dead)} == set()
    assert {instance_row, image_row, intent_only}.isdisjoint(r.id for r in store.open_resources())


def test_gc_releases_instances_before_images_before_key_pairs():
    cloud = LocalCloud()
    dead = build_in_a_process_that_ends("verify")
    key_row = ledger(dead, "keypair", "key-0123")
    image, instance = local_image(cloud, dead), local_instance(cloud, dead)

    kinds = [i.kind for i in mine(find_leftovers(), {dead})]

    # What this test made goes now: a later test's gc over everything (the reaper's) must not meet it.
    store.ledger_released(key_row)
    shutil.rmtree(cloud.images_dir / image)
    shutil.rmtree(cloud.state_dir / instance)
    assert kinds == sorted(kinds, key=RELEASE_ORDER.index) and kinds[0] == "instance" and kinds[-1] == "keypair"


def test_gc_never_touches_a_running_build_or_the_image_of_a_successful_one():
    cloud = LocalCloud()
    running = running_build()
    running_instance = local_instance(cloud, running)
    ledger(running, "instance", running_instance)
    succeeded = build_in_a_process_that_ends("register")
    store.finish_build(succeeded, "succeeded")
    product = local_image(cloud, succeeded)
    failed = build_in_a_process_that_ends("verify")
    store.finish_build(failed, "failed")
    failed_image = local_image(cloud, failed)

    report = release_leftovers(find_leftovers())

    assert [(i.resource_id, i.action) for i in mine(report, {running, succeeded, failed})] == [
        (failed_image, "released")
    ]
    assert (cloud.state_dir / running_instance).exists() and (cloud.images_dir / product).exists()
    assert [r.cloud_id for r in store.open_resources(running)] == [running_instance]
    assert lineage.get_build(running).build.status == "running"
    store.finish_build(running, "failed")
    release_leftovers(find_leftovers())
    assert not (cloud.state_dir / running_instance).exists()


def test_gc_leaves_resources_of_builds_it_does_not_know():
    cloud = LocalCloud()
    stranger = local_instance(cloud, uuid.uuid4().hex)

    report = release_leftovers(find_leftovers())

    [item] = [i for i in report.leftovers if i.resource_id == stranger]
    assert item.action == "skipped: its build is not in this database"
    assert (cloud.state_dir / stranger).exists()
    cloud.release(Resource("local", "instance", stranger))  # tidy for the other tests


def test_gc_dry_run_lists_without_releasing_and_a_second_gc_finds_nothing():
    cloud = LocalCloud()
    dead = build_in_a_process_that_ends("launch")
    instance = local_instance(cloud, dead)
    ledger(dead, "instance", instance)

    dry = release_leftovers(find_leftovers(dry_run=True), dry_run=True)
    assert [(i.resource_id, i.action) for i in mine(dry, {dead})] == [(instance, "would release")]
    assert dead in dry.interrupted, "the dry run says the dead build would be marked interrupted"
    assert (cloud.state_dir / instance).exists() and store.open_resources(dead)
    assert lineage.get_build(dead).build.status == "running", "a dry run writes nothing"

    report = release_leftovers(find_leftovers())
    assert dead in report.interrupted and lineage.get_build(dead).build.status == "interrupted"
    again = release_leftovers(find_leftovers())
    assert mine(again, {dead}) == [] and not (cloud.state_dir / instance).exists()


def test_gc_older_than_spares_what_is_younger():
    cloud = LocalCloud()
    dead = build_in_a_process_that_ends("launch")
    just_now = dt.datetime.now(dt.UTC).isoformat()
    ledger(dead, "instance", local_instance(cloud, dead, created=just_now))

    assert mine(find_leftovers(older_than=parse_duration("1h")), {dead}) == []
    assert [i.kind for i in mine(find_leftovers(older_than=parse_duration("0s")), {dead})] == ["instance"]
    release_leftovers(find_leftovers())


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("7d", 604800), ("45", 45)])
def test_durations(text, seconds):
    assert parse_duration(text).total_seconds() == seconds


def test_a_bad_duration_is_bad_input():
    result = CliRunner().invoke(app, ["gc", "--older-than", "soon"])
    assert result.exit_code == 2 and "--older-than" in result.output


def test_kiln_gc_dry_run_on_a_clean_system_says_nothing_is_to_be_done(tmp_path):
    env = {**os.environ, "KILN_HOME": str(tmp_path)}
    result = subprocess.run([str(Path(sys.executable).with_name("kiln")), "gc", "--dry-run"], env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "nothing to be done" in result.stdout


def test_starting_a_build_marks_builds_whose_process_died_interrupted():
    from flows.build import prepare

    dead = build_in_a_process_that_ends("customize")

    plan = prepare(str(REPO / "recipes/hello.yaml"), "local", trigger="test", on_error="cleanup", require_clean=False)

    store.finish_build(plan.build_id, "cancelled")
    build = lineage.get_build(dead).build
    assert (build.status, build.stage) == ("interrupted", "customize")


def test_the_reaper_flow_releases_what_a_dead_build_left():
    from prefect.logging import disable_run_logger

    from flows.reaper import reaper

    cloud = LocalCloud()
    dead = build_in_a_process_that_ends("wait_boot")
    instance = local_instance(cloud, dead)

    with disable_run_logger():
        lines = reaper.fn()

    assert {"cloud": "local", "region": "", "kind": "instance", "id": instance, "build": dead, "found_in": "tags",
            "action": "released"} in lines  # fmt: skip
    assert not (cloud.state_dir / instance).exists()


def test_a_resource_created_after_ctrl_c_released_its_build_is_released_at_once():
    from tasks.common import CancelledDuringCreate, ledgered, release_open
    from tests.tasks.test_stages import new_plan

    plan = new_plan()
    with pytest.raises(CancelledDuringCreate), ledgered(plan, kind="instance", name="kiln-race") as created:
        release_open(plan)  # Ctrl-C's cleanup runs while the cloud call is under way
        created("i-0123456789ab")  # …which then returns the new instance

    assert [r.resource_id for r in plan.cloud.released] == ["i-0123456789ab"]
    assert store.open_resources(plan.build_id) == []
    store.finish_build(plan.build_id, "cancelled")


def test_a_resource_whose_id_arrives_while_ctrl_c_reads_the_ledger_is_released_by_that_cleanup(monkeypatch):
    from tasks.common import ledgered, release_open
    from tests.tasks.test_stages import new_plan

    plan = new_plan()
    read_open_rows = store.open_resources

    def rows_then_the_cloud_call_returns(build_id: str | None = None):  # noqa: ANN202
        rows = read_open_rows(build_id)  # the cleanup sees the intent row without an id…
        created("i-0fedcba987654")  # …and the cloud call reports its new instance before the cleanup acts
        return rows

    with ledgered(plan, kind="instance", name="kiln-race") as created:
        monkeypatch.setattr(store, "open_resources", rows_then_the_cloud_call_returns)
        assert release_open(plan) == []
        monkeypatch.setattr(store, "open_resources", read_open_rows)

    assert [r.resource_id for r in plan.cloud.released] == ["i-0fedcba987654"]
    assert store.open_resources(plan.build_id) == []
    store.finish_build(plan.build_id, "cancelled")
