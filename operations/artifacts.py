"""What a Prefect UI user reads about kiln's images: markdown for an image's ancestry and lineage, and the
summary of a recipe's builds. One renderer names an image everywhere (image_name), so a better name for a base
(a stable id instead of a path on the build host) shows up in every artifact at once."""

from __future__ import annotations

from typing import Any

from provenance import lineage
from provenance.lineage import Lineage, LineageNode
from provenance.models import Image
from provenance.redact import redact


def flow_run_link(flow_run_id: str | None) -> str | None:
    """The Prefect UI page of a flow run, when the UI's address is known."""
    if not flow_run_id:
        return None
    from prefect.utilities.urls import url_for

    return url_for("flow-run", obj_id=flow_run_id)


def image_name(image: Image) -> str:
    """How an image is named to a reader: its cloud id; for a base known only by a file on the build host, the
    base's name and the digest of its bits (the path means nothing on another host)."""
    if image.kind == "base" and image.image_id.startswith("/"):
        digest = image.sha256.removeprefix("sha256:")
        return f"{image.name or image.image_id.rsplit('/', 1)[-1]} (sha256 {digest[:16]}…)"
    return image.image_id


def node_markdown(node: LineageNode) -> str:
    """One image as a markdown list item: name, cloud, kind, status, and the recipe and build that made it, the
    build linked to its flow run."""
    image, build, recipe = node.image, node.build, node.recipe
    where = "/".join(filter(None, (image.cloud, image.region)))
    parts = [f"`{image_name(image)}`", where, image.kind]
    if image.status != "available":
        parts.append(f"**{image.status}**" + (f" ({image.revoked_reason})" if image.revoked_reason else ""))
    if recipe is not None:
        commit = (recipe.commit or "no commit")[:12] + (" (dirty)" if recipe.dirty else "")
        parts.append(f"recipe {recipe.name} {recipe.version}, commit `{commit}`")  # name@version: a mailto link
    if build is not None:
        link = flow_run_link(build.flow_run_id)
        label = f"build {build.id[:8]}"
        parts.append(f"[{label}]({link})" if link else label)
    if image.valid_until is not None:
        parts.append(f"valid until {image.valid_until.date().isoformat()}")
    return "- " + " · ".join(parts)


def ancestry_markdown(image_row_id: int) -> str:
    """The chain from the root base down to the image's parent, oldest first, each build linked to its run."""
    chain = list(reversed(lineage.ancestors(image_row_id)))
    if not chain:
        return "## Ancestry\n\nNo parent recorded.\n"
    return "## Ancestry (from the base down)\n\n" + "\n".join(node_markdown(node) for node in chain) + "\n"


def lineage_markdown(found: Lineage) -> str:
    """What `kiln lineage` prints, as markdown: the image, its ancestors, children, descendants and siblings."""
    subject = found.subject
    lines = [f"# Lineage of `{image_name(subject.image)}`", "", node_markdown(subject), ""]
    sections: list[tuple[str, list[LineageNode] | None]] = [
        ("Ancestors (nearest first)", found.ancestors),
        ("Children", [n for n in found.descendants or [] if n.depth == 1] if found.descendants is not None else None),
        ("Further descendants", [n for n in found.descendants or [] if n.depth > 1]
         if found.descendants is not None else None),
        ("Siblings (same recipe version or same bits)", found.siblings),
    ]  # fmt: skip
    for title, nodes in sections:
        if nodes is None:
            continue
        lines += [f"## {title}", ""]
        lines += [node_markdown(node) for node in nodes] or ["None."]
        lines.append("")
    return "\n".join(lines)


def build_summary_rows(results: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per target of a build-recipe run: status, image, duration, the stage reached, the kiln show line."""
    builds = lineage.builds_by_id([r["build_id"] for r in results if r.get("build_id")])
    rows = []
    for result in results:
        summary = builds.get(result.get("build_id") or "")
        build = summary.build if summary else None
        took = (build.finished - build.started).total_seconds() if build and build.finished else None
        rows.append({
            "target": result["target"],
            "status": result["status"],
            "image": result.get("image_id") or "",
            "duration": f"{took:.0f} s" if took is not None else "",
            "stage": result.get("stage") or "",
            "details": f"kiln show {build.id}" if build else "",
            "error": redact(result.get("error") or "")[:300],
        })  # fmt: skip
    return rows
