"""What is running where: kiln's flow runs in Running state on the Prefect server (deployment, worker, host),
joined with provenance's running builds (build id, recipe, target, stage) by the flow run a worker started."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from sqlmodel import Session, select

from provenance import lineage, store
from provenance.models import Build, RecipeVersion


@dataclass
class Running:
    """One running kiln build (or a kiln flow run that has not opened a build yet)."""

    flow_run: str  # the deployment's run (or the build's own run, for a `kiln build` on a laptop)
    deployment: str | None
    worker: str | None
    host: str | None
    pid: int | None
    build_id: str | None = None
    recipe: str | None = None
    target: str | None = None
    cloud: str | None = None
    stage: str | None = None
    since: str | None = None


def running() -> list[Running]:
    """Every running kiln build, whether a worker (through a deployment) or a `kiln build` runs it."""
    found: list[Running] = []
    seen_builds: set[str] = set()
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            # PAUSED: a worker's run paused for hands on its build machine still holds it (and its VM slot)
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PAUSED])),
            tags=FlowRunFilterTags(all_=["kiln"]),
        ))  # fmt: skip
        deployments: dict[str, str] = {}
        for run in runs:
            if run.deployment_id is None:
                continue
            if str(run.deployment_id) not in deployments:
                deployments[str(run.deployment_id)] = client.read_deployment(run.deployment_id).name
            builds = builds_of_run(str(run.id))
            host, pid = _infrastructure(run.infrastructure_pid)
            if not builds:
                found.append(Running(str(run.id), deployments[str(run.deployment_id)], None, host, pid,
                                     since=_iso(run.start_time)))
            for summary in builds:
                seen_builds.add(summary.build.id)
                found.append(_row(str(run.id), deployments[str(run.deployment_id)], summary))
    for summary in lineage.list_builds(status="running", limit=500):
        if summary.build.id not in seen_builds:  # `kiln build` in a terminal, or a server kiln cannot see
            found.append(_row(summary.build.flow_run_id or "", None, summary))
    return found


def builds_of_run(flow_run_id: str, *, running_only: bool = True) -> list[lineage.BuildSummary]:
    """The builds a worker's flow run made (build_recipe runs its targets' build_image flows in threads, which
    Prefect records as runs of their own, so the link is the flow run id the worker gave the process)."""
    query = (
        select(Build, RecipeVersion)
        .join(RecipeVersion, Build.recipe_version_id == RecipeVersion.id)
        .where(Build.parameters_json.contains(json.dumps({"worker_flow_run": flow_run_id})[1:-1]))
        .order_by(Build.started)
    )
    if running_only:
        query = query.where(Build.status == "running")
    with Session(store.engine()) as session:
        return [lineage.BuildSummary(build=b, recipe=r) for b, r in session.exec(query).all()]


def _row(flow_run: str, deployment: str | None, summary) -> Running:  # noqa: ANN001 - lineage.BuildSummary
    build = summary.build
    worker = json.loads(build.parameters_json or "{}").get("worker")
    return Running(flow_run, deployment, worker, build.host, build.pid, build.id, summary.recipe.name,
                   build.target, build.cloud + (f" {build.region}" if build.region else ""),
                   f"paused before {build.paused_before}" if build.paused_before else build.stage,
                   _iso(build.started))


def _infrastructure(value: str | None) -> tuple[str | None, int | None]:
    """A process worker records the flow run's pid; other workers may record host:pid."""
    if not value:
        return None, None
    host, _, pid = value.rpartition(":")
    return host or None, int(pid) if pid.isdigit() else None


def _iso(when: dt.datetime | None) -> str | None:
    return when.isoformat(timespec="seconds") if when else None


def as_dicts(rows: list[Running]) -> list[dict]:
    return [asdict(row) for row in rows]
