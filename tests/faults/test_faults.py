"""Fault injection: `kiln build` SIGKILLed when it reaches a stage, then `kiln gc`: no kiln resource of the build
is left and the build shows interrupted at that stage. SIGINT: the build cleans up in-process, gc finds nothing.

The kill is a test plugin on the subprocess's PYTHONPATH (tests/faults/plugin/sitecustomize.py), not a branch in
kiln. Local builds run in their default container (working copy, loop device, mount, nspawn, network namespace) at
every stage before verify, and in a QEMU guest (build_in: vm) at launch and wait_boot; moto and OpenStack runs are
in test_cloud_faults.py.
conftest.py prints the table stage × backend → resources left after gc.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from clouds.base import TAG_BUILD, KeyPair
from clouds.local import LocalCloud
from core import settings
from provenance import lineage, store
from tests.conftest import REPO
from tests.flows.conftest import KILN, hello_recipe
from tests.flows.test_build_local import container_traces
from tests.secret_scan import key_needles, scan_database, scan_files, scan_image

PLUGIN = Path(__file__).resolve().parent / "plugin"
RESULTS: dict[tuple[str, str], str] = {}  # (stage, backend) -> resources left after gc, for the table
KILLED: dict[str, list[str]] = {}  # build id -> its kiln resources just after the kill
SCANNED: list[str] = []  # what the secret scan covered
KILL_POINT = {"launch": "after-launch", "snapshot": "after-snapshot"}  # else: at the stage's start


def kiln_build_with_fault(recipe: Path, target: str, fault: str, timeout: float = 900,
                          key_dump: Path | None = None, env: dict[str, str] | None = None,
                          ) -> subprocess.CompletedProcess:  # fmt: skip
    env = {**os.environ, **(env or {}), "KILN_FAULT": fault,
           "PYTHONPATH": os.pathsep.join([str(PLUGIN), str(REPO)])}  # fmt: skip
    if key_dump is not None:
        env["KILN_KEY_DUMP"] = str(key_dump)
    return subprocess.run([str(KILN), "build", str(recipe), "--target", target, "--json"], env=env,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=_default_sigint)  # fmt: skip


def _default_sigint() -> None:
    # A test run started in the background by a shell without job control inherits SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler: the SIGINT fault would do nothing. The build gets the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kiln_gc() -> subprocess.CompletedProcess:
    result = subprocess.run([str(KILN), "gc"], capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def newest_build(recipe_name: str) -> str:
    [summary, *_] = lineage.list_builds(recipe=recipe_name, limit=1)
    return summary.build.id


def local_left(build_id: str) -> list[str]:
    cloud = LocalCloud()
    return [f"{r.kind} {r.resource_id}" for r in cloud.owned({TAG_BUILD: build_id})]


def kill_and_collect(recipe: Path, target: str, stage: str, left, before_gc=None, key_dump: Path | None = None
                     ) -> tuple[str, list[str], str]:  # noqa: ANN001  # fmt: skip
    """SIGKILL at `stage`; returns the build id, what gc left, and gc's output (KILLED: what was there before)."""
    fault = f"SIGKILL:{stage}:{KILL_POINT.get(stage, 'start')}"
    result = kiln_build_with_fault(recipe, target, fault, key_dump=key_dump)
    assert result.returncode == -9, f"the build was not killed at {stage}:\n{result.stdout}\n{result.stderr}"
    build_id = newest_build(recipe_name(recipe))
    assert lineage.get_build(build_id).build.status == "running", "killed, nobody has noticed yet"
    KILLED[build_id] = left(build_id)
    if before_gc is not None:
        before_gc(build_id)
    gc = kiln_gc()
    return build_id, left(build_id), gc.stdout


def recipe_name(recipe: Path) -> str:
    from core.recipe import load_recipe

    return load_recipe(recipe).name


def assert_reaped(build_id: str, stage: str, left: list[str]) -> None:
    build = lineage.get_build(build_id).build
    assert (build.status, build.stage) == ("interrupted", stage)
    assert store.open_resources(build_id) == [], "every ledger row is closed"
    assert left == [], f"kiln resources left after gc: {left}"


# --------------------------------------------------------------------------------------------- local (VMs)


LOCAL_FAULTS = [*((stage, "container") for stage in ("fetch_base", "launch", "wait_boot", "customize", "snapshot")),
                *((stage, "vm") for stage in ("launch", "wait_boot"))]  # a vm kill later costs a boot: one each


@pytest.mark.vm
@pytest.mark.parametrize(("stage", "build_in"), LOCAL_FAULTS, ids=[f"{s}-{m}" for s, m in LOCAL_FAULTS])
def test_sigkill_on_the_local_cloud_then_gc_leaves_nothing_and_the_build_interrupted(
    stage, build_in, tmp_path, prefect_api  # noqa: F811
):
    recipe = hello_recipe(tmp_path, build_in=build_in)
    started = time.monotonic()
    key_dump = tmp_path / "build-key" if stage == "snapshot" else None
    scan = (lambda build_id: secrets_left_by(build_id, key_dump)) if key_dump else None

    build_id, left, gc_output = kill_and_collect(recipe, "local", stage, local_left, scan, key_dump)

    RESULTS[(stage, f"local {build_in}")] = str(len(left))
    assert_reaped(build_id, stage, left)
    if stage != "fetch_base":
        assert any(r.startswith("instance ") for r in KILLED[build_id]), "the kill left an instance to reap"
    if build_in == "container" and stage in ("launch", "wait_boot", "customize"):
        held = {r.split()[0] for r in KILLED[build_id]}
        assert {"process", "mount", "loop", "netns"} <= held, f"the kill left a running container: {held}"
    instances = [r.split()[1] for r in KILLED[build_id] if r.startswith("instance ")]
    assert not [line for line in qemu_lines() for i in instances if i in line], "no qemu of the build survives gc"
    assert container_traces() == [], "no loop device, mount or network namespace of kiln survives gc"
    if stage not in ("fetch_base",):
        assert "released" in gc_output
    if stage == "snapshot":
        assert "image" in gc_output
    assert time.monotonic() - started < 600


@pytest.mark.vm
def test_sigint_on_the_local_cloud_cleans_up_in_process_and_gc_finds_nothing(tmp_path, prefect_api):  # noqa: F811
    recipe = hello_recipe(tmp_path)

    result = kiln_build_with_fault(recipe, "local", "SIGINT:launch:after-launch")

    assert result.returncode == 130, result.stdout + result.stderr
    build_id = newest_build("hello")
    left, still_open = local_left(build_id), store.open_resources(build_id)
    gc_output = kiln_gc().stdout  # first, so a failure here leaves no qemu behind
    assert lineage.get_build(build_id).build.status == "cancelled"
    assert still_open == [] and left == []
    assert build_id[:8] not in gc_output
    assert container_traces() == []
    RESULTS[("SIGINT at launch", "local container")] = "0"


def secrets_left_by(build_id: str, key_dump: Path) -> None:
    """The secret scan of a real build's outputs, before gc removes them: the database with its step logs,
    kiln's files (catalog, statements, run state) and the snapshot's filesystem hold no private key or secret."""
    key = KeyPair(name="build", public_key="", private_key=key_dump.read_text())
    needles = key_needles(key)
    images = [r for r in LocalCloud().owned({TAG_BUILD: build_id}) if r.kind == "image"]
    assert images, "the kill after snapshot left the image to scan"
    disk = next((settings.images_dir() / images[0].resource_id).glob("*.qcow2"))
    database = settings.database_url()
    # A working disk (qcow2 overlay or a container's disk.raw) is the image before snapshot, scanned as the image
    # it becomes; read raw, it holds the files packages ship with test keys in them.
    kiln_files = [p for p in settings.data_dir().rglob("*") if not p.name.endswith((".qcow2", ".raw", ".db", ".db-wal"))
                  and settings.images_dir() not in p.parents]  # fmt: skip
    hits = scan_database(database, needles) + scan_files(kiln_files, needles) + scan_image(disk, needles)
    assert hits == [], "secrets found: " + "; ".join(map(str, hits))
    SCANNED.append(f"build {build_id[:8]}: database, {len(kiln_files)} kiln files, image {disk.name}: clean")


def qemu_lines() -> list[str]:
    return subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout.splitlines()
