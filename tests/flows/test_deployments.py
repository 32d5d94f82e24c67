"""The Prefect front door as the README sets it up: a real server, the kiln work pool made from
deployments/work-pool.json, every deployment of deployments/prefect.yaml, `kiln limits set`, and a real
`prefect worker start --pool kiln` running flow runs against this session's provenance database.

One server and one worker serve the whole module: the deployments' shape, a schedule that really fires, and
(below) what the worker's runs record and show.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
from prefect.client.schemas.schedules import CronSchedule

from bench.nightly import make_recipes, seed_good_images
from tests.conftest import REPO
from tests.flows.conftest import KILN
from tests.prefect_server import PREFECT, prefect_server, server_env, stop_group

SCHEDULE_DEADLINE_SECONDS = 180  # the bar: a run of an every-minute schedule completes within 3 minutes


@dataclass
class FrontDoor:
    api_url: str
    home: Path  # PREFECT_HOME: server.log and worker.log are here
    env: dict[str, str]  # what the README's shell has exported (PREFECT_API_URL, the session's KILN_HOME)

    def server_log(self) -> str:
        return (self.home / "server.log").read_text(errors="replace")

    def worker_log(self) -> str:
        return (self.home / "worker.log").read_text(errors="replace")


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def front_door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontDoor]:
    """README, "From the Prefect UI and on a schedule", step by step, from the kiln checkout."""
    home = tmp_path_factory.mktemp("front-door")
    with prefect_server(home, limits={}) as api_url:
        env = server_env(home, api_url) | {"KILN_HOME": os.environ["KILN_HOME"]}
        env.pop("KILN_DATABASE_URL", None)
        _run([str(PREFECT), "--no-prompt", "work-pool", "create", "kiln", "--type", "process",
              "--base-job-template", "deployments/work-pool.json"], env)  # fmt: skip
        _run([str(PREFECT), "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], env)
        _run([str(KILN), "limits", "set", "local", "1"], env)
        log = (home / "worker.log").open("w")
        worker = subprocess.Popen([str(PREFECT), "worker", "start", "--pool", "kiln"], cwd=REPO, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            yield FrontDoor(api_url, home, env)
        finally:
            stop_group(worker, grace=30)
            log.close()


def _client(door: FrontDoor):  # noqa: ANN202 - a Prefect SyncPrefectClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: door.api_url}):
        return get_client(sync_client=True)


def test_prefect_yaml_deploys_every_deployment_into_the_kiln_pool(front_door: FrontDoor):
    with _client(front_door) as client:
        build = client.read_deployment_by_name("build-recipe/build-image")
        nightly = client.read_deployment_by_name("nightly-rebuild/nightly-rebuild")
        reaper = client.read_deployment_by_name("reaper/reaper")
        pool = client.read_work_pool("kiln")
        names = {d.name for d in client.read_deployments()}
        limits = {limit.name: limit.limit for limit in client.read_global_concurrency_limits()}

    assert build.entrypoint == "flows.build:build_recipe"
    request = build.parameter_openapi_schema["definitions"]["BuildRequest"]["properties"]
    assert {"recipe", "targets", "on_error", "require_clean"} <= set(request)
    assert request["on_error"]["enum"] == ["cleanup", "abort", "ask"]  # ask: a worker run has no terminal: cleanup
    assert build.work_pool_name == "kiln"
    assert str(REPO) in str(build.job_variables.get("working_dir"))
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.schedules[0].schedule.timezone == "UTC"
    assert nightly.entrypoint == "flows.nightly:nightly_rebuild"
    assert names == {"build-image", "nightly-rebuild", "audit", "reaper", "lineage"}
    assert build.parameters["request"]["recipe"] == "recipes/hello.yaml" and "trigger" not in build.parameters
    assert "trigger" not in build.parameter_openapi_schema["properties"]
    lineage_form = client_read_lineage(front_door).parameter_openapi_schema["properties"]["image_id"]
    assert "AMI" in lineage_form["description"]
    assert pool.type == "process"
    assert pool.base_job_template["variables"]["properties"]["stream_output"]["default"] is False
    assert reaper.entrypoint == "flows.reaper:reaper"
    assert [s.schedule.cron for s in reaper.schedules] == ["17 * * * *"]
    assert reaper.parameters == {"older_than": "15m"}
    assert limits == {"kiln-vms-local": 1}


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r"\bERROR\b", line)]


def test_a_schedule_every_minute_fires_and_the_worker_completes_the_night(front_door: FrontDoor, tmp_path: Path):
    """The server's scheduler creates the runs (no run is created by hand), the worker runs one: nightly-rebuild
    over recipes that are all up to date, so it completes with every recipe skipped; the server logs no ERROR."""
    recipes = make_recipes(tmp_path / "recipes", 2)
    seed_good_images(recipes)  # into the session's database, which the worker's runs use too
    started = time.monotonic()
    with _client(front_door) as client:
        nightly = client.read_deployment_by_name("nightly-rebuild/nightly-rebuild")
        client.create_deployment_schedules(
            nightly.id, [(CronSchedule(cron="* * * * *", timezone="UTC"), True)],
            parameters={"recipes_dir": str(tmp_path / "recipes")}, slug="every-minute",
        )  # fmt: skip
        completed = None
        while completed is None and time.monotonic() - started < SCHEDULE_DEADLINE_SECONDS:
            time.sleep(5)
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(),
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id])),
            )
            completed = next((r for r in runs if r.state and r.state.is_completed()), None)
        elapsed = time.monotonic() - started
        assert completed is not None, (
            f"no completed nightly run within {SCHEDULE_DEADLINE_SECONDS} s; runs: "
            f"{[(r.name, r.state_name, r.auto_scheduled) for r in runs]}\n{front_door.worker_log()[-3000:]}"
        )
        decisions = night_report(client, completed.id)
        scheduled = [r for r in runs if r.auto_scheduled]
        client.delete_deployment_schedule(nightly.id, next(s.id for s in client.read_deployment_schedules(nightly.id)
                                                           if s.schedule.cron == "* * * * *"))  # fmt: skip

    print(f"\nschedule every minute: completed run {completed.name} {elapsed:.0f} s after the schedule was "
          f"created; {len(scheduled)} runs scheduled by the server")
    assert completed.auto_scheduled, "created by the server's scheduler"
    assert completed.parameters["recipes_dir"] == str(tmp_path / "recipes")
    assert [(row["action"], row["reason"].split(":")[0]) for row in decisions] == [("skip", "up to date")] * 2
    assert error_lines(front_door.server_log()) == []



def night_report(client, flow_run_id) -> list[dict]:  # noqa: ANN001 - a Prefect client and a flow run id
    """The rows of the nightly-rebuild run's table artifact: one per recipe × target, with its action and reason."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
        any_=[flow_run_id])))
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def client_read_lineage(door: FrontDoor):  # noqa: ANN201 - a Prefect Deployment
    with _client(door) as client:
        return client.read_deployment_by_name("lineage/lineage")


def run_through_the_worker(door: FrontDoor, deployment: str, parameters: dict, timeout: float = 240):  # noqa: ANN201
    """A run created through the API, as the UI's Run button does, taken by the module's worker."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: door.api_url}):
        run = run_deployment(deployment, parameters=parameters, timeout=timeout, poll_interval=1, as_subflow=False)
    assert run.state is not None and run.state.is_completed(), (run.state, door.worker_log()[-3000:])
    return run


def artifacts_of(door: FrontDoor, flow_run_id) -> list:  # noqa: ANN001
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client(door) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def test_a_worker_build_records_trigger_ui_summarises_its_targets_and_notifies_the_failed_stage(
    front_door: FrontDoor, tmp_path: Path
):
    from provenance import lineage
    from tests.flows.test_notify import unknown_base_recipe
    from tests.webhook import webhook

    with webhook() as hook:
        recipe = unknown_base_recipe(tmp_path, "worker-fails", notify=[hook.url("worker")])
        run = run_through_the_worker(front_door, "build-recipe/build-image",
                                     {"request": {"recipe": str(recipe), "targets": ["local"]}})  # fmt: skip
        [message] = hook.messages("worker", wait=10)

    [summary] = [a for a in artifacts_of(front_door, run.id) if a.key == "kiln-worker-fails-summary"]
    [row] = json.loads(summary.data) if isinstance(summary.data, str) else summary.data
    build = lineage.get_build(row["details"].removeprefix("kiln show ")).build
    assert (row["target"], row["status"], row["stage"], row["image"]) == ("local", "failed", "fetch_base", "")
    assert "img-000000000000 is not a local kiln image" in row["error"] and row["duration"].endswith(" s")
    assert (build.trigger, build.status, build.stage) == ("ui", "failed", "fetch_base")
    assert json.loads(build.parameters_json)["worker"], "run by the worker"
    assert message["type"] == "failure"
    assert message["title"] == "kiln: worker-fails 1.0.0 FAILED for local at fetch_base"
    assert f"kiln show {build.id} --logs" in message["message"]


def test_the_lineage_deployment_names_what_kiln_lineage_json_names(front_door: FrontDoor):
    from typer.testing import CliRunner

    from kiln.cli import app
    from tests.provenance.seeded_chain import seed_chain

    seed_chain()  # in the session's database, which the worker's runs read
    expected = json.loads(CliRunner().invoke(app, ["lineage", "img-aaaaaaaaaaaa", "--format", "json"]).stdout)

    run = run_through_the_worker(front_door, "lineage/lineage", {"image_id": "img-aaaaaaaaaaaa"})

    [artifact] = [a for a in artifacts_of(front_door, run.id) if a.key == "kiln-lineage-img-aaaaaaaaaaaa"]
    sections = markdown_sections(artifact.data)
    assert sections["title"] == ["# Lineage of `img-aaaaaaaaaaaa`"]
    for title, nodes in (("Ancestors (nearest first)", expected["ancestors"]),
                         ("Children", [d for d in expected["descendants"] if d["depth"] == 1]),
                         ("Further descendants", [d for d in expected["descendants"] if d["depth"] > 1]),
                         ("Siblings (same recipe version or same bits)", expected["siblings"])):  # fmt: skip
        assert len(sections[title]) == max(len(nodes), 1), (title, sections[title])
        for line, node in zip(sections[title], nodes, strict=False):
            assert named(line, node), (title, line, node["image_id"])
    assert [d["image_id"] for d in expected["siblings"]] == ["img-aaaaaaaaaaaa.raw", "ami-0sibling"]
    assert expected["children"] == ["img-bbbbbbbbbbbb"]


def markdown_sections(markdown: str) -> dict[str, list[str]]:
    """The artifact's lines by section: "title" for the heading, then each "## …" section's list items."""
    sections: dict[str, list[str]] = {"title": []}
    current = "title"
    for line in markdown.splitlines():
        if line.startswith("## "):
            current = line.removeprefix("## ")
            sections[current] = []
        elif line.startswith("# ") or (line.startswith(("- ", "None.")) and current != "title"):
            sections[current].append(line)
    return sections


def named(line: str, node: dict) -> bool:
    """Whether a markdown item names this image: its id, or for a base known by a host path, its digest."""
    if node["kind"] == "base" and node["image_id"].startswith("/"):
        return f"sha256 {node['sha256'][:16]}" in line and node["image_id"] not in line
    return line.startswith(f"- `{node['image_id']}`")
