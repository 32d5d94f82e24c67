"""The build DAG for one target (build_image) and the fan-out over a recipe's targets (build_recipe)."""

from __future__ import annotations

import contextvars
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Literal

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from clouds import open_cloud, registry
from core import settings
from core.recipe import load_recipe
from flows.pause import forget_shell_files, pause_problem
from flows.request import BadInput, checked_request
from flows.stages import CANCELLED, release_unless_kept, run_stages
from flows.trigger import trigger_of_this_run
from operations.artifacts import build_summary_rows
from operations.notify import notify_finished_build
from provenance import gitinfo, lineage, store
from provenance.redact import describe
from tasks.common import BuildPlan, release_open

OnError = Literal["cleanup", "abort", "ask"]
_ACTIVE: dict[str, BuildPlan] = {}  # flow run id -> plan, for the flow's failure hooks in this process


@dataclass
class TargetResult:
    target: str
    build_id: str | None
    status: str
    image_id: str | None = None
    stage: str | None = None
    error: str | None = None


def worker_run() -> dict[str, str]:
    """Under a Prefect worker: its name and the flow run it started this process for (kiln status, nightly)."""
    found = {"worker": os.environ.get("PREFECT__WORKER_NAME"),
             "worker_flow_run": os.environ.get("PREFECT__FLOW_RUN_ID")}
    return {key: value for key, value in found.items() if value}


@dataclass(frozen=True)
class HandsOn:
    """Hands on the build: the stage to pause before (None: no pause) and how long a pause waits."""

    pause_before: str | None = None
    pause_timeout: float | None = None  # None: KILN_PAUSE_TIMEOUT, else 1 h


def prepare(
    recipe_path: str, target: str, *, trigger: str, on_error: str, require_clean: bool, use_cache: bool = True,
    hands_on: HandsOn = HandsOn(),  # noqa: B008 - frozen
) -> BuildPlan:
    """Validate, capture git, record the recipe version and open the Build row: nothing launched yet."""
    recipe, _ = checked_request(recipe_path, [target])
    if problem := pause_problem(hands_on.pause_before, require_clean=require_clean):
        raise BadInput(problem)
    pause_timeout = hands_on.pause_timeout or settings.pause_timeout()
    git = gitinfo.capture(recipe.path, recipe.referenced_files())
    if require_clean:
        gitinfo.require_clean(git)
    version_id = store.record_recipe_version(
        name=recipe.name,
        version=recipe.version,
        fingerprint=recipe.fingerprint(),
        recipe_json=json.dumps(recipe.stored_form(), sort_keys=True),
        git=git,
    )
    spec = recipe.targets[target]
    cloud = open_cloud(spec, recipe.timeouts, target_name=target)
    store.mark_interrupted_builds()  # a build whose process died stops being "running" when kiln next starts one
    build_id = store.start_build(
        recipe_version_id=version_id,
        target=target,
        cloud=cloud.name,
        region=cloud.region,
        trigger=trigger,
        flow_run_id=str(flow_run.id) if flow_run.id else None,
        parameters={"recipe": str(recipe_path), "target": target, "on_error": on_error, "build_in": spec.build_in,
                    "use_cache": use_cache, **worker_run(),
                    **({"pause_before": hands_on.pause_before, "pause_timeout": pause_timeout}
                       if hands_on.pause_before else {})},
    )
    return BuildPlan(
        build_id=build_id,
        recipe=recipe,
        target_name=target,
        git=git,
        recipe_version_id=version_id,
        cloud=cloud,
        on_error=on_error,
        use_cache=use_cache,
        pause_before=hands_on.pause_before,
        pause_timeout=pause_timeout,
    )


def _release_after_failure(flow, run, state) -> None:  # noqa: ANN001 - Prefect's hook signature
    plan = _ACTIVE.pop(str(run.id), None)
    if plan is not None:
        release_unless_kept(plan, cancelled=False)


def _release_after_cancellation(flow, run, state) -> None:  # noqa: ANN001 - Prefect's hook signature
    plan = _ACTIVE.pop(str(run.id), None)
    if plan is not None:
        release_unless_kept(plan, cancelled=True)


@flow(
    name="build-image",
    on_failure=[_release_after_failure],
    on_cancellation=[_release_after_cancellation],
    on_crashed=[_release_after_cancellation],
)
def build_image(
    recipe: str,
    target: str,
    on_error: OnError = "cleanup",
    trigger: str | None = None,
    require_clean: bool = False,
    use_cache: bool = True,
    pause_before: str | None = None,
    pause_timeout: float | None = None,
) -> dict:
    """One target's image: fetch base → launch → wait boot → customize → sanitize → snapshot → verify → register.
    `trigger` is for kiln's own callers (build-recipe, audit); None reads it from the run (flows/trigger.py)."""
    plan = prepare(recipe, target, trigger=trigger or trigger_of_this_run(), on_error=on_error,
                   require_clean=require_clean, use_cache=use_cache,
                   hands_on=HandsOn(pause_before, pause_timeout))
    _ACTIVE[str(flow_run.id)] = plan
    try:
        made = run_stages(plan)  # flows/stages.py: the order, the VM slot and the one failure policy
        store.finish_build(plan.build_id, "succeeded")
    finally:
        notify_finished_build(plan.build_id, list(plan.recipe.notify))
    _ACTIVE.pop(str(flow_run.id), None)
    assert made.registered is not None
    return asdict(TargetResult(target, plan.build_id, "succeeded", made.registered.image_id, "register"))


class BuildRequest(BaseModel):
    """What the Prefect UI asks for when a build is triggered by hand."""

    recipe: str = Field(description="Recipe file, relative to the worker's working directory (the kiln checkout)")
    targets: list[str] = Field(default_factory=list, description="Targets to build; empty builds every target")
    on_error: OnError = Field("cleanup", description="cleanup: release everything; abort: keep the failed guest; "
                              "ask: ask in the terminal (a run without one cleans up)")
    require_clean: bool = Field(False, description="Refuse recipes with uncommitted or untracked files")
    use_cache: bool = Field(
        True, description="Reuse the cached layers of earlier container builds' customize steps (off: every step runs)"
    )
    pause_before: str | None = Field(
        None, description="Pause before this stage (customize, sanitize, snapshot) for changes by hand: `kiln shell "
        "BUILD` gets in, `kiln resume BUILD` goes on; the build is then marked interactive")
    pause_timeout: float | None = Field(
        None, description="Seconds a pause waits before it gives up and cleans up (default KILN_PAUSE_TIMEOUT, 3600)")


def targets_of(request: BuildRequest) -> list[str]:
    """All requested targets, checked before any build starts."""
    targets = checked_request(request.recipe, request.targets)[1]
    if problem := pause_problem(request.pause_before, require_clean=request.require_clean):
        raise BadInput(problem)
    return targets


@flow(name="build-recipe")
def build_recipe(request: BuildRequest) -> list[dict]:
    """Every requested target concurrently; one failing target does not stop the others."""
    targets = targets_of(request)
    trigger = trigger_of_this_run()  # not a parameter: the run itself says how it was started
    pool = ThreadPoolExecutor(max_workers=len(targets), thread_name_prefix="kiln-target")
    # Each target's thread runs in a copy of this context: its build-image run is a subflow of this run, and it
    # sees the caller's Prefect settings.
    states = {
        target: pool.submit(
            contextvars.copy_context().run,
            build_image,
            request.recipe,
            target,
            request.on_error,
            trigger,
            request.require_clean,
            request.use_cache,
            request.pause_before,
            request.pause_timeout,
            return_state=True,
        )
        for target in targets
    }
    try:
        wait(states.values())
    except KeyboardInterrupt:
        cancel_active_builds()
        wait(states.values())
        raise
    finally:
        pool.shutdown(wait=False)
    results = [asdict(_result(target, future.result())) for target, future in states.items()]
    create_table_artifact(key=f"kiln-{artifact_key(request)}-summary", table=build_summary_rows(results),
                          description=f"kiln build of {request.recipe}: one row per target")  # fmt: skip
    return results


def artifact_key(request: BuildRequest) -> str:
    """The recipe's name as a Prefect artifact key (lowercase letters, digits and dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", load_recipe(request.recipe).name).strip("-") or "recipe"


def cancel_active_builds() -> None:
    """Ctrl-C reaches the main thread only: mark the builds cancelled and release what they hold, newest first.

    Their threads then fail at their next cloud or SSH call and record the cancellation themselves.
    """
    CANCELLED.set()
    for plan in list(_ACTIVE.values()):
        release_unless_kept(plan, cancelled=True)


def _result(target: str, state) -> TargetResult:  # noqa: ANN001 - a Prefect State
    if state.is_completed():
        return TargetResult(**state.result())
    build = lineage.build_for_flow_run(str(state.state_details.flow_run_id)) if state.state_details else None
    try:
        state.result()
        error = state.message
    except BaseException as exc:  # the failed run's exception, re-raised by Prefect
        error = describe(exc)
    return TargetResult(
        target,
        build.id if build else None,
        build.status if build else "failed",
        stage=build.stage if build else None,
        error=error,
    )


def cleanup_build(build_id: str) -> list[str]:
    """Release what a build still holds (a guest kept by --on-error abort, say); returns what could not be."""
    detail = lineage.get_build(build_id)
    if detail is None:
        raise BadInput(f"no build {build_id!r} in the provenance database")
    recorded = json.loads(detail.recipe.recipe_json).get("targets", {}).get(detail.build.target)
    cloud = registry.reopen(detail.build.cloud, target=recorded, target_name=detail.build.target,
                            region=detail.build.region or "")
    if cloud is None:
        raise BadInput(f"build {build_id}: its recipe records no {detail.build.cloud} target kiln can reach it through")
    plan = BuildPlan(build_id=detail.build.id, recipe=None, target_name=detail.build.target, git=None,
                     recipe_version_id=detail.recipe.id, cloud=cloud)
    errors = release_open(plan)
    shutil.rmtree(settings.data_dir() / "debug" / detail.build.id, ignore_errors=True)
    forget_shell_files(detail.build.id)
    return errors
