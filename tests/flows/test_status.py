"""`kiln status`: kiln's Running flow runs from the Prefect API joined with provenance's running builds."""

from __future__ import annotations

import json
import os
import socket
import subprocess

from prefect.client.orchestration import get_client
from prefect.states import Running

from provenance import store
from provenance.gitinfo import GitInfo
from tests.flows.conftest import KILN
from tests.prefect_server import prefect_server, server_env


def test_status_shows_deployment_runs_with_their_host_and_terminal_builds_with_their_stage(tmp_path):
    version = store.record_recipe_version(name="hello", version="1.0.0", fingerprint="f" * 64, recipe_json="{}",
                                          git=GitInfo(in_git=False, path="/tmp/hello.yaml"))
    build = store.start_build(recipe_version_id=version, target="local", cloud="local", trigger="cli")
    store.set_build_stage(build, "customize")
    done = store.start_build(recipe_version_id=version, target="local", cloud="local", trigger="cli")
    store.finish_build(done, "succeeded")
    home = tmp_path / "prefect"
    home.mkdir()
    with prefect_server(home) as api_url:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            flow_id = client.create_flow_from_name("build-recipe")
            deployment = client.create_deployment(flow_id=flow_id, name="build-image",
                                                  entrypoint="flows.build:build_recipe", tags=["kiln"])
            run = client.create_flow_run_from_deployment(deployment)
            client.update_flow_run(run.id, infrastructure_pid="build-host-2:4242")
            client.set_flow_run_state(run.id, Running(), force=True)
            other = client.create_flow_run_from_deployment(deployment)  # scheduled, not running: not shown
        shown = subprocess.run([str(KILN), "status", "--json"], capture_output=True, text=True, timeout=120,
                               env=server_env(home, api_url) | {"KILN_HOME": os.environ["KILN_HOME"]})
        table = subprocess.run([str(KILN), "status"], capture_output=True, text=True, timeout=120,
                               env=server_env(home, api_url) | {"KILN_HOME": os.environ["KILN_HOME"], "COLUMNS": "200"})

    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    by_run = {row["flow_run"]: row for row in rows}
    assert str(other.id) not in by_run
    queued = by_run[str(run.id)]
    assert (queued["deployment"], queued["host"], queued["pid"], queued["build_id"]) == (
        "build-image", "build-host-2", 4242, None)  # fmt: skip
    [terminal] = [row for row in rows if row["build_id"] == build]
    assert terminal["deployment"] is None and terminal["worker"] is None
    assert (terminal["stage"], terminal["recipe"], terminal["cloud"]) == ("customize", "hello", "local")
    assert terminal["host"] == socket.gethostname()
    assert done not in {row["build_id"] for row in rows}
    assert table.returncode == 0 and "kiln build" in table.stdout and "customize" in table.stdout
