"""Stage 8: tag the cloud image, record it with its parent and packages, write the catalog entry and artifacts."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from clouds.base import TAG_ROLE, TAG_VALID_UNTIL, ExpiresImages, ImageRef, ReplicatesImages, SharesImages
from core import settings
from core.recipe import valid_until as end_of_validity
from operations.artifacts import ancestry_markdown
from provenance import attest, store
from provenance.redact import describe
from tasks.common import BuildPlan, StepLog, hand_over, ledgered, stage
from tasks.fetch_base import ResolvedBase
from tasks.verify import Verification


@dataclass(frozen=True)
class RegisteredImage:
    image_id: str
    row_id: int
    cloud: str
    region: str
    catalog_path: str


def record_image_rows(
    plan: BuildPlan, base: ResolvedBase, image: ImageRef, tags: dict[str, str], valid_until: dt.datetime | None = None
) -> int:
    """One row for the image (its primary file), one 'copy' row per other format of the same build."""
    primary = image.files[0] if image.files else None
    row_id = store.record_image(
        cloud=image.cloud,
        region=image.region,
        image_id=image.image_id,
        name=image.name,
        format=primary.format if primary else "",
        size=primary.size if primary else None,
        sha256=primary.sha256 if primary else "",
        path=primary.path if primary else "",
        build_id=plan.build_id,
        parent_id=base.row_id,
        kind="built",
        tags=tags,
        valid_until=valid_until,
    )
    for extra in image.files[1:]:
        store.record_image(
            cloud=image.cloud,
            region=image.region,
            image_id=f"{image.image_id}.{extra.format}",
            name=image.name,
            format=extra.format,
            size=extra.size,
            sha256=extra.sha256,
            path=extra.path,
            build_id=plan.build_id,
            parent_id=base.row_id,
            kind="copy",
            tags=tags,
            valid_until=valid_until,
        )
    return row_id


def catalog_entry(
    plan: BuildPlan, base: ResolvedBase, image: ImageRef, verification: Verification, valid_until: dt.datetime
) -> dict:
    recipe, now = plan.recipe, dt.datetime.now(dt.UTC)
    return {
        "identifier": image.image_id,
        "name": recipe.name,
        "version": recipe.version,
        "description": recipe.description,
        "author": recipe.author.model_dump() if recipe.author else None,
        "cloud": image.cloud,
        "region": image.region,
        "os": verification.os,
        "files": [{"format": f.format, "path": f.path, "size": f.size, "sha256": f.sha256} for f in image.files],
        "parent": {"image_id": base.image_id, "digest": base.image.digest},
        "build_id": plan.build_id,
        "recipe_fingerprint": recipe.fingerprint(),
        "commit": plan.git.commit,
        "dirty": plan.git.dirty,
        "probes": [{"name": o.name, "passed": o.passed} for o in verification.outcomes],
        "created": now.isoformat(),
        "valid_for": recipe.validity(),
        "valid_until": valid_until.isoformat(),
    }


def write_catalog(entry: dict) -> Path:
    path = settings.data_dir() / "catalog" / f"{entry['identifier']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entry, indent=2) + "\n")
    return path


def publish_artifacts(plan: BuildPlan, entry: dict, row_id: int) -> None:
    key = f"kiln-{plan.recipe.name}-{plan.target_name}".lower().replace(".", "-").replace("_", "-")
    probes = "\n".join(f"| {p['name']} | {'passed' if p['passed'] else 'FAILED'} |" for p in entry["probes"])
    create_markdown_artifact(
        key=key,
        description=f"kiln build {plan.build_id}",
        markdown=(
            f"# {plan.recipe.name} {plan.recipe.version} → `{entry['identifier']}`\n\n"
            f"- target: **{plan.target_name}** ({' '.join(filter(None, (entry['cloud'], entry['region'])))})\n"
            f"- build: `{plan.build_id}` (`kiln show {plan.build_id}`)\n"
            f"- commit: `{entry['commit']}`{' (dirty)' if entry['dirty'] else ''}\n"
            f"- recipe fingerprint: `{entry['recipe_fingerprint']}`\n- os: {entry['os']}\n"
            f"- valid for {entry['valid_for']}, until {entry['valid_until']}\n\n"
            f"{ancestry_markdown(row_id)}\n"
            f"| probe | result |\n|---|---|\n{probes}\n"
        ),
    )
    create_table_artifact(
        key=f"{key}-images",
        table=[{"image": entry["identifier"], **f} for f in entry["files"]] or [{"image": entry["identifier"]}],
        description=f"images of kiln build {plan.build_id}",
    )


def replicate(plan: BuildPlan, image: ImageRef, tags: dict[str, str], step_log: StepLog) -> list[ImageRef]:
    """Copies in the cloud's other regions (each ledgered first), and every image shared with its share_with."""
    cloud, copies = plan.cloud, []
    if isinstance(cloud, ReplicatesImages):
        for region in cloud.regions:
            if region == image.region:
                continue
            with ledgered(plan, kind="image", name=image.name, role="image", region=region) as created:
                copy = cloud.copy_image(image, region, tags)
                created(copy.image_id)
            step_log(f"copied {image.image_id} to {region} as {copy.image_id}")
            copies.append(copy)
    if isinstance(cloud, SharesImages) and cloud.share_with:
        for each in (image, *copies):
            cloud.share_image(each, cloud.share_with)
        step_log(f"launch permission for {', '.join(cloud.share_with)} on {len(copies) + 1} image(s)")
    return copies


def set_expiry(plan: BuildPlan, images: list[ImageRef], valid_until: dt.datetime, step_log: StepLog) -> None:
    """Where the cloud has an expiry of its own (EC2's DeprecationTime), set it at the end of the validity. The
    date is already in provenance, the catalog entry and the image's tags: a cloud refusing it is a warning."""
    if not isinstance(plan.cloud, ExpiresImages):
        return
    for image in images:
        try:
            at = plan.cloud.set_expiry(image, valid_until)
        except Exception as exc:
            step_log(f"warning: {image.image_id}: the cloud's expiry was not set ({describe(exc)}); "
                     f"valid until {valid_until.isoformat()} in its tags, the catalog and provenance")
            continue
        step_log(f"{image.image_id}: deprecated by the cloud from {at.isoformat()}")


def statement_path(image: ImageRef) -> Path:
    """Where the image's signed statement goes: next to its disk file, else beside its catalog entry."""
    name = attest.statement_file_name(image.image_id)
    if image.files:
        return Path(image.files[0].path).parent / name
    return settings.data_dir() / "catalog" / name


def attest_image(image: ImageRef, step_log: StepLog) -> Path | None:
    """With KILN_SIGNING_KEY set, sign the image's provenance statement (as `kiln attest` does) and write it
    next to the image; None when no key is configured. An unreadable key fails the stage."""
    key_path = attest.configured_key()
    if key_path is None:
        return None
    key = attest.load_private_key(key_path)
    out = statement_path(image)
    envelope = attest.write_statement(image.image_id, key, out)
    step_log(f"provenance statement {out} signed by key {envelope['signatures'][0]['keyid'][:16]} ({attest.KEY_ENV})")
    return out


@stage("register")
def register(
    plan: BuildPlan, base: ResolvedBase, image: ImageRef, verification: Verification, *, step_log: StepLog
) -> RegisteredImage:
    valid_until = end_of_validity(dt.datetime.now(dt.UTC).replace(microsecond=0), plan.recipe.validity())
    tags = {**plan.tags, TAG_ROLE: "image", TAG_VALID_UNTIL: valid_until.isoformat(timespec="seconds")}
    plan.cloud.tag_image(image, tags)
    copies = replicate(plan, image, tags, step_log)
    set_expiry(plan, [image, *copies], valid_until, step_log)
    row_id = record_image_rows(plan, base, image, tags, valid_until)
    for copy in copies:
        store.record_image(cloud=copy.cloud, region=copy.region, image_id=copy.image_id, name=copy.name,
                           build_id=plan.build_id, parent_id=base.row_id, kind="copy", tags=tags,
                           valid_until=valid_until)  # fmt: skip
    store.record_packages(row_id, verification.packages)
    entry = catalog_entry(plan, base, image, verification, valid_until)
    statement = attest_image(image, step_log)
    if statement is not None:
        entry["attestation"] = str(statement)
    catalog = write_catalog(entry)
    publish_artifacts(plan, entry, row_id)
    for each in (image, *copies):
        hand_over(plan, each.image_id)
    step_log(f"registered {image.image_id} (parent {base.image_id}); catalog entry {catalog}")
    return RegisteredImage(image.image_id, row_id, image.cloud, image.region, str(catalog))
