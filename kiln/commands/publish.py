"""`kiln publish IMAGE_ID --to TARGET`: a locally built image uploaded to an OpenStack Glance or to EC2 as the same
bits (`--to ec2`, or a recipe's ec2 target: S3 upload, VM Import, register_image in the target's region)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

import typer

from kiln.commands.output import fail, safe, stderr
from spec.recipe import EC2Target, OpenStackTarget, RecipeError, load_recipe

if TYPE_CHECKING:  # boto3 and openstacksdk take seconds to import: only `kiln publish` pays for them
    from clouds.ec2 import EC2Cloud
    from clouds.openstack import OpenStackCloud
    from operations.publish import Publication


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
    import botocore.exceptions

    from clouds.base import CloudError
    from clouds.ec2 import EC2Cloud
    from clouds.openstack import OpenStackCloud
    from operations.publish import PublishRefused

    cloud = _cloud(to, recipe, share, region=region, endpoint_url=endpoint_url, profile=profile)
    if isinstance(cloud, EC2Cloud) and not bucket:
        _fail("--bucket is required to publish to ec2 (VM Import reads the disk from S3)", 2)
    say = (lambda _line: None) if as_json else (lambda line: stderr().print(safe(line)))
    try:
        publication = _publish(image_id, cloud, name, bucket, say)
    except PublishRefused as exc:
        _fail(str(exc), 2)
    except (CloudError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        _fail(str(exc), 1)
    finally:
        if isinstance(cloud, OpenStackCloud):
            cloud.close()
    if as_json:
        print(json.dumps(publication.to_dict(), indent=2))
    else:
        print(f"{publication.image_id} on {publication.region}: published from {image_id} "
              f"(sha256 {publication.sha256})")


def _publish(
    image_id: str, cloud: OpenStackCloud | EC2Cloud, name: str | None, bucket: str | None, say: Callable[[str], None]
) -> Publication:
    from clouds.ec2 import EC2Cloud
    from operations.publish import publish_image, publish_image_to_ec2

    if isinstance(cloud, EC2Cloud):
        return publish_image_to_ec2(image_id, cloud, bucket=str(bucket), name=name, progress=say)
    return publish_image(image_id, cloud, name=name, progress=say)


def _cloud(
    to: str, recipe_path: str | None, share: list[str], *, region: str | None, endpoint_url: str | None,
    profile: str | None,
) -> OpenStackCloud | EC2Cloud:  # fmt: skip
    from clouds.ec2 import EC2Cloud
    from clouds.openstack import OpenStackCloud

    if recipe_path is None:
        if to == "ec2":
            return EC2Cloud(_region(region, profile), profile=profile, endpoint_url=endpoint_url, share_with=share)
        return OpenStackCloud(to, share_with=share)
    try:
        recipe = load_recipe(recipe_path)
    except RecipeError as exc:
        for line in exc.lines():
            stderr().print(safe(line))
        raise typer.Exit(2) from None
    target = recipe.targets.get(to)
    if target is None:
        _fail(f"{recipe_path}: targets.{to}: no such target (have: {', '.join(recipe.targets)})", 2)
    if isinstance(target, EC2Target):
        cloud: OpenStackCloud | EC2Cloud = EC2Cloud.from_target(target, recipe.timeouts)
    elif isinstance(target, OpenStackTarget):
        cloud = OpenStackCloud.from_target(target, to)
    else:
        _fail(f"{recipe_path}: targets.{to}: publishing goes to an openstack or ec2 target, not {target.cloud}", 2)
    cloud.share_with = list(dict.fromkeys([*cloud.share_with, *share]))
    return cloud


def _region(region: str | None, profile: str | None) -> str:
    """The asked region, else boto3's (AWS_DEFAULT_REGION, the profile's); none at all is bad input."""
    import boto3

    found = region or boto3.session.Session(profile_name=profile).region_name
    if not found:
        _fail("--region is required to publish to ec2 (no default region in the environment or profile)", 2)
    return found


def _fail(message: str, code: int) -> NoReturn:
    fail(message, code)
