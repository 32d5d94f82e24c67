"""The provenance commands: `kiln builds`, `kiln show BUILD_ID`, `kiln images`, `kiln db upgrade`."""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from provenance import lineage, store
from provenance.models import BUILD_STATUSES

STATUS_CHOICES = ", ".join(BUILD_STATUSES)
errors = Console(stderr=True)


def _console() -> Console:
    """Rich output for a terminal; piped, tables keep their full width (no truncation) and no colour."""
    return Console() if sys.stdout.isatty() else Console(width=4096)


def register(app: typer.Typer) -> None:
    """Add the provenance commands to `app` and `upgrade` to its `db` group."""
    app.command("builds")(builds)
    app.command("show")(show)
    app.command("images")(images)
    db_group = next((g.typer_instance for g in app.registered_groups if g.name == "db"), None)
    if db_group is None:
        raise RuntimeError("kiln.cli must mount the `db` command group before registering records")
    db_group.command("upgrade")(db_upgrade)


def builds(
    recipe: str | None = typer.Option(None, "--recipe", help="Only builds of this recipe (by name)."),
    status: str | None = typer.Option(None, "--status", help=f"Only builds in this status: {STATUS_CHOICES}."),
    limit: int = typer.Option(50, "--limit", min=1, help="At most this many, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """List builds, newest first."""
    if status is not None and status not in BUILD_STATUSES:
        _fail(f"--status {status!r} is not one of {STATUS_CHOICES}")
    found = lineage.list_builds(recipe=recipe, status=status, limit=limit)
    if as_json:
        _print_json([summary.to_dict() for summary in found])
        return
    table = Table("build", "recipe", "target", "cloud", "status", "stage", "started", "took", "commit")
    for summary in found:
        b, r = summary.build, summary.recipe
        table.add_row(
            b.id[:12], escape(f"{r.name}@{r.version}"), escape(b.target), _where(b.cloud, b.region),
            _status(b.status), escape(b.stage or ""), _when(b.started), _took(b.started, b.finished),
            _commit(r.commit, r.dirty),
        )
    _console().print(table if found else "no builds recorded")


def show(
    build_id: str = typer.Argument(..., help="A build id, or a unique prefix of one."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts (step logs included)."),
    logs: bool = typer.Option(False, "--logs", help="Print each step's log."),
) -> None:
    """Everything recorded about one build: recipe version, stages, probes, images."""
    try:
        detail = lineage.get_build(build_id)
    except lineage.AmbiguousBuildId as exc:
        _fail(str(exc))
    if detail is None:
        _fail(f"no build {build_id!r} in the provenance database (see `kiln builds`)")
    if as_json:
        _print_json(detail.to_dict())
        return
    _print_build(detail, logs=logs)


def images(
    cloud: str | None = typer.Option(None, "--cloud", help="Only images on this cloud."),
    recipe: str | None = typer.Option(None, "--recipe", help="Only images built from this recipe (by name)."),
    expiring: str | None = typer.Option(
        None, "--expiring", help="Only images in use whose validity ends within this long (14d, 2w, 36h), or "
        "has ended; the soonest first."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """List images kiln knows: built ones, their bases and copies, newest first."""
    from tasks.gc import parse_duration

    try:
        horizon = None if expiring is None else dt.datetime.now(dt.UTC) + parse_duration(expiring, "--expiring")
    except ValueError as exc:
        _fail(str(exc))
    store.mark_expired_images()  # the status column says expired as soon as the validity has ended
    found = lineage.list_images(cloud=cloud, recipe=recipe, valid_until_before=horizon)
    if as_json:
        _print_json([summary.to_dict() for summary in found])
        return
    table = Table("image", "cloud", "recipe", "commit", "parent", "kind", "status", "size", "valid until", "build")
    for summary in found:
        image = summary.image
        table.add_row(
            escape(image.image_id), _where(image.cloud, image.region),
            escape(f"{summary.recipe_name}@{summary.recipe_version}") if summary.recipe_name else "",
            _commit(summary.commit, False), escape(summary.parent_image_id or ""), image.kind, _status(image.status),
            _size(image.size), _when(image.valid_until) if image.valid_until else "", (summary.build_id or "")[:12],
        )
    empty = f"no image in use expires within {expiring}" if expiring else "no images recorded"
    _console().print(table if found else empty)


def db_upgrade() -> None:
    """Bring the provenance database's schema to the newest revision (also done on first use)."""
    typer.echo(store.upgrade())


def _print_build(detail: lineage.BuildDetail, *, logs: bool) -> None:
    b, r = detail.build, detail.recipe
    console = _console()
    console.print(f"[bold]build {b.id}[/]  {_status(b.status)}" + (f" at stage {escape(b.stage)}" if b.stage else ""))
    console.print(f"  recipe   {escape(r.name)}@{escape(r.version)}  fingerprint {r.fingerprint[:16]}")
    console.print(f"  source   {escape(r.repo or '(not in git)')}  {escape(r.path)}"
                  f"  commit {_commit(r.commit, r.dirty)}" + (f" on {escape(r.branch)}" if r.branch else ""))
    build_in = json.loads(b.parameters_json or "{}").get("build_in", "vm")
    console.print(f"  target   {escape(b.target)} on {_where(b.cloud, b.region)}  build_in {escape(build_in)}"
                  f"  trigger {b.trigger}"
                  + (f"  flow run {escape(b.flow_run_id)}" if b.flow_run_id else ""))
    console.print(f"  ran      {_when(b.started)} for {_took(b.started, b.finished)} on {b.host} (pid {b.pid}),"
                  f" kiln {b.kiln_version}")
    if b.error:
        console.print(f"  [red]error[/]    {escape(b.error)}", highlight=False)
    steps = Table("stage", "attempt", "status", "started", "took", "error", title="stages")
    for step in detail.steps:
        steps.add_row(escape(step.stage), str(step.attempt), _status(step.status), _when(step.started),
                      _took(step.started, step.finished), escape(step.error or ""))
    console.print(steps)
    if detail.probes:
        probes = Table("probe", "kind", "result", "took", "detail", title="probes")
        for probe in detail.probes:
            probes.add_row(escape(probe.name), escape(probe.kind),
                           "[green]passed[/]" if probe.passed else "[red]failed[/]",
                           f"{probe.duration:.1f}s", escape(probe.detail))
        console.print(probes)
    if detail.images:
        table = Table("image", "cloud", "format", "size", "sha256", "parent", "status", title="images")
        for summary in detail.images:
            image = summary.image
            table.add_row(escape(image.image_id), _where(image.cloud, image.region), escape(image.format),
                          _size(image.size), image.sha256[:16], escape(summary.parent_image_id or ""),
                          _status(image.status))
        console.print(table)
    if logs:
        for step in detail.steps:
            console.print(f"── {escape(step.stage)} (attempt {step.attempt}) ──", style="bold", highlight=False)
            console.print(step.log, markup=False, highlight=False, end="")


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def _fail(message: str) -> NoReturn:
    errors.print(f"[red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def _status(status: str) -> str:
    colour = {"succeeded": "green", "available": "green", "running": "cyan", "failed": "red",
              "revoked": "red", "interrupted": "yellow", "parent-revoked": "yellow", "expired": "yellow"}.get(status)
    return f"[{colour}]{status}[/]" if colour else status


def _where(cloud: str, region: str) -> str:
    return escape(f"{cloud}/{region}" if region else cloud)


def _commit(commit: str | None, dirty: bool) -> str:
    if commit is None:
        return "-"
    return commit[:10] + ("+dirty" if dirty else "")


def _when(moment: dt.datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%SZ") if moment else ""


def _took(started: dt.datetime | None, finished: dt.datetime | None) -> str:
    if started is None or finished is None:
        return ""
    seconds = (finished - started).total_seconds()
    return f"{seconds:.1f}s" if seconds < 120 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _size(size: int | None) -> str:
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
