"""nightly-rebuild under a deployment: one build-image run per stale recipe × target, each awaited and reported."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.logging import disable_run_logger
from prefect.states import Completed, Failed

from flows import nightly
from flows.nightly import NightlyDecision, submit_builds, wait_for_builds
from tests.prefect_server import prefect_server


@pytest.fixture(scope="module")
def build_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server with the build-image deployment (no worker: the test plays the worker's part)."""
    home = tmp_path_factory.mktemp("nightly-prefect")
    with prefect_server(home) as api_url:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            flow_id = client.create_flow_from_name("build-recipe")
            client.create_deployment(flow_id=flow_id, name="build-image", entrypoint="flows.build:build_recipe",
                                     tags=["kiln"])
            yield api_url


def test_each_stale_target_becomes_its_own_build_image_run(build_deployment, tmp_path: Path):
    stale = [
        NightlyDecision("recipes/a.yaml", "local", "rebuild", "no good image"),
        NightlyDecision("recipes/a.yaml", "ec2", "rebuild", "no good image"),
        NightlyDecision("recipes/b.yaml", "local", "rebuild", "no good image"),
    ]

    submit_builds(stale)

    with get_client(sync_client=True) as client:
        runs = [client.read_flow_run(d.flow_run_id) for d in stale]
        deployment = client.read_deployment_by_name(nightly.BUILD_DEPLOYMENT)
        assert {run.deployment_id for run in runs} == {deployment.id}
        assert [run.parameters for run in runs] == [
            {"request": {"recipe": d.recipe, "targets": [d.target], "use_cache": False}} for d in stale
        ]
        assert all(run.state.is_scheduled() for run in runs), "submitted, not run here: a worker takes them"
        # the workers' part: two finish, one crashes before recording a build
        client.set_flow_run_state(runs[0].id, Completed(), force=True)
        client.set_flow_run_state(runs[1].id, Completed(), force=True)
        client.set_flow_run_state(runs[2].id, Failed(message="worker lost"), force=True)

    wait_for_builds(stale, poll_seconds=0.2)

    lost = "no build recorded (Failed: worker lost)"
    assert [d.status for d in stale] == ["no build recorded (Completed)"] * 2 + [lost]
    assert [d.build_id for d in stale] == [None] * 3


def test_nightly_fans_out_when_asked_and_reports_skips_with_their_reason(monkeypatch, tmp_path: Path):
    submitted: list[list[NightlyDecision]] = []
    monkeypatch.setattr(nightly, "plan_night", lambda directory, targets, margin: [
        NightlyDecision("recipes/a.yaml", "local", "rebuild", "stale"),
        NightlyDecision("recipes/b.yaml", "local", "skip", "up to date"),
    ])  # fmt: skip
    monkeypatch.setattr(nightly, "submit_builds", lambda stale, use_cache: submitted.append(stale))
    monkeypatch.setattr(nightly, "wait_for_builds", lambda stale: [setattr(d, "status", "succeeded") for d in stale])

    with disable_run_logger():
        result = nightly.nightly_rebuild.fn(str(tmp_path), fan_out=True)

    assert [[d.recipe for d in batch] for batch in submitted] == [["recipes/a.yaml"]]
    assert [(r["recipe"], r["action"], r["status"]) for r in result] == [
        ("recipes/a.yaml", "rebuild", "succeeded"), ("recipes/b.yaml", "skip", None),
    ]  # fmt: skip
