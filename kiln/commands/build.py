"""`kiln build`: run a recipe's build flows here, with a live table of stages per target, like a CI page."""

from __future__ import annotations

import json
import logging
import os
import select
import sys
import threading
import time
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live
from rich.prompt import Prompt
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
        self.display: Live | None = None  # the live table, stopped while a question is asked
        self.interactive = sys.stdin.isatty()  # a person can answer (--on-error ask) and press Enter (a pause)
        self.terminal = threading.Lock()  # one question or pause reads the terminal at a time

    def ask(self, plan, stage: str, question: str, choices: tuple[str, ...]) -> str | None:  # noqa: ANN001
        """--on-error ask: the person at this terminal chooses (None when nobody can)."""
        if not self.interactive:
            return None
        with self.terminal:
            if self.display is not None:
                self.display.stop()
            try:
                self.console.print(Text(f"[{plan.target_name}] {question}"), soft_wrap=True)
                self.console.print("  retry: run the stage again (fix the recipe's script first: it is read again)\n"
                                   "  abort: keep everything as it is and say how to reach it\n"
                                   "  cleanup: release everything", highlight=False)
                return Prompt.ask(Text(f"[{plan.target_name}] what now"), choices=list(choices), default="cleanup",
                                  console=self.console)
            except (EOFError, OSError):  # the terminal went away: nobody to ask
                return None
            finally:
                if self.display is not None:
                    self.display.start()

    def wait_enter(self, timeout: float) -> bool:
        """A pause: whether Enter was pressed in this terminal within `timeout` seconds."""
        if not self.interactive or not self.terminal.acquire(timeout=timeout):
            return False
        try:
            ready, _, _ = select.select([sys.stdin], [], [], timeout)
            return bool(ready) and sys.stdin.readline() != ""  # "": the terminal went away
        except (OSError, ValueError):
            self.interactive = False
            return False
        finally:
            self.terminal.release()

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


PAUSE_OPTION = "--pause-before"
DEFAULT_PAUSE_STAGE = "sanitize"  # flows.pause.DEFAULT_STAGE (the CLI parses arguments before importing flows)


def with_default_pause(args: list[str]) -> list[str]:
    """`kiln build RECIPE --pause-before` without a stage pauses before sanitize: a bare option (last, or followed by
    another option or by the recipe file) gets the default stage."""
    if not args or args[0] != "build" or PAUSE_OPTION not in args:
        return args
    at = args.index(PAUSE_OPTION)
    following = args[at + 1] if at + 1 < len(args) else None
    bare = following is None or following.startswith("-") or following.endswith((".yaml", ".yml")) or \
        Path(following).is_file()
    return [*args[: at + 1], DEFAULT_PAUSE_STAGE, *args[at + 1:]] if bare else args


def _checked_pause_timeout(text: str | None) -> float | None:
    from core.settings import SettingsError, parse_seconds

    try:
        return parse_seconds(text, "--pause-timeout") if text is not None else None
    except SettingsError as exc:
        fail(str(exc), 2)


def register(app: typer.Typer) -> None:
    register_cleanup(app)

    @app.command()
    def build(
        recipe: Path = typer.Argument(..., help="Recipe file (YAML)"),
        target: list[str] = typer.Option([], "--target", "-t", help="Target to build (repeat); default: all"),
        on_error: str = typer.Option(
            "cleanup", help="cleanup: release everything; abort: keep the failed guest; ask: ask in this terminal "
            "(retry the stage, abort or cleanup; without a terminal, cleanup)"),
        pause_before: str | None = typer.Option(
            None, PAUSE_OPTION, help="Pause before this stage (customize, sanitize, snapshot; alone: sanitize) for "
            "changes by hand: `kiln shell BUILD` gets in, Enter or `kiln resume BUILD` goes on"),
        pause_timeout: str | None = typer.Option(
            None, help="How long a pause waits before it gives up and cleans up (600, 30m, 2h; default "
            "KILN_PAUSE_TIMEOUT, else 1h)"),
        require_clean: bool = typer.Option(False, help="Refuse a recipe with uncommitted or untracked files"),
        no_cache: bool = typer.Option(False, "--no-cache", help="Run every customize step (reuse no cached layer)"),
        as_json: bool = typer.Option(False, "--json", help="Print the results as JSON (no live table)"),
    ) -> None:
        """Build a recipe's targets: fetch base → launch → wait boot → customize → sanitize → snapshot → verify →
        register. Exit 0 when every target succeeded, 1 when any failed, 2 on bad input (nothing launched)."""
        if on_error not in ("cleanup", "abort", "ask"):
            fail(f"--on-error: {on_error!r} is not one of cleanup, abort, ask", 2)
        timeout = _checked_pause_timeout(pause_timeout)
        targets = _checked_targets(recipe, target)
        _check_pause(pause_before, require_clean)
        if on_error == "ask" and not sys.stdin.isatty():
            stderr().print("--on-error ask: no terminal to ask in; a failed stage is cleaned up")
            on_error = "cleanup"
        quiet_prefect_console()
        from flows.build import BadInput, BuildRequest, build_recipe
        from flows.stages import STAGE_NAMES, watched_by

        quiet_prefect_runs()

        console = Console(stderr=as_json)
        live_table = console.is_terminal and not as_json
        listener = LiveStages(targets, STAGE_NAMES, console, live_table)
        request = BuildRequest(recipe=str(recipe), targets=targets, on_error=on_error, require_clean=require_clean,
                               use_cache=not no_cache, pause_before=pause_before, pause_timeout=timeout)  # fmt: skip
        try:
            with ExitStack() as stack:
                stack.enter_context(watched_by(listener))
                stack.enter_context(without_flow_heartbeats())
                if live_table:
                    listener.display = stack.enter_context(
                        Live(listener, console=console, refresh_per_second=4, transient=False))
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


def _check_pause(pause_before: str | None, require_clean: bool) -> None:
    from flows.pause import pause_problem

    if problem := pause_problem(pause_before, require_clean=require_clean):
        fail(problem, 2)


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
