"""`kiln publish IMAGE_ID --to TARGET`: a locally built image uploaded to an OpenStack Glance as the same bits."""

from __future__ import annotations

import json
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from clouds.base import CloudError
from clouds.openstack import OpenStackCloud
from kiln.recipe import OpenStackTarget, RecipeError, load_recipe
from tasks.publish import PublishRefused, publish_image

errors = Console(stderr=True)


def register(app: typer.Typer) -> None:
    app.command("publish")(publish)


def publish(
    image_id: str = typer.Argument(..., help="A local image kiln built (img-…, see `kiln images --cloud local`)."),
    to: str = typer.Option(..., "--to", help="A clouds.yaml entry, or with --recipe an openstack target of it."),
    recipe: str | None = typer.Option(None, "--recipe", help="Take os_cloud and share_with from this recipe's target."),
    name: str | None = typer.Option(None, "--name", help="Glance image name (default: the local image's name)."),
    share: list[str] = typer.Option([], "--share", help="Project id to share the image with (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the publication as JSON."),
) -> None:
    """Publish a local image to Glance: same bits, kiln properties, shared with the target's projects."""
    cloud = _cloud(to, recipe, share)
    say = (lambda _line: None) if as_json else (lambda line: errors.print(escape(line), highlight=False))
    try:
        publication = publish_image(image_id, cloud, name=name, progress=say)
    except PublishRefused as exc:
        _fail(str(exc), 2)
    except CloudError as exc:
        _fail(str(exc), 1)
    finally:
        cloud.close()
    if as_json:
        print(json.dumps(publication.to_dict(), indent=2))
    else:
        print(f"{publication.image_id} on {publication.region}: published from {image_id} "
              f"(sha256 {publication.sha256})")


def _cloud(to: str, recipe_path: str | None, share: list[str]) -> OpenStackCloud:
    if recipe_path is None:
        return OpenStackCloud(to, share_with=share)
    try:
        recipe = load_recipe(recipe_path)
    except RecipeError as exc:
        _fail(str(exc), 2)
    target = recipe.targets.get(to)
    if target is None:
        _fail(f"{recipe_path}: targets.{to}: no such target (have: {', '.join(recipe.targets)})", 2)
    if not isinstance(target, OpenStackTarget):
        _fail(f"{recipe_path}: targets.{to}: publishing goes to an openstack target, not {target.cloud}", 2)
    cloud = OpenStackCloud.from_target(target, to)
    cloud.share_with = list(dict.fromkeys([*cloud.share_with, *share]))
    return cloud


def _fail(message: str, code: int) -> NoReturn:
    errors.print(f"[red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)
