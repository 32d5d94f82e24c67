"""`kiln build`: run a recipe's build flows here, with a live table of stages per target, like a CI page."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from kiln.recipe import RecipeError, load_recipe

STAGES = ("fetch_base", "launch", "wait_boot", "customize", "sanitize", "snapshot", "verify", "register")
STYLE = {"waiting": "dim", "running": "bold yellow", "succeeded": "green", "failed": "bold red", "cancelled": "red"}
MARK = {"waiting": "·", "running": "▶", "succeeded": "✓", "failed": "✗", "cancelled": "⊘"}

err = Console(stderr=True)


def quiet_prefect_console() -> None:
    """Prefect's console handlers would repeat every line the live table already shows; the API still gets them."""
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL", "WARNING")
    # Without PREFECT_API_URL, Prefect starts a temporary server; on a small machine that takes 15-25 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def without_flow_heartbeats() -> AbstractContextManager:
    """A build run from the terminal sends Prefect no flow-run heartbeats: its terminal shows whether it is alive,
    and kiln's ledger and `kiln gc` deal with a build whose process died. Prefect's heartbeat thread sleeps in
    1 s steps and each flow run waits for it to notice the end (up to 1 s per run, two runs per build).
    Deployment runs, which a worker starts, keep them."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


class LiveStages:
    """A BuildListener that keeps each target's stage states and renders them as a table."""

    def __init__(self, targets: list[str], console: Console, live: bool) -> None:
        self.console, self.live = console, live
        self.state = {t: {s: ["waiting", None, None] for s in STAGES} for t in targets}  # status, start, end
        self.build_ids: dict[str, str] = {}
        self.lock = threading.Lock()

    def stage_changed(self, plan, stage: str, status: str) -> None:  # noqa: ANN001 - a tasks.common.BuildPlan
        with self.lock:
            self.build_ids[plan.target_name] = plan.build_id
            cell = self.state[plan.target_name][stage]
            now = time.monotonic()
            if status == "running":
                cell[:] = [status, now, None]
            else:
                cell[0], cell[2] = status, now
        if not self.live:
            self.console.print(Text(f"[{plan.target_name}] {stage}: {status}"), soft_wrap=True)

    def line(self, plan, stage: str, line: str) -> None:  # noqa: ANN001
        self.console.print(Text(f"[{plan.target_name}/{stage}] {line}"), highlight=False, soft_wrap=True)

    def __rich__(self) -> Table:
        table = Table(box=None, pad_edge=False)
        table.add_column("target")
        table.add_column("build")
        for stage in STAGES:
            table.add_column(stage)
        now = time.monotonic()
        with self.lock:
            for target, stages in self.state.items():
                cells = []
                for status, start, end in stages.values():
                    seconds = f" {((end or now) - start):.0f}s" if start else ""
                    cells.append(Text(MARK[status] + seconds, style=STYLE[status]))
                table.add_row(target, self.build_ids.get(target, "")[:8], *cells)
        return table


def register(app: typer.Typer) -> None:
    register_cleanup(app)

    @app.command()
    def build(
        recipe: Path = typer.Argument(..., help="Recipe file (YAML)"),
        target: list[str] = typer.Option([], "--target", "-t", help="Target to build (repeat); default: all"),
        on_error: str = typer.Option("cleanup", help="cleanup: release everything; abort: keep the failed guest"),
        require_clean: bool = typer.Option(False, help="Refuse a recipe with uncommitted or untracked files"),
        as_json: bool = typer.Option(False, "--json", help="Print the results as JSON (no live table)"),
    ) -> None:
        """Build a recipe's targets: fetch base → launch → wait boot → customize → sanitize → snapshot → verify →
        register. Exit 0 when every target succeeded, 1 when any failed, 2 on bad input (nothing launched)."""
        if on_error not in ("cleanup", "abort"):
            err.print(f"--on-error: {on_error!r} is not one of cleanup, abort")
            raise typer.Exit(2)
        targets = _checked_targets(recipe, target)
        quiet_prefect_console()
        from flows.build import BadInput, BuildRequest, build_recipe
        from tasks.common import LISTENERS

        console = Console(stderr=as_json)
        live_table = console.is_terminal and not as_json
        listener = LiveStages(targets, console, live_table)
        LISTENERS.append(listener)
        request = BuildRequest(recipe=str(recipe), targets=targets, on_error=on_error, require_clean=require_clean)
        try:
            with ExitStack() as stack:
                stack.enter_context(without_flow_heartbeats())
                if live_table:
                    stack.enter_context(Live(listener, console=console, refresh_per_second=4, transient=False))
                results = build_recipe(request)
        except BadInput as exc:
            err.print(str(exc))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted: every resource of the build was released; the build is recorded as cancelled")
            raise typer.Exit(130) from None
        finally:
            LISTENERS.remove(listener)
        _report(results, as_json, on_error)
        raise typer.Exit(0 if all(r["status"] == "succeeded" for r in results) else 1)


def register_cleanup(app: typer.Typer) -> None:
    @app.command()
    def cleanup(build_id: str = typer.Argument(..., help="Build ID (or a unique prefix)")) -> None:
        """Release everything a build still holds (e.g. a guest kept by --on-error abort), newest first."""
        from flows.build import BadInput, cleanup_build

        try:
            errors = cleanup_build(build_id)
        except BadInput as exc:
            err.print(str(exc))
            raise typer.Exit(2) from None
        for error in errors:
            err.print(f"could not release {error}")
        if errors:
            raise typer.Exit(1)
        Console().print(f"build {build_id}: nothing left")


def _checked_targets(recipe: Path, requested: list[str]) -> list[str]:
    """Bad input stops here, before Prefect starts or anything launches."""
    try:
        loaded = load_recipe(recipe)
    except RecipeError as exc:
        err.print(Text(str(exc)))
        raise typer.Exit(2) from None
    unknown = [t for t in requested if t not in loaded.targets]
    if unknown:
        err.print(f"{recipe}: targets.{unknown[0]}: no such target (have: {', '.join(loaded.targets)})")
        raise typer.Exit(2)
    _check_signing_key()
    return requested or list(loaded.targets)


def _check_signing_key() -> None:
    """The register stage signs with KILN_SIGNING_KEY when it is set: an unreadable key stops the build here."""
    from provenance import attest

    problem = attest.signing_key_problem()
    if problem:
        err.print(Text(problem))
        raise typer.Exit(2)


def _report(results: list[dict], as_json: bool, on_error: str) -> None:
    if as_json:
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    out = Console()
    for r in results:
        if r["status"] == "succeeded":
            out.print(f"[green]✓[/] {r['target']}: image [bold]{r['image_id']}[/] (build {r['build_id']})")
        else:
            out.print(f"[red]✗[/] {r['target']}: {r['status']} in {r['stage']}: {r['error']} (build {r['build_id']})")
            if on_error == "abort" and r.get("debug"):
                out.print(r["debug"])
    if any(r["build_id"] for r in results):
        out.print("details: kiln show BUILD_ID")
