"""How a build was started, read from Prefect's own record of the run rather than from a parameter anyone can set."""

from __future__ import annotations

from typing import Any

from prefect.context import FlowRunContext


def trigger_of_this_run() -> str:
    """The trigger to record for the flow run in progress, from its root run (the run that started it all):

    - cli: the flow was called in a process (`kiln build`, Python), not run from a deployment;
    - schedule: the server's scheduler created the root run (a deployment's schedule), e.g. nightly-rebuild,
      whose fanned-out build-image runs are children of the scheduled run;
    - automation: a Prefect automation created it;
    - ui: anyone else created a run of a deployment: the Prefect UI or its REST API (`prefect deployment run`,
      run_deployment). Prefect's open-source server records no difference between the two.
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return "cli"
    return trigger_of(root_run(context.flow_run))


def trigger_of(run: Any) -> str:  # a prefect.client.schemas.objects.FlowRun
    if run.deployment_id is None:
        return "cli"
    if run.auto_scheduled:
        return "schedule"
    created_by = getattr(run, "created_by", None)
    if created_by is not None and str(created_by.type).upper() == "AUTOMATION":
        return "automation"
    return "ui"


def root_run(run: Any) -> Any:
    """Follow a run up through the runs that created it (a subflow's parent, run_deployment's caller) to the
    first one; no API call for a run nobody else created."""
    if run.parent_task_run_id is None:
        return run
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while run.parent_task_run_id is not None:
            parent_task = client.read_task_run(run.parent_task_run_id)
            if parent_task.flow_run_id is None:
                break
            run = client.read_flow_run(parent_task.flow_run_id)
    return run
