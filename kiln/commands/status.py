"""`kiln status`: what is running where — worker, host, build and stage — from Prefect's API and provenance."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from kiln.commands.output import safe


def register(app: typer.Typer) -> None:
    @app.command()
    def status(as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON")) -> None:
        """Running kiln builds: the Prefect flow run and deployment, the worker and host running it, the build
        and the stage it is in (builds started by `kiln build` in a terminal show no worker)."""
        from flows.status import as_dicts, running

        rows = running()
        if as_json:
            json.dump(as_dicts(rows), sys.stdout, indent=2)
            sys.stdout.write("\n")
            return
        out = Console()
        if not rows:
            out.print("nothing running")
            return
        table = Table(box=None, pad_edge=False)
        for column in ("deployment", "worker", "host", "pid", "build", "recipe", "target", "cloud", "stage", "since"):
            table.add_column(column)
        for r in rows:
            cells = (r.deployment or "kiln build", r.worker or "-", r.host or "-", str(r.pid or "-"),
                     (r.build_id or "-")[:8], r.recipe or "-", r.target or "-", r.cloud or "-", r.stage or "-",
                     r.since or "-")  # fmt: skip
            table.add_row(*(safe(cell) for cell in cells))
        out.print(table)
