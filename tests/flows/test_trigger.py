"""A build's trigger comes from Prefect's record of the run, never from a parameter: schedule, ui, automation, cli."""

from __future__ import annotations

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import CreatedBy
from prefect.deployments import run_deployment

from flows.trigger import root_run, trigger_of, trigger_of_this_run


def _deployment(client) -> str:  # noqa: ANN001 - a Prefect client
    flow_id = client.create_flow_from_name("trigger-test")
    return client.create_deployment(flow_id=flow_id, name="trigger-test", entrypoint="tests.flows:none")


def test_a_deployment_run_is_ui_scheduled_or_automation_and_a_flow_called_in_process_is_cli(prefect_api):
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(_deployment(client))
        by_hand = client.read_flow_run(run.id)

    assert trigger_of(by_hand) == "ui"
    assert trigger_of(by_hand.model_copy(update={"auto_scheduled": True})) == "schedule"
    automation = CreatedBy(id=None, type="AUTOMATION", display_value="rebuild on CVE")
    assert trigger_of(by_hand.model_copy(update={"created_by": automation})) == "automation"
    assert trigger_of(by_hand.model_copy(update={"deployment_id": None})) == "cli"


def test_a_run_created_by_another_run_takes_its_root_run_s_trigger(prefect_api):
    """nightly-rebuild's fanned-out build-image runs are children of the scheduled run that created them."""

    @flow(name="trigger-test-parent")
    def parent(deployment_name: str) -> tuple[str, str, str]:
        child = run_deployment(deployment_name, timeout=0)  # as nightly's submit_builds does
        return str(child.id), trigger_of_this_run(), str(parent_run_id())

    with get_client(sync_client=True) as client:
        _deployment(client)
    child_id, own_trigger, parent_id = parent("trigger-test/trigger-test")

    with get_client(sync_client=True) as client:
        child = client.read_flow_run(child_id)
    assert child.parent_task_run_id is not None
    assert str(root_run(child).id) == parent_id
    assert trigger_of(child) == "ui" and trigger_of(root_run(child)) == own_trigger == "cli"


def parent_run_id() -> str:
    from prefect.runtime import flow_run

    return flow_run.id
