"""`kiln gc`: release what builds that are no longer running left behind, and print what was done."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from core.recipe import printable
from kiln.commands.output import fail, safe

STYLE = {"released": "green", "would release": "yellow", "closed (never created)": "green"}


def register(app: typer.Typer) -> None:
    @app.command()
    def gc(
        dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be released; release nothing"),
        older_than: str = typer.Option(None, "--older-than", help="Only what was created before this long ago: "
                                       "90s, 30m, 2h, 7d, 1w"),
        cloud: str = typer.Option(None, "--cloud", help="Only this cloud: local, ec2, openstack, or a clouds.yaml "
                                  "entry"),
    ) -> None:  # fmt: skip
        """Release every kiln resource whose build is no longer running: open ledger rows and kiln-tagged
        instances, images of failed builds, key pairs, security groups, floating IPs, local processes and
        files. Builds whose process died are marked interrupted first. Safe while other builds run."""
        from flows.reaper import collect_garbage
        from operations.gc import parse_duration

        try:
            age = parse_duration(older_than) if older_than else None
        except ValueError as exc:
            fail(str(exc), 2)
        report = collect_garbage(dry_run=dry_run, older_than=age, cloud=cloud)
        out = Console()
        print_report(report, out if out.is_terminal else Console(width=240), dry_run=dry_run)  # a log keeps ids whole
        raise typer.Exit(1 if report.failed else 0)


def print_report(report, console: Console, *, dry_run: bool) -> None:  # noqa: ANN001 - a operations.gc.GcReport
    for build_id in report.interrupted:
        done = "would be marked interrupted" if dry_run else "marked interrupted"
        console.print(f"build {safe(build_id)}: its process is gone; {done}")
    for problem in report.unreachable:
        console.print(Text(printable(f"could not list {problem}"), style="red"))
    if not report.leftovers:
        console.print("nothing to be done: no kiln resource is left by a build that is not running")
        return
    table = Table(title="kiln gc" + (" (dry run)" if dry_run else ""))
    for column in ("cloud", "region", "kind", "id", "build", "build status", "found in", "action"):
        table.add_column(column)
    for item in report.leftovers:
        style = STYLE.get(item.action, "red" if item.action.startswith("failed") else "dim")
        action = Text(printable(item.action), style=style)
        table.add_row(safe(item.cloud), safe(item.region), safe(item.kind), safe(item.resource_id or "-"),
                      safe(item.build_id[:8]), safe(item.build_status or "unknown"), safe(item.source), action)
    console.print(table)
