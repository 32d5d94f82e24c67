"""The whole build DAG on the local cloud with real VMs: success, a failing script, and Ctrl-C during customize."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kiln import settings
from provenance import lineage, store
from tests.flows.conftest import KILN, FailedScriptBuild, HelloBuild, committed_recipe, run_kiln

pytestmark = pytest.mark.vm

STAGES = ["fetch_base", "launch", "wait_boot", "customize", "sanitize", "snapshot", "verify", "register"]


def qemu_processes() -> list[str]:
    """QEMU processes running a disk of this test session's kiln home (other kiln users may run their own)."""
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(settings.data_dir()) in line]


def assert_nothing_left(build_id: str) -> None:
    assert store.open_resources(build_id) == [], "every ledger row must be released"
    assert qemu_processes() == [], "no qemu process may outlive a build"
    leftovers = [p.name for p in settings.state_dir().iterdir()] if settings.state_dir().exists() else []
    assert leftovers == [], f"no overlay, seed or state directory may be left: {leftovers}"


def show(build_id: str) -> dict:
    result = run_kiln("show", build_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_hello_recipe_builds_verifies_and_records_everything(hello_build: HelloBuild):
    recipe, commit, outcome = hello_build.recipe, hello_build.commit, hello_build.outcome  # `kiln build`'s

    assert outcome["status"] == "succeeded" and outcome["image_id"].startswith("img-")
    detail = show(outcome["build_id"])
    assert [(s["stage"], s["status"]) for s in detail["steps"]] == [(s, "succeeded") for s in STAGES]
    probes = {p["name"]: p["passed"] for p in detail["probes"]}
    assert probes == {"command cat /etc/kiln-hello": True, "port :22": True, "build key rejected": True}
    logs = {s["stage"]: s["log"] for s in detail["steps"]}
    # One SSH command ran every operation, and the log still says what each removed (or that the recipe disabled it).
    assert "ssh-hostkeys: /etc/ssh/ssh_host_ed25519_key\n" in logs["sanitize"]
    assert "machine-id: done (" in logs["sanitize"] and "dhcp-client-state: done (" in logs["sanitize"]
    assert "disabled by the recipe: zero-free-space" in logs["sanitize"]
    assert "guest powering off" in logs["snapshot"]
    assert detail["recipe"]["commit"] == commit and detail["recipe"]["dirty"] is False
    from kiln.recipe import load_recipe

    assert detail["recipe"]["fingerprint"] == load_recipe(recipe).fingerprint()

    [image] = lineage.find_image(outcome["image_id"])
    assert image.parent_image_id and image.parent_image_id != outcome["image_id"]
    [parent] = lineage.find_image(image.parent_image_id)
    assert parent.image.kind == "base"
    assert Path(image.image.path).is_file() and image.image.sha256 and image.build_id == outcome["build_id"]
    assert_nothing_left(outcome["build_id"])
    assert parent_flow_name(lineage.get_build(outcome["build_id"]).build.flow_run_id) == "build-recipe"


def parent_flow_name(flow_run_id: str) -> str | None:
    """The flow whose run started this one as a subflow (the Prefect UI nests a target's run under it)."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        if run.parent_task_run_id is None:
            return None
        parent = client.read_flow_run(client.read_task_run(run.parent_task_run_id).flow_run_id)
        return client.read_flow(parent.flow_id).name


def test_failing_script_fails_customize_and_releases_every_resource(failed_script_build: FailedScriptBuild):
    result, outcome = failed_script_build.result, failed_script_build.outcome  # `kiln build --json`'s

    assert result.returncode == 1, result.stdout + result.stderr
    assert outcome["status"] == "failed" and outcome["stage"] == "customize"
    assert "scripts/fail.sh" in outcome["error"] and "exit code 3" in outcome["error"]
    detail = show(outcome["build_id"])
    assert [s["stage"] for s in detail["steps"]] == STAGES[:4]
    assert detail["steps"][-1]["status"] == "failed"
    assert "about to fail" in detail["steps"][-1]["log"]
    assert detail["images"] == []
    assert_nothing_left(outcome["build_id"])


def _wait_for_stage(recipe_name: str, stage: str, timeout: float = 1500) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for build in lineage.list_builds(recipe=recipe_name):
            detail = lineage.get_build(build.build.id)
            if any(s.stage == stage and s.status == "running" for s in detail.steps):
                return build.build.id
        time.sleep(1)
    raise AssertionError(f"no build of {recipe_name} reached {stage} in {timeout}s")


def test_ctrl_c_during_customize_cleans_up_and_records_cancelled(tmp_path, prefect_api):
    recipe = committed_recipe(
        tmp_path,
        "name: sleeper\nversion: '1'\ntargets:\n  local: {base: {bootstrap: debian-bookworm}, memory_mb: 1024}\n"
        "scripts: [{inline: 'echo sleeping; sleep 600', name: sleep}]\nverify: [{port: {port: 22}}]\n",
    )
    # SIGINT at its default in the child: a test run started in the background by a shell without job control
    # would otherwise pass on "SIGINT ignored", and the Ctrl-C would do nothing.
    proc = subprocess.Popen([str(KILN), "build", str(recipe), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        build_id = _wait_for_stage("sleeper", "customize")
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    build = lineage.get_build(build_id).build
    assert build.status == "cancelled" and build.stage == "customize"
    assert_nothing_left(build_id)
