"""Hands on a paused build: `kiln shell BUILD` (a recorded root shell in its build machine) and `kiln resume BUILD`."""

from __future__ import annotations

import typer

from kiln.commands.output import fail, safe, stderr


def register(app: typer.Typer) -> None:
    app.command("shell")(shell)
    app.command("resume")(resume)


def shell(
    build_id: str = typer.Argument(..., help="A paused build's id (or a unique prefix)"),
    command: str | None = typer.Option(None, "--command", "-c", help="Run this command instead of a login shell"),
) -> None:
    """A root shell in a paused build's machine (in its container, or over SSH with the build key and the pinned
    host key). The session is recorded, redacted, in the build's step log, and the build is marked interactive:
    its image is not reproducible from its recipe alone. Exit: the shell's."""
    from flows.pause import BadInput, open_shell
    from provenance.lineage import AmbiguousBuildId

    if not build_id.strip():
        fail("give the id of a paused build (see `kiln builds --status running`)", 2)
    stderr().print(f"kiln shell: build {safe(build_id)} becomes interactive; this session is recorded in its log")
    try:
        found, status = open_shell(build_id, command)
    except (BadInput, AmbiguousBuildId) as exc:
        fail(str(exc), 2)
    stderr().print(f"kiln shell: session recorded in build {safe(found)} (kiln show {safe(found)})")
    raise typer.Exit(status)


def resume(build_id: str = typer.Argument(..., help="A paused build's id (or a unique prefix)")) -> None:
    """Tell a paused build to go on with its remaining stages."""
    from flows.pause import BadInput
    from flows.pause import resume as resume_build
    from provenance.lineage import AmbiguousBuildId

    if not build_id.strip():
        fail("give the id of a paused build (see `kiln builds --status running`)", 2)
    try:
        found = resume_build(build_id)
    except (BadInput, AmbiguousBuildId) as exc:
        fail(str(exc), 2)
    typer.echo(f"build {found}: resuming")
