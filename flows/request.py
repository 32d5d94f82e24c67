"""What a build request must get right before anything starts, checked in one place whoever asks (kiln build
before Prefect starts; build-recipe and build-image when a deployment runs them): the recipe loads, the targets
exist, and the signing key and notification URLs kiln will use are usable."""

from __future__ import annotations

from pathlib import Path

from core.recipe import Recipe, load_recipe
from operations.notify import notify_settings_problem
from provenance import attest


class BadInput(ValueError):
    """The request is wrong before anything started (unknown target, dirty tree with --require-clean)."""


def checked_request(recipe_path: str | Path, targets: list[str]) -> tuple[Recipe, list[str]]:
    """The recipe and the targets to build (every target when none is asked for). A malformed recipe raises
    RecipeError (one line per problem); anything else wrong, BadInput naming the file and field or the setting."""
    recipe = load_recipe(recipe_path)
    unknown = [name for name in targets if name not in recipe.targets]
    if unknown:
        raise BadInput(f"{recipe_path}: targets.{unknown[0]}: no such target (have: {', '.join(recipe.targets)})")
    if problem := attest.signing_key_problem() or notify_settings_problem():
        raise BadInput(problem)  # a key register would sign with, a URL nobody could be told at: before launching
    return recipe, list(targets) or list(recipe.targets)
