"""`kiln lineage IMAGE_ID` (where an image came from and what came of it) and `kiln revoke IMAGE_ID`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.tree import Tree

from core.recipe import printable
from kiln.commands.output import fail, safe, stdout
from kiln.commands.records import _commit, _status, _where

if TYPE_CHECKING:
    from provenance.lineage import Lineage, LineageNode

FORMATS = ("tree", "json", "dot")


def register(app: typer.Typer) -> None:
    app.command("lineage")(lineage)
    app.command("revoke")(revoke)


def lineage(
    image_id: str = typer.Argument(..., help="Any image id kiln knows: AMI, Glance uuid, local img-…, or file sha256."),
    up: bool = typer.Option(False, "--up", help="Its base, the base's base, … to the root."),
    down: bool = typer.Option(False, "--down", help="Every image built or copied from it, at any depth."),
    siblings: bool = typer.Option(False, "--siblings", help="Images of the same recipe version or the same bits."),
    output: str = typer.Option("tree", "--format", "-f", help="tree, json or dot (Graphviz)."),
) -> None:
    """Where an image came from (build, recipe version, commit, base chain) and what came of it.
    With none of --up/--down/--siblings, all three."""
    from provenance import lineage as graph

    if output not in FORMATS:
        _fail(f"--format {output!r} is not one of {', '.join(FORMATS)}")
    if not (up or down or siblings):
        up = down = siblings = True
    try:
        found = graph.lineage(image_id, up=up, down=down, siblings=siblings)
    except graph.UnknownImage as exc:
        _fail(str(exc))
    if output == "json":
        typer.echo(json.dumps(found.to_dict(), indent=2))
    elif output == "dot":
        typer.echo(to_dot(found))
    else:
        stdout().print(to_tree(found))


def revoke(
    image_id: str = typer.Argument(..., help="Any image id kiln knows (AMI, Glance uuid, local img-…, sha256)."),
    reason: str = typer.Option(..., "--reason", help="Why (a CVE, a leaked key…): kept with the image."),
    cascade: bool = typer.Option(False, "--cascade", help="Revoke its descendants too (else: parent-revoked)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Revoke an image: no build may start from it, its descendants become parent-revoked, and the cloud
    flags it where it can (EC2 deprecation, Glance deactivation, local catalog). Exit 1 if a cloud failed."""
    if not reason.strip():
        _fail("--reason must say why the image is revoked")
    from operations.revoke import revoke as revoke_image
    from provenance import lineage as graph

    try:
        result = revoke_image(image_id, reason, cascade=cascade)
    except graph.UnknownImage as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        console = stdout()
        for row in result.changed:
            where = _where(row.cloud, row.region)
            console.print(f"{_status(row.status)}  {safe(row.image_id)} ({where}, {safe(row.kind)})")
        for action in result.actions:
            colour = {"flagged": "green", "failed": "red"}.get(action.outcome, "dim")
            console.print(f"  {safe(action.cloud)} {safe(action.image_id)}: [{colour}]{safe(action.outcome)}[/]"
                          + (f" — {safe(action.detail)}" if action.detail else ""), highlight=False)
    if result.cloud_failures:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------- rendering


def label(node: LineageNode, *, markup: bool = True) -> str:
    """One line about an image: id, where, kind, status, recipe, commit, build."""
    image, recipe, build = node.image, node.recipe, node.build
    shown = safe if markup else printable
    parts = [f"[bold]{safe(image.image_id)}[/]" if markup else printable(image.image_id),
             _where(image.cloud, image.region) if markup else "/".join(filter(None, (image.cloud, image.region))),
             shown(image.kind), _status(image.status) if markup else image.status]
    if recipe is not None:
        parts.append(shown(f"{recipe.name}@{recipe.version}"))
        parts.append(f"commit {_commit(recipe.commit, recipe.dirty)}")
        parts.append(f"fingerprint {shown(recipe.fingerprint[:12])}")
    if build is not None:
        parts.append(shown(f"build {build.id[:8]} {build.target}"))
        if build.interactive:
            parts.append("interactive: not reproducible from its recipe alone")
    if image.sha256:
        parts.append(f"sha256 {shown(image.sha256[:12])}")
    if image.revoked_reason and image.status != "available":
        parts.append(f"({shown(image.revoked_reason)})")
    return "  ".join(parts)


def to_tree(found: Lineage) -> Tree:
    """The base chain from the root down to the image (marked ▶), its descendants below it, siblings apart."""
    chain = list(reversed(found.ancestors or [])) + [found.subject]
    root = Tree(label(chain[0]) if len(chain) > 1 else "▶ " + label(chain[0]), guide_style="dim")
    branch = root
    for node in chain[1:]:
        text = label(node)
        branch = branch.add("▶ " + text if node is found.subject else text)
    _add_children(branch, found.subject.image.id, found.descendants or [])
    if found.siblings:
        apart = root.add("[dim]siblings (same recipe version or same bits)[/]")
        for node in found.siblings:
            apart.add(label(node))
    elif found.siblings is not None:
        root.add("[dim]no siblings[/]")
    return root


def _add_children(branch: Tree, parent_row_id: int | None, descendants: list[LineageNode]) -> None:
    for node in descendants:
        if node.parent_row_id == parent_row_id:
            _add_children(branch.add(label(node)), node.image.id, descendants)


def to_dot(found: Lineage) -> str:
    """Graphviz: parent → child edges along the base chain and descendants, dashed edges to siblings."""
    nodes = [found.subject, *(found.ancestors or []), *(found.descendants or []), *(found.siblings or [])]
    known = {node.image.id for node in nodes}
    lines = ["digraph lineage {", "  rankdir=TB;", '  node [shape=box, fontname="monospace"];']
    seen: set[int | None] = set()
    for node in nodes:
        if node.image.id in seen:
            continue
        seen.add(node.image.id)
        style = ', style="bold"' if node is found.subject else ""
        colour = {"revoked": ', color="red"', "parent-revoked": ', color="orange"'}.get(node.image.status, "")
        text = label(node, markup=False).replace("  ", "\\n")
        lines.append(f'  "{node.image.id}" [label="{_dot_escape(text)}"{style}{colour}];')
    for node in [found.subject, *(found.ancestors or []), *(found.descendants or [])]:
        if node.parent_row_id in known:
            lines.append(f'  "{node.parent_row_id}" -> "{node.image.id}";')
    for node in found.siblings or []:
        lines.append(f'  "{found.subject.image.id}" -> "{node.image.id}" [style=dashed, dir=none, label="sibling"];')
    lines.append("}")
    return "\n".join(lines)


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\\\\n", "\\n")


def _fail(message: str) -> NoReturn:
    fail(message, 2)
