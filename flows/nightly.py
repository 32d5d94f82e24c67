"""Nightly rebuild: rebuild every recipe target whose fingerprint, base digest and kiln version have no good image."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import flow, get_run_logger

from clouds import open_cloud
from flows.build import build_image
from kiln.recipe import Recipe, RecipeError, load_recipe
from kiln.settings import KILN_VERSION
from provenance import lineage


@dataclass
class NightlyDecision:
    recipe: str
    target: str
    action: str  # rebuild | skip | invalid
    reason: str
    build_id: str | None = None
    status: str | None = None


def decide(recipe: Recipe, target: str, base_digest: str, kiln_version: str = KILN_VERSION) -> NightlyDecision:
    """Skip when a succeeded build of the same recipe fingerprint, target, base digest and kiln version exists."""
    fingerprint = recipe.fingerprint()
    found = lineage.equivalent_build(
        fingerprint=fingerprint, target=target, base_digest=base_digest, kiln_version=kiln_version
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


def recipe_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def plan_night(directory: Path, only_targets: list[str]) -> list[NightlyDecision]:
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
                base = open_cloud(spec, recipe.timeouts, target_name=target).resolve_base(spec.base, spec.ssh_user)
            except Exception as exc:  # a cloud we cannot reach tonight is reported, not fatal to the others
                decisions.append(NightlyDecision(str(path), target, "skip", f"base not resolvable: {exc}"))
                continue
            decisions.append(decide(recipe, target, base.digest))
    return decisions


@flow(name="nightly-rebuild")
def nightly_rebuild(recipes_dir: str = "recipes", targets: list[str] | None = None) -> list[dict]:
    """Rebuild what is stale under recipes_dir; report everything else as skipped, with the reason."""
    logger = get_run_logger()
    decisions = plan_night(Path(recipes_dir), targets or [])
    for decision in decisions:
        if decision.action == "rebuild":
            state = build_image(decision.recipe, decision.target, trigger="schedule", return_state=True)
            build = lineage.build_for_flow_run(str(state.state_details.flow_run_id))
            decision.build_id = build.id if build else None
            decision.status = build.status if build else "failed"
        logger.info("%s %s: %s (%s)", decision.recipe, decision.target, decision.action, decision.reason)
    return [asdict(d) for d in decisions]
