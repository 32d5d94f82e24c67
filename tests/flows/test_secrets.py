"""A script prints a PEM private key and an AWS secret key, then fails: neither reaches the terminal, the run's logs
on a real Prefect server (read back through its API, and its database's raw bytes), kiln's database or any file kiln
or the server wrote."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from core import settings
from provenance import lineage
from tests.flows.conftest import FailedScriptBuild
from tests.secret_scan import scan_bytes, scan_database, scan_files

pytestmark = pytest.mark.vm


def prefect_runs_of(build_id: str) -> tuple[list[str], list[str], list[str]]:
    """The build's flow runs (build-image and the build-recipe above it): their ids, their log lines and the state
    messages of their runs and task runs, all read back from the server's API."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    flow_run_id = lineage.get_build(build_id).build.flow_run_id
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        ids = [str(run.id)]
        if run.parent_task_run_id is not None:
            ids.append(str(client.read_task_run(run.parent_task_run_id).flow_run_id))
        logs, page = [], None
        while page != []:  # the API answers 200 at most per call
            page = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200,
                                    offset=len(logs))
            logs += page
        runs = [client.read_flow_run(run_id) for run_id in ids]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    messages = [r.state.message or "" for r in [*runs, *tasks] if r.state is not None]
    return ids, [log.message for log in logs], messages


def test_secrets_printed_by_a_failing_script_reach_no_terminal_log_database_or_artifact(
    failed_script_build: FailedScriptBuild,
) -> None:
    build, needles = failed_script_build, failed_script_build.needles
    assert build.result.returncode == 1 and build.outcome["stage"] == "customize", build.result.stderr
    build_id = build.outcome["build_id"]
    deadline = time.monotonic() + 60  # the API handler sends a run's logs in batches, from a thread
    while True:
        _, logs, messages = prefect_runs_of(build_id)
        if any("about to fail" in line for line in logs) or time.monotonic() > deadline:
            break
        time.sleep(1)
    # What was read is this build's output, the key's place marked: the scans below look where the secrets went.
    assert any("about to fail" in line for line in logs) and any("[REDACTED PRIVATE KEY]" in line for line in logs)
    assert any("exit code 3" in message for message in messages), messages
    step = lineage.get_build(build_id).steps[-1]
    assert "[REDACTED PRIVATE KEY]" in step.log and "aws_secret_access_key = [REDACTED]" in step.log

    hits = scan_bytes("terminal", (build.result.stdout + build.result.stderr).encode(), needles)
    hits += scan_bytes("prefect run logs (API)", "\n".join(logs).encode(), needles)
    hits += scan_bytes("prefect run and task run states (API)", "\n".join(messages).encode(), needles)
    hits += scan_database(settings.database_url(), needles)
    hits += scan_files(Path(settings.data_dir()).rglob("*"), needles, patterns=False)  # kiln.db's raw pages too
    hits += scan_files(Path(os.environ["PREFECT_HOME"]).rglob("*"), needles, patterns=False)  # events, logs, db
    assert hits == [], "\n".join(map(str, hits))
