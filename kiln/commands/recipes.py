"""`kiln validate` (check recipes before anything launches) and `kiln schema` (the recipe JSON Schema)."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.text import Text

from core.recipe import RecipeError, load_recipe, printable, recipe_json_schema

EXIT_BAD_INPUT = 2


def validate(
    recipes: list[str] = typer.Argument(..., metavar="RECIPE...", help="Recipe files (YAML) to check."),
) -> None:
    """Check recipes and the files they reference; exit 2 when any is invalid, naming file, line and field."""
    # Consoles are made here, not at import, so they write to whatever stdout/stderr are now (tests swap them).
    # soft_wrap and Text (not markup) keep each problem on one line, brackets like files[0] intact.
    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    invalid = 0
    for shown in recipes:
        try:
            recipe = load_recipe(shown)
            fingerprint = recipe.fingerprint()
        except RecipeError as error:
            invalid += 1
            for line in error.lines():
                err.print(Text(line, style="red"))
            continue
        out.print(Text.assemble(
            ("✓ ", "green"), (printable(shown), "bold"),
            f"  {recipe.name} {recipe.version}  fingerprint {fingerprint[:12]}",
        ))
    if invalid:
        raise typer.Exit(EXIT_BAD_INPUT)


def schema() -> None:
    """Print the JSON Schema (draft 2020-12) of recipe files."""
    typer.echo(json.dumps(recipe_json_schema(), indent=2))


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
    app.command("schema")(schema)
