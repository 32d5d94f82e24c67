"""The whole build DAG on the local cloud: a build in its default container (a service from Debian's mirror, started
and talked to during customize) verified in a real QEMU VM; a failing script; Ctrl-C during customize. Nothing is
left behind by any of them. (The same recipe built in a VM, build_in: vm, is tests/flows/test_hands_on.py's paused
build: the suite's one vm-mode build.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from clouds import container, disk
from core import settings
from provenance import lineage, store
from tests.flows.conftest import KILN, FailedScriptBuild, HelloBuild, committed_recipe, run_kiln

pytestmark = pytest.mark.vm

STAGES = ["fetch_base", "launch", "wait_boot", "customize", "sanitize", "snapshot", "verify", "register"]


def qemu_processes() -> list[str]:
    """QEMU processes running a disk of this test session's kiln home (other kiln users may run their own)."""
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(settings.data_dir()) in line]


def container_traces() -> list[str]:
    """Loop devices, mounts, network namespaces and nspawn or slirp4netns processes of this session's kiln state
    (other kiln users may run theirs)."""
    state = str(settings.state_dir())
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines()
    namespaces = sorted(p.name for p in container.NETNS_DIR.glob("kiln-i-*")) if container.NETNS_DIR.exists() else []
    return [line for line in loops if state in line] + disk.mounts_under(settings.state_dir()) + [
        ns for ns in namespaces if (settings.state_dir() / ns.removeprefix("kiln-")).exists()] + daemons_of(state)


def daemons_of(state: str) -> list[str]:
    """systemd-nspawn and slirp4netns processes started for an instance under state: by their command line, or by
    their output going to a file there (slirp4netns's log; its command line names only the network namespace)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            tool = os.path.basename(args[0].decode(errors="replace"))
            if tool in (container.NSPAWN, container.SLIRP) and (
                any(state.encode() in arg for arg in args) or os.readlink(entry / "fd/1").startswith(state)
            ):
                found.append(f"process {entry.name} {tool}")
        except (OSError, ValueError):
            continue
    return found


def assert_nothing_left(build_id: str) -> None:
    assert store.open_resources(build_id) == [], "every ledger row must be released"
    assert qemu_processes() == [], "no qemu process may outlive a build"
    assert container_traces() == [], "no loop device, mount or network namespace may outlive a build"
    leftovers = [p.name for p in settings.state_dir().iterdir()] if settings.state_dir().exists() else []
    assert leftovers == [], f"no working copy, overlay, seed or state directory may be left: {leftovers}"


def show(build_id: str) -> dict:
    result = run_kiln("show", build_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_finished_build_tells_kiln_notify_what_was_built_where_and_how_it_was_proved(hello_build: HelloBuild):
    """One message to the live webhook; the dead one in KILN_NOTIFY did not fail the build (it succeeded)."""
    outcome = hello_build.outcome
    [message] = hello_build.notifications
    detail = show(outcome["build_id"])
    [image] = [i for i in detail["images"] if i["kind"] == "built"]

    assert message["type"] == "success"
    assert message["title"] == f"kiln: hello-web 1.0.0 built for local: {outcome['image_id']}"
    body = message["message"]
    assert f"commit {hello_build.commit[:12]}" in body and "recipe: hello-web 1.0.0 (recipe.yaml)" in body
    assert f"  {outcome['image_id']} (built) at {image['path']}" in body
    assert "  passed  command cat /etc/kiln-hello" in body and "  passed  build key rejected" in body
    assert "  passed  http :80/index.html" in body
    assert f"valid until: {image['valid_until'][:19]}" in body
    assert f"details: kiln show {outcome['build_id']}" in body


def took(step: dict) -> float:
    import datetime as dt

    return (dt.datetime.fromisoformat(step["finished"]) - dt.datetime.fromisoformat(step["started"])).total_seconds()


def test_a_container_build_runs_the_service_it_installs_and_its_image_is_verified_in_a_vm(hello_build: HelloBuild):
    recipe, commit, outcome = hello_build.recipe, hello_build.commit, hello_build.outcome  # `kiln build`'s

    assert outcome["status"] == "succeeded" and outcome["image_id"].startswith("img-")
    detail = show(outcome["build_id"])
    assert [(s["stage"], s["status"]) for s in detail["steps"]] == [(s, "succeeded") for s in STAGES]
    assert detail["parameters"]["build_in"] == "container"
    steps = {s["stage"]: s for s in detail["steps"]}
    assert took(steps["wait_boot"]) < 15, "a container is up in seconds"
    probes = {p["name"]: p["passed"] for p in detail["probes"]}
    assert probes == {"command cat /etc/kiln-hello": True, "http :80/index.html": True,
                      "command systemctl is-active lighttpd": True, "build key rejected": True}
    logs = {stage: step["log"] for stage, step in steps.items()}
    assert "is up (its systemd reports the system running)" in logs["wait_boot"]
    assert "installing 1 package(s) with apt: lighttpd" in logs["customize"]
    assert "lighttpd answered during customize: <p>served by kiln</p>" in logs["customize"]
    # One command ran every operation, and the log still says what each removed (or that the recipe disabled it).
    assert "machine-id: done (" in logs["sanitize"] and "dhcp-client-state: done (" in logs["sanitize"]
    assert "disabled by the recipe: zero-free-space" in logs["sanitize"]
    assert "guest powering off" in logs["snapshot"] and "trimmed" in logs["snapshot"]
    assert "SSH up, host key" in logs["verify"]  # the image itself booted in QEMU from its own disk
    assert detail["recipe"]["commit"] == commit and detail["recipe"]["dirty"] is False
    from core.recipe import load_recipe

    assert detail["recipe"]["fingerprint"] == load_recipe(recipe).fingerprint()

    [image] = lineage.find_image(outcome["image_id"])
    assert image.parent_image_id and image.parent_image_id != outcome["image_id"]
    [parent] = lineage.find_image(image.parent_image_id)
    assert parent.image.kind == "base"
    assert Path(image.image.path).is_file() and image.image.sha256 and image.build_id == outcome["build_id"]
    assert_nothing_left(outcome["build_id"])
    assert parent_flow_name(lineage.get_build(outcome["build_id"]).build.flow_run_id) == "build-recipe"
    shown = run_kiln("show", outcome["build_id"])
    assert "build_in container" in shown.stdout


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
