"""`kiln build`: run a recipe's build flows here, with a live table of stages per target, like a CI page."""

from __future__ import annotations

import json
import logging
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

from core.recipe import Recipe, RecipeError, printable
from kiln.commands.output import fail, safe, stderr

STYLE = {"waiting": "dim", "running": "bold yellow", "succeeded": "green", "failed": "bold red", "cancelled": "red"}
MARK = {"waiting": "·", "running": "▶", "succeeded": "✓", "failed": "✗", "cancelled": "⊘"}


def quiet_prefect_console() -> None:
    """Prefect's console handlers would repeat every line the live table already shows; the API still gets them."""
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL", "WARNING")
    # Without PREFECT_API_URL, Prefect starts a temporary server; on a small machine that takes 15-25 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


class _RunLogsGoToPrefectOnly(logging.Filter):
    """Flow and task run records reach Prefect's API but not the terminal: the live table and the summary already
    say what they say, and Prefect would add its traceback to every failed stage (the step log has the details)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(("prefect.flow_runs", "prefect.task_runs"))


def quiet_prefect_runs() -> None:
    """After Prefect is imported (its logging set up): the terminal shows kiln's lines, not Prefect's run logs."""
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler" and not any(
            isinstance(existing, _RunLogsGoToPrefectOnly) for existing in handler.filters
        ):
            handler.addFilter(_RunLogsGoToPrefectOnly())


def without_flow_heartbeats() -> AbstractContextManager:
    """A build run from the terminal sends Prefect no flow-run heartbeats: its terminal shows whether it is alive,
    and kiln's ledger and `kiln gc` deal with a build whose process died. Prefect's heartbeat thread sleeps in
    1 s steps and each flow run waits for it to notice the end (up to 1 s per run, two runs per build).
    Deployment runs, which a worker starts, keep them."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


class LiveStages:
    """A BuildListener that keeps each target's stage states and renders them as a table, one column a stage."""

    def __init__(self, targets: list[str], stages: tuple[str, ...], console: Console, live: bool) -> None:
        self.console, self.live, self.stages = console, live, stages
        self.state = {t: {s: ["waiting", None, None] for s in stages} for t in targets}  # status, start, end
        self.build_ids: dict[str, str] = {}
        self.notes: dict[tuple[str, str], str] = {}
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

    def note(self, plan, stage: str, text: str) -> None:  # noqa: ANN001
        with self.lock:
            self.notes[(plan.target_name, stage)] = text
        if not self.live:
            self.console.print(Text(f"[{plan.target_name}] {stage}: {text}"), soft_wrap=True)

    def line(self, plan, stage: str, line: str) -> None:  # noqa: ANN001
        self.console.print(Text(f"[{plan.target_name}/{stage}] {line}"), highlight=False, soft_wrap=True)

    def __rich__(self) -> Table:
        table = Table(box=None, pad_edge=False)
        table.add_column("target")
        table.add_column("build")
        for stage in self.stages:
            table.add_column(stage)
        now = time.monotonic()
        with self.lock:
            for target, stages in self.state.items():
                cells = []
                for stage, (status, start, end) in stages.items():
                    seconds = f" {((end or now) - start):.0f}s" if start else ""
                    note = f" {self.notes[(target, stage)]}" if (target, stage) in self.notes else ""
                    cells.append(Text(MARK[status] + seconds + note, style=STYLE[status]))
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
        no_cache: bool = typer.Option(False, "--no-cache", help="Run every customize step (reuse no cached layer)"),
        as_json: bool = typer.Option(False, "--json", help="Print the results as JSON (no live table)"),
    ) -> None:
        """Build a recipe's targets: fetch base → launch → wait boot → customize → sanitize → snapshot → verify →
        register. Exit 0 when every target succeeded, 1 when any failed, 2 on bad input (nothing launched)."""
        if on_error not in ("cleanup", "abort"):
            fail(f"--on-error: {on_error!r} is not one of cleanup, abort", 2)
        targets = _checked_targets(recipe, target)
        quiet_prefect_console()
        from flows.build import BadInput, BuildRequest, build_recipe
        from flows.stages import STAGE_NAMES, watched_by

        quiet_prefect_runs()

        console = Console(stderr=as_json)
        live_table = console.is_terminal and not as_json
        listener = LiveStages(targets, STAGE_NAMES, console, live_table)
        request = BuildRequest(recipe=str(recipe), targets=targets, on_error=on_error, require_clean=require_clean,
                               use_cache=not no_cache)  # fmt: skip
        try:
            with ExitStack() as stack:
                stack.enter_context(watched_by(listener))
                stack.enter_context(without_flow_heartbeats())
                if live_table:
                    stack.enter_context(Live(listener, console=console, refresh_per_second=4, transient=False))
                results = build_recipe(request)
        except BadInput as exc:
            stderr().print(Text(printable(str(exc))))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            stderr().print("interrupted: every resource of the build was released; the build is recorded as cancelled")
            raise typer.Exit(130) from None
        _report(results, as_json, on_error)
        raise typer.Exit(0 if all(r["status"] == "succeeded" for r in results) else 1)


def register_cleanup(app: typer.Typer) -> None:
    @app.command()
    def cleanup(build_id: str = typer.Argument(..., help="Build ID (or a unique prefix)")) -> None:
        """Release everything a build still holds (e.g. a guest kept by --on-error abort), newest first."""
        if not build_id.strip():
            fail("give the id of the build to clean up (see `kiln builds`)", 2)
        from flows.build import BadInput, cleanup_build
        from provenance.lineage import AmbiguousBuildId

        try:
            errors = cleanup_build(build_id)
        except (BadInput, AmbiguousBuildId) as exc:
            fail(str(exc), 2)
        for error in errors:
            stderr().print(f"could not release {safe(error)}")
        if errors:
            raise typer.Exit(1)
        Console().print(f"build {safe(build_id)}: nothing left")


def _checked_targets(recipe: Path, requested: list[str]) -> list[str]:
    """Bad input stops here, before Prefect starts or anything launches."""
    from flows.request import BadInput, checked_request

    try:
        loaded, targets = checked_request(recipe, requested)
    except RecipeError as exc:
        for line in exc.lines():
            stderr().print(Text(line))
        raise typer.Exit(2) from None
    except BadInput as exc:
        stderr().print(Text(printable(str(exc))))
        raise typer.Exit(2) from None
    _check_settings(loaded, targets)
    return targets


def _check_settings(recipe: Recipe, targets: list[str]) -> None:
    """The settings the build will use, before Prefect starts: a SettingsError is one line naming the setting,
    exit 2 (kiln.cli), and nothing is launched."""
    from provenance import store

    for name in targets:
        recipe.targets[name].check_settings()
    store.engine()  # created and migrated: a database kiln cannot use stops here


def _report(results: list[dict], as_json: bool, on_error: str) -> None:
    if as_json:
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    out = Console(soft_wrap=True, highlight=False)
    for r in results:
        if r["status"] == "succeeded":
            out.print(f"[green]✓[/] {safe(r['target'])}: image [bold]{safe(r['image_id'])}[/] "
                      f"(build {safe(r['build_id'])})")
            continue
        reason = (r["error"] or "").strip().splitlines()[:1] or ["no reason recorded"]
        out.print(f"[red]✗[/] {safe(r['target'])}: {safe(r['status'])} in {safe(r['stage'])}: {safe(reason[0])}")
        if on_error == "abort" and r.get("debug"):
            out.print(safe(r["debug"]))
        if r["build_id"]:
            out.print(f"  details: kiln show {safe(r['build_id'])} --logs")
