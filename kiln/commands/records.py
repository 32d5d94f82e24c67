"""The provenance commands: `kiln builds`, `kiln show BUILD_ID`, `kiln images`, `kiln db upgrade`."""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.table import Table

from kiln.commands.output import fail, plain_lines, safe, stdout

if TYPE_CHECKING:  # provenance pulls in SQLAlchemy and GitPython: imported when a command runs, not for `validate`
    from provenance import lineage

# provenance.models.BUILD_STATUSES, spelled out so that importing the CLI does not import SQLModel (a test keeps
# them equal).
BUILD_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled", "interrupted")
STATUS_CHOICES = ", ".join(BUILD_STATUSES)


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
    from provenance import lineage

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
            b.id[:12], safe(f"{r.name}@{r.version}"), safe(b.target), _where(b.cloud, b.region),
            _status(b.status), safe(b.stage or ""), _when(b.started), _took(b.started, b.finished),
            _commit(r.commit, r.dirty),
        )
    stdout().print(table if found else "no builds recorded")


def show(
    build_id: str = typer.Argument(..., help="A build id, or a unique prefix of one."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts (step logs included)."),
    logs: bool = typer.Option(False, "--logs", help="Print each step's log."),
) -> None:
    """Everything recorded about one build: recipe version, stages, probes, images."""
    from provenance import lineage

    if not build_id.strip():
        _fail("give a build id (see `kiln builds`)")
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
    from operations.gc import parse_duration
    from provenance import lineage, store

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
            safe(image.image_id), _where(image.cloud, image.region),
            safe(f"{summary.recipe_name}@{summary.recipe_version}") if summary.recipe_name else "",
            _commit(summary.commit, False), safe(summary.parent_image_id or ""), safe(image.kind),
            _status(image.status), _size(image.size), _when(image.valid_until) if image.valid_until else "",
            (summary.build_id or "")[:12],
        )
    empty = f"no image in use expires within {safe(expiring)}" if expiring else "no images recorded"
    stdout().print(table if found else empty)


def db_upgrade() -> None:
    """Bring the provenance database's schema to the newest revision (also done on first use)."""
    from provenance import store

    typer.echo(store.upgrade())


def _print_build(detail: lineage.BuildDetail, *, logs: bool) -> None:
    b, r = detail.build, detail.recipe
    console = stdout()
    stage = f" at stage {safe(b.stage)}" if b.stage else ""
    console.print(f"[bold]build {safe(b.id)}[/]  {_status(b.status)}{stage}")
    console.print(f"  recipe   {safe(r.name)}@{safe(r.version)}  fingerprint {safe(r.fingerprint[:16])}")
    console.print(f"  source   {safe(r.repo or '(not in git)')}  {safe(r.path)}"
                  f"  commit {_commit(r.commit, r.dirty)}" + (f" on {safe(r.branch)}" if r.branch else ""))
    build_in = json.loads(b.parameters_json or "{}").get("build_in", "vm")
    console.print(f"  target   {safe(b.target)} on {_where(b.cloud, b.region)}  build_in {safe(build_in)}"
                  f"  trigger {safe(b.trigger)}" + (f"  flow run {safe(b.flow_run_id)}" if b.flow_run_id else ""))
    console.print(f"  ran      {_when(b.started)} for {_took(b.started, b.finished)} on {safe(b.host)} "
                  f"(pid {b.pid}), kiln {safe(b.kiln_version)}")
    if layers := json.loads(b.layers_json or "[]"):
        reused = [layer for layer in layers if layer.get("reused_from")]
        console.print(f"  layers   {len(reused)} of {len(layers)} customize steps reused from earlier builds")
        for layer in layers:
            origin = f"reused from build {safe(layer['reused_from'][:12])}" if layer.get("reused_from") else "made here"
            console.print(f"           {safe(layer['step'])}: {safe(layer['key'][:12])} {origin}", highlight=False)
    _print_hands_on(detail, console)
    if b.error:
        console.print(f"  [red]error[/]    {safe(b.error)}", highlight=False)
    steps = Table("stage", "attempt", "status", "started", "took", "error", title="stages")
    for step in detail.steps:
        steps.add_row(safe(step.stage), str(step.attempt), _status(step.status), _when(step.started),
                      _took(step.started, step.finished), safe(step.error or ""))
    console.print(steps)
    if detail.probes:
        probes = Table("probe", "kind", "result", "took", "detail", title="probes")
        for probe in detail.probes:
            probes.add_row(safe(probe.name), safe(probe.kind),
                           "[green]passed[/]" if probe.passed else "[red]failed[/]",
                           f"{probe.duration:.1f}s", safe(probe.detail))
        console.print(probes)
    if detail.images:
        table = Table("image", "cloud", "format", "size", "sha256", "parent", "status", title="images")
        for summary in detail.images:
            image = summary.image
            table.add_row(safe(image.image_id), _where(image.cloud, image.region), safe(image.format),
                          _size(image.size), safe(image.sha256[:16]), safe(summary.parent_image_id or ""),
                          _status(image.status))
        console.print(table)
    if logs:
        for step in detail.steps:
            if step.stage == "shell":
                continue  # printed above, with the other shell sessions
            console.print(f"── {safe(step.stage)} (attempt {step.attempt}) ──", style="bold", highlight=False)
            console.print(plain_lines(step.log), markup=False, highlight=False, end="")


def _print_hands_on(detail: lineage.BuildDetail, console: Any) -> None:
    """A paused build: how to get in and go on. An interactive one: that its image is not reproducible from its
    recipe alone, and the transcript of every `kiln shell` session in it."""
    from provenance.lineage import NOT_REPRODUCIBLE

    b = detail.build
    if b.paused_before and b.status == "running":
        console.print(f"  [yellow]paused[/]   before {safe(b.paused_before)} until {_when(b.pause_deadline)}: "
                      f"kiln shell {safe(b.id)}; kiln resume {safe(b.id)}")
    if not b.interactive:
        return
    console.print(f"  [yellow]{safe(NOT_REPRODUCIBLE)}[/]")
    for step in detail.steps:
        if step.stage == "shell":
            console.print(f"── shell session {step.attempt} ({_when(step.started)}, transcript, redacted) ──",
                          style="bold", highlight=False)
            console.print(plain_lines(step.log), markup=False, highlight=False, end="" if step.log.endswith("\n")
                          else "\n")


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def _fail(message: str) -> NoReturn:
    fail(message, 2)


def _status(status: str) -> str:
    colour = {"succeeded": "green", "available": "green", "running": "cyan", "failed": "red",
              "revoked": "red", "interrupted": "yellow", "parent-revoked": "yellow", "expired": "yellow"}.get(status)
    return f"[{colour}]{safe(status)}[/]" if colour else safe(status)


def _where(cloud: str, region: str) -> str:
    return safe(f"{cloud}/{region}" if region else cloud)


def _commit(commit: str | None, dirty: bool) -> str:
    if commit is None:
        return "-"
    return safe(commit[:10]) + ("+dirty" if dirty else "")


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
