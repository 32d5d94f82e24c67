"""Nightly rebuild: rebuild every recipe target whose fingerprint, base digest and kiln version have no good image."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.runtime import deployment, flow_run

from clouds import open_cloud
from core.recipe import BaseSpec, Recipe, RecipeError, Target, load_recipe
from core.settings import KILN_VERSION
from flows.build import build_image
from flows.status import builds_of_run
from operations.gc import parse_duration
from provenance import lineage, store


@dataclass
class NightlyDecision:
    recipe: str
    target: str
    action: str  # rebuild | skip | invalid
    reason: str
    build_id: str | None = None
    status: str | None = None
    flow_run_id: str | None = None  # the build-image deployment's run, when fanned out


DEFAULT_EXPIRY_MARGIN = "7d"  # rebuild an image this long before its validity ends


def decide(
    recipe: Recipe,
    target: str,
    base_digest: str,
    kiln_version: str = KILN_VERSION,
    *,
    margin: dt.timedelta = dt.timedelta(days=7),
    now: dt.datetime | None = None,
) -> NightlyDecision:
    """Skip when a succeeded build of the same recipe fingerprint, target, base digest and kiln version exists
    and its image stays valid beyond the margin; rebuild otherwise, saying why."""
    fingerprint = recipe.fingerprint()
    found = lineage.equivalent_build(
        fingerprint=fingerprint, target=target, base_digest=base_digest, kiln_version=kiln_version
    )
    now = now or dt.datetime.now(dt.UTC)
    if found is not None and found.valid_until is not None and found.valid_until <= now + margin:
        ends = "expired" if found.valid_until <= now else "expires"
        return NightlyDecision(
            str(recipe.path),
            target,
            "rebuild",
            f"image {found.image_id} (build {found.build_id[:8]}) {ends} {found.valid_until.isoformat()}, within "
            f"the {_days(margin)} margin: renewed by a new build",
        )
    if found is not None:
        return NightlyDecision(
            str(recipe.path),
            target,
            "skip",
            f"up to date: image {found.image_id} (build {found.build_id[:8]}) has this fingerprint, base and kiln",
        )
    return NightlyDecision(
        str(recipe.path),
        target,
        "rebuild",
        f"no good image for fingerprint {fingerprint[:12]}, base {base_digest[:19]}, kiln {kiln_version}",
    )


def base_spec(recipe: Recipe, target: Target) -> BaseSpec:
    """The target's base with a file path taken relative to the recipe, as fetch_base takes it."""
    spec = target.base
    if spec.file is not None:
        spec = spec.model_copy(update={"file": str(recipe.resolve(spec.file))})
    return spec


def recipe_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def _days(margin: dt.timedelta) -> str:
    return f"{margin.days}-day" if margin.days and not margin.seconds else str(margin)


def plan_night(
    directory: Path, only_targets: list[str], margin: dt.timedelta = dt.timedelta(days=7)
) -> list[NightlyDecision]:
    decisions = []
    for path in recipe_files(directory):
        try:
            recipe = load_recipe(path)
        except RecipeError as exc:
            decisions.append(NightlyDecision(str(path), "*", "invalid", str(exc)))
            continue
        if recipe.schedule is not None and not recipe.schedule.nightly:
            decisions.append(NightlyDecision(str(path), "*", "skip", "schedule.nightly is false"))
            continue
        for target, spec in recipe.targets.items():
            if only_targets and target not in only_targets:
                continue
            try:
                base = open_cloud(spec, recipe.timeouts, target_name=target).resolve_base(base_spec(recipe, spec),
                                                                                          spec.ssh_user)
            except Exception as exc:  # a cloud we cannot reach tonight is reported, not fatal to the others
                decisions.append(NightlyDecision(str(path), target, "skip", f"base not resolvable: {exc}"))
                continue
            decisions.append(decide(recipe, target, base.digest, margin=margin))
    return decisions


BUILD_DEPLOYMENT = "build-recipe/build-image"
POLL_SECONDS = 5.0


@flow(name="nightly-rebuild")
def nightly_rebuild(
    recipes_dir: str = "recipes",
    targets: list[str] | None = None,
    fan_out: bool | None = None,
    expiry_margin: str = DEFAULT_EXPIRY_MARGIN,
    use_cache: bool = False,
) -> list[dict]:
    """Rebuild what is stale under recipes_dir, or whose image expires within expiry_margin (e.g. 7d); report
    everything else as skipped, with the reason. Images past their validity are marked expired first.

    use_cache is off by default: a night's rebuild runs every customize step, so it gets today's packages.

    Under a deployment (or with fan_out=True) each stale recipe × target becomes its own run of the
    build-image deployment, so the builds spread over every worker of the pool; otherwise they run here.

    Args:
        recipes_dir: Directory of recipes (relative to the kiln checkout), every *.yaml in it.
        targets: Only these targets of each recipe; empty: all.
        fan_out: One build-image run per stale target (default under a deployment) or all builds in this run.
        expiry_margin: Rebuild an image this long before its validity ends (90m, 36h, 7d, 2w).
    """
    logger = get_run_logger()
    for expired in store.mark_expired_images():
        logger.info("image %s (%s) expired on %s", expired.image_id, expired.cloud, expired.valid_until.isoformat())
    decisions = plan_night(Path(recipes_dir), targets or [], parse_duration(expiry_margin, "expiry_margin"))
    stale = [d for d in decisions if d.action == "rebuild"]
    if stale:
        logger.info("layer cache %s for tonight's builds",
                    "on" if use_cache else "off (every step runs: fresh packages)")  # fmt: skip
    if fan_out if fan_out is not None else deployment.id is not None:
        submit_builds(stale, use_cache)
        wait_for_builds(stale)
    else:
        for decision in stale:
            state = build_image(decision.recipe, decision.target, use_cache=use_cache,
                                return_state=True)  # trigger: this run's
            build = lineage.build_for_flow_run(str(state.state_details.flow_run_id))
            decision.build_id = build.id if build else None
            decision.status = build.status if build else "failed"
    for decision in decisions:
        logger.info("%s %s: %s (%s)%s", decision.recipe, decision.target, decision.action, decision.reason,
                    f" → {decision.status}" if decision.status else "")
    report_night(decisions)
    return [asdict(d) for d in decisions]


def report_night(decisions: list[NightlyDecision]) -> None:
    """The night as a table on the run's page: what was rebuilt or skipped, and why (none outside a run)."""
    if flow_run.id is None:
        return
    create_table_artifact(
        key="kiln-nightly-rebuild",
        table=[{"recipe": d.recipe, "target": d.target, "action": d.action, "reason": d.reason,
                "status": d.status or "", "build": d.build_id or ""} for d in decisions]
        or [{"recipe": "", "target": "", "action": "", "reason": "no recipe found", "status": "", "build": ""}],
        description="kiln nightly-rebuild: one row per recipe and target",
    )


def submit_builds(stale: list[NightlyDecision], use_cache: bool = False) -> None:
    """One build-image run per stale recipe × target, created at once; workers pick them up as slots free."""
    for decision in stale:
        run = run_deployment(
            BUILD_DEPLOYMENT,
            parameters={"request": {"recipe": decision.recipe, "targets": [decision.target], "use_cache": use_cache}},
            flow_run_name=f"nightly {Path(decision.recipe).stem} {decision.target}",
            timeout=0,
        )
        decision.flow_run_id = str(run.id)


def wait_for_builds(stale: list[NightlyDecision], poll_seconds: float = POLL_SECONDS) -> None:
    """Wait for every submitted run; read each target's build from the provenance row that run recorded."""
    waiting = {d.flow_run_id: d for d in stale}
    with get_client(sync_client=True) as client:
        while waiting:
            for run_id, decision in list(waiting.items()):
                run = client.read_flow_run(run_id)
                if run.state is None or not run.state.is_final():
                    continue
                del waiting[run_id]
                builds = [summary.build for summary in builds_of_run(run_id, running_only=False)]
                decision.build_id = builds[0].id if builds else None
                reason = f"{run.state.name}: {run.state.message}" if run.state.message else run.state.name
                decision.status = builds[0].status if builds else f"no build recorded ({reason})"
            if waiting:
                time.sleep(poll_seconds)
