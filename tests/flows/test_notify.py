"""Notifications of finished builds: a real build that fails at fetch_base (no VM) tells a JSON webhook served
here its failed stage, reason and `kiln show` line; a URL nobody answers is logged and fails nothing; a bad
KILN_NOTIFY stops `kiln build` before anything starts. (The success message: test_build_local, on the session's
real build of recipes/hello.yaml; a worker build's message: test_deployments.)"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from typer.testing import CliRunner

from kiln.cli import app
from provenance import lineage
from tests.flows.conftest import committed_recipe, git
from tests.webhook import Webhook, dead_url, webhook

runner = CliRunner()


def unknown_base_recipe(tmp_path: Path, name: str, notify: list[str] = ()) -> Path:
    """A recipe whose base is a local kiln image that does not exist: the build fails at fetch_base."""
    told = f"notify: {json.dumps(list(notify))}\n" if notify else ""
    return committed_recipe(tmp_path, f"""name: {name}
version: 1.0.0
targets:
  local: {{base: {{image: img-000000000000}}, ssh_user: debian}}
{told}""")


@pytest.fixture(scope="module")
def hook() -> Iterator[Webhook]:
    with webhook() as served:
        yield served


def flow_run_logs(flow_run_id: str, containing: str, wait: float = 15) -> list[str]:
    """The run's log lines with `containing`, waiting for Prefect's batched log shipping to deliver them."""
    deadline = time.monotonic() + wait
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            found = [entry.message for entry in logs if containing in entry.message]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.5)


def test_a_failed_cli_build_tells_its_stage_reason_and_kiln_show_line(prefect_api, hook, tmp_path, monkeypatch):
    recipe = unknown_base_recipe(tmp_path, "notify-fails")
    monkeypatch.setenv("KILN_NOTIFY", f"{hook.url('cli-failure')} {dead_url()}")

    result = runner.invoke(app, ["build", str(recipe), "--json"])

    assert result.exit_code == 1, result.output
    [outcome] = json.loads(result.stdout)
    [message] = hook.messages("cli-failure")
    assert message["type"] == "failure"
    assert message["title"] == "kiln: notify-fails 1.0.0 FAILED for local at fetch_base"
    commit = git(recipe.parent, "rev-parse", "HEAD")
    assert message["message"].splitlines() == [
        f"recipe: notify-fails 1.0.0 (recipe.yaml), commit {commit[:12]}",
        "target: local on local",
        f"build: {outcome['build_id']}",
        "failed stage: fetch_base",
        f"reason: {lineage.get_build(outcome['build_id']).build.error}",
        f"details: kiln show {outcome['build_id']} --logs",
    ]
    assert "img-000000000000 is not a local kiln image" in message["message"]
    build = lineage.get_build(outcome["build_id"]).build
    assert (build.status, build.stage, build.trigger) == ("failed", "fetch_base", "cli")
    warnings = flow_run_logs(build.flow_run_id, "could not notify")
    assert len(warnings) == 1 and "json://127.0.0.1:" in warnings[0] and "nobody-listens" in warnings[0]


def test_a_bad_kiln_notify_url_stops_kiln_build_before_anything_starts(prefect_api, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_NOTIFY", "pager://on-call")
    builds_before = len(lineage.list_builds(limit=1000))

    result = runner.invoke(app, ["build", str(unknown_base_recipe(tmp_path, "notify-bad")), "--json"])

    assert result.exit_code == 2, result.output
    assert "KILN_NOTIFY: pager://… is not a notification URL apprise can" in result.stderr
    assert len(lineage.list_builds(limit=1000)) == builds_before
