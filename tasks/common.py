"""What every stage shares: the typed build plan, the stage wrapper that writes StepRuns, and the ledger."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.runtime import task_run

from clouds.base import (
    TAG_BUILD,
    TAG_COMMIT,
    TAG_RECIPE,
    TAG_RECIPE_VERSION,
    TAG_ROLE,
    Cloud,
    KeyPair,
    Resource,
)
from core.recipe import CloudTarget, Recipe
from provenance import store
from provenance.gitinfo import GitInfo
from provenance.redact import LineRedactor, describe, redact, redact_logs

T = TypeVar("T")
log = logging.getLogger("kiln.build")
# The second net: whatever Prefect's or kiln's loggers write (to the terminal or the Prefect API) is redacted.
redact_logs("prefect", "kiln", "clouds", "tasks", "flows", "provenance")


class StageError(RuntimeError):
    """A stage's failure whose text held a secret: the same text, redacted. The original exception is not kept,
    not even as the cause, since Prefect would log it and store it with the run."""


@dataclass
class BuildPlan:
    """Everything one target's build knows, passed typed from stage to stage (never persisted as a whole)."""

    build_id: str
    recipe: Recipe
    target_name: str
    git: GitInfo
    recipe_version_id: int | str
    cloud: Cloud = field(repr=False)
    on_error: str = "cleanup"
    build_key: KeyPair | None = field(default=None, repr=False)
    guests: list[Any] = field(default_factory=list, repr=False)  # tasks.launch.Guest, newest last
    base_digest: str = ""  # set by fetch_base: the root of the customize steps' layer keys
    use_cache: bool = True  # customize may reuse layers of earlier builds (where the build machine keeps them)
    pause_before: str | None = None  # the stage to pause before, for hands on the build machine (flows/pause.py)
    pause_timeout: float = 3600.0  # seconds a pause waits for someone to resume it before it gives up
    timed_out: bool = False  # the pause gave up: everything is released, whatever on_error says

    @property
    def target(self) -> CloudTarget:
        return self.recipe.targets[self.target_name]

    @property
    def tags(self) -> dict[str, str]:
        return {
            TAG_BUILD: self.build_id,
            TAG_RECIPE: self.recipe.name,
            TAG_RECIPE_VERSION: self.recipe.version,
            TAG_COMMIT: self.git.commit or "none",
        }

    @property
    def short_id(self) -> str:
        return self.build_id[:8]


class BuildListener(Protocol):
    """Who watches builds in this process (the CLI's live table): stage changes, a stage's short note (customize:
    `cached 2/3`) and log lines as they happen."""

    def stage_changed(self, plan: BuildPlan, stage: str, status: str) -> None: ...

    def note(self, plan: BuildPlan, stage: str, text: str) -> None: ...

    def line(self, plan: BuildPlan, stage: str, line: str) -> None: ...


LISTENERS: list[BuildListener] = []


def _notify(plan: BuildPlan, stage: str, status: str) -> None:
    for listener in LISTENERS:
        listener.stage_changed(plan, stage, status)


def note(plan: BuildPlan, stage: str, text: str) -> None:
    """A short note on a stage for whoever watches (the live table shows it beside the stage's time)."""
    for listener in LISTENERS:
        listener.note(plan, stage, text)


class StepLog:
    """A stage's log: lines go to the StepRun row (redacted, batched), the Prefect run log and the terminal."""

    FLUSH_SECONDS = 0.5

    def __init__(self, plan: BuildPlan, stage: str, step_id: int) -> None:
        self.plan, self.stage, self.step_id = plan, stage, step_id
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()
        self.tail: list[str] = []
        self._redact = LineRedactor()
        try:
            self._prefect = get_run_logger()
        except MissingContextError:
            self._prefect = log

    def __call__(self, line: str) -> None:
        line = self._redact(line.rstrip("\n"))
        if line is None:
            return
        with self._lock:
            self._pending.append(line)
            self.tail = (self.tail + [line])[-50:]
            due = time.monotonic() - self._last_flush > self.FLUSH_SECONDS
        self._prefect.info("%s", line)
        for listener in LISTENERS:
            listener.line(self.plan, self.stage, line)
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            text, self._pending = self._pending, []
            self._last_flush = time.monotonic()
        if text:
            store.append_step_log(self.step_id, "\n".join(text) + "\n")


def stage(name: str, *, retries: int = 0, retry_delay_seconds: float = 5) -> Callable:
    """Make a function a build stage: a Prefect task whose every attempt is a StepRun with its log.

    The wrapped function receives the plan first and a StepLog as keyword `step_log`.
    """

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def run(plan: BuildPlan, *args: Any, **kwargs: Any) -> T:
            attempt = task_run.run_count or 1
            store.set_build_stage(plan.build_id, name)
            step_id = store.start_step(plan.build_id, name, attempt)
            step_log = StepLog(plan, name, step_id)
            _notify(plan, name, "running")
            try:
                result = fn(plan, *args, step_log=step_log, **kwargs)
            except BaseException as exc:
                step_log.flush()
                status = "cancelled" if isinstance(exc, KeyboardInterrupt | SystemExit) else "failed"
                error = describe(exc)
                store.finish_step(step_id, status, error=error)
                _notify(plan, name, status)
                if not (isinstance(exc, Exception) and holds_secret(exc)):
                    raise
                redacted = StageError(error)
            else:
                step_log.flush()
                store.finish_step(step_id, "succeeded")
                _notify(plan, name, "succeeded")
                return result
            raise redacted  # outside the except block, so the original is not even its __context__

        # Prefect binds arguments by signature: show it the stage's own, without the injected step_log.
        signature = inspect.signature(fn)
        run.__signature__ = signature.replace(
            parameters=[p for p in signature.parameters.values() if p.name != "step_log"]
        )
        return task(
            run,
            name=name,
            retries=retries,
            retry_delay_seconds=retry_delay_seconds,
            cache_policy=NO_CACHE,
            persist_result=False,
        )

    return decorate


def holds_secret(exc: BaseException) -> bool:
    """Whether the exception, or one Python would print with it (its cause or context), holds a secret."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and not any(current is other for other in seen):
        seen.append(current)
        texts = [str(current), *(str(note) for note in getattr(current, "__notes__", ()))]
        if any(redact(text) != text for text in texts):
            return True
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False


class CancelledDuringCreate(KeyboardInterrupt):
    """The build was cancelled (its ledger released) while a cloud call was creating something: that thing is
    released at once and the stage stops without retrying, as after Ctrl-C."""


@contextmanager
def ledgered(
    plan: BuildPlan, *, kind: str, name: str, role: str = "build", region: str = ""
) -> Iterator[Callable[[str], None]]:
    """Write the intent row before the cloud call; the body reports the cloud id once it exists.

    If the body fails, whatever it reported is released at once (the caller's retry starts clean);
    what it created without reporting is found later by its tags (`kiln gc`).
    """
    tags = {**plan.tags, TAG_ROLE: role}
    row = store.ledger_intent(plan.build_id, cloud=plan.cloud.name, kind=kind, name=name, region=region, tags=tags)
    created: list[str] = []

    def report(cloud_id: str) -> None:
        created.append(cloud_id)
        if not store.ledger_created(row, cloud_id):
            raise CancelledDuringCreate(f"{kind} {cloud_id} was created after the build's resources were released")

    try:
        yield report
    except BaseException:
        if created:
            _release_one(plan, row, kind, created[0], region)
        else:
            store.ledger_released(row)  # nothing was created; gc still finds strays by tag
        raise
    if not created:
        store.ledger_released(row)  # this cloud keeps no such object (a local key pair, say)


def _release_one(plan: BuildPlan, row_id: int, kind: str, cloud_id: str, region: str) -> str | None:
    try:
        plan.cloud.release(Resource(cloud=plan.cloud.name, kind=kind, resource_id=cloud_id, region=region))
    except Exception as exc:  # keep releasing the rest; the error is recorded and fails the build
        error = redact(describe(exc))
        store.ledger_released(row_id, error=error)
        return f"{kind} {cloud_id}: {error}"
    store.ledger_released(row_id)
    return None


def release_open(plan: BuildPlan, *, role: str | None = None, keep: frozenset[str] = frozenset()) -> list[str]:
    """Undo, newest first, what this build (or one role of it) still holds; returns what could not be undone."""
    errors = []
    for row in sorted(store.open_resources(plan.build_id), key=lambda r: r.id, reverse=True):
        if (role and row_tags(row).get(TAG_ROLE) != role) or row.cloud_id in keep:
            continue
        cloud_id = row.cloud_id or store.ledger_abandon(row.id)  # the id may arrive while we look
        if not cloud_id:
            continue  # never created; a stray is found by tag by `kiln gc`
        error = _release_one(plan, row.id, row.kind, cloud_id, row.region or "")
        if error:
            errors.append(error)
    return errors


def hand_over(plan: BuildPlan, cloud_id: str) -> None:
    """The registered image leaves the ledger: it is the product, no longer something to clean up."""
    for row in store.open_resources(plan.build_id):
        if row.cloud_id == cloud_id:
            store.ledger_released(row.id)


def row_tags(row: Any) -> dict[str, str]:
    return json.loads(row.tags_json or "{}") if hasattr(row, "tags_json") else dict(row.tags or {})
