"""`kiln publish IMAGE_ID --to TARGET`: a locally built image uploaded to an OpenStack Glance or to EC2 as the same
bits (`--to ec2`, or a recipe's ec2 target: S3 upload, VM Import, register_image in the target's region)."""

from __future__ import annotations

import json
from typing import NoReturn

import typer

from core.recipe import RecipeError
from kiln.commands.output import fail, safe, stderr


def register(app: typer.Typer) -> None:
    app.command("publish")(publish)


def publish(
    image_id: str = typer.Argument(..., help="A local image kiln built (img-…, see `kiln images --cloud local`)."),
    to: str = typer.Option(..., "--to", help="A clouds.yaml entry, `ec2`, or with --recipe a target of it."),
    recipe: str | None = typer.Option(None, "--recipe", help="Take the cloud settings from this recipe's target."),
    name: str | None = typer.Option(None, "--name", help="Image name (default: the local image's name)."),
    share: list[str] = typer.Option([], "--share", help="Project or AWS account id to share with (repeatable)."),
    bucket: str | None = typer.Option(None, "--bucket", help="EC2: the S3 bucket VM Import reads the disk from."),
    region: str | None = typer.Option(None, "--region", help="EC2 without --recipe: the region (default: boto3's)."),
    endpoint_url: str | None = typer.Option(None, "--endpoint-url", help="EC2 without --recipe: an EC2/S3 endpoint."),
    profile: str | None = typer.Option(None, "--profile", help="EC2 without --recipe: the AWS profile."),
    as_json: bool = typer.Option(False, "--json", help="Print the publication as JSON."),
) -> None:
    """Publish a local image to Glance or EC2: same bits, kiln tags, shared with the target's projects/accounts."""
    from operations.publish import PublishFailed, PublishRefused, destination, done_with, publish_image

    try:
        cloud = destination(to, recipe_path=recipe, share=share, region=region, endpoint_url=endpoint_url,
                            profile=profile)  # fmt: skip
    except RecipeError as exc:
        for line in exc.lines():
            stderr().print(safe(line))
        raise typer.Exit(2) from None
    except PublishRefused as exc:
        _fail(str(exc), 2)
    say = (lambda _line: None) if as_json else (lambda line: stderr().print(safe(line)))
    try:
        publication = publish_image(image_id, cloud, name=name, bucket=bucket, progress=say)
    except PublishRefused as exc:
        _fail(str(exc), 2)
    except PublishFailed as exc:
        _fail(str(exc), 1)
    finally:
        done_with(cloud)
    if as_json:
        print(json.dumps(publication.to_dict(), indent=2))
    else:
        print(f"{publication.image_id} on {publication.region}: published from {image_id} "
              f"(sha256 {publication.sha256})")


def _fail(message: str, code: int) -> NoReturn:
    fail(message, code)
