"""The eight stages of a build, declared once (name, function, whether it holds a VM), and the runner that owns
their order and the one failure policy (keep for debugging or release; failed or cancelled). The CLI's live table
and the tests read the same declaration."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from prefect import Task

from clouds.base import ImageRef
from core.recipe import load_recipe
from flows.limits import limit_name_for, vm_slot
from flows.pause import PauseTimedOut, pause_before
from provenance import gitinfo, store
from provenance.redact import describe
from tasks.common import LISTENERS, BuildListener, BuildPlan, release_open
from tasks.customize import customize
from tasks.fetch_base import ResolvedBase, fetch_base
from tasks.launch import Guest, keep_for_debugging, launch
from tasks.register import RegisteredImage, register
from tasks.sanitize import sanitize
from tasks.snapshot import snapshot
from tasks.verify import Verification, verify
from tasks.wait_boot import wait_boot

CANCELLED = threading.Event()  # set by Ctrl-C in this process: failing builds record "cancelled"


@dataclass
class Made:
    """What a build's stages have made so far, each by the stage named beside it."""

    base: ResolvedBase | None = None  # fetch_base
    guest: Guest | None = None  # launch
    image: ImageRef | None = None  # snapshot
    verification: Verification | None = None  # verify
    registered: RegisteredImage | None = None  # register


@dataclass(frozen=True)
class Stage:
    """One stage: its task (tasks/<name>.py), whether the build holds a VM while it runs, and how it takes what the
    stages before it made and keeps what it makes."""

    task: Task
    holds_vm: bool
    step: Callable[[BuildPlan, Made], None]

    @property
    def name(self) -> str:
        return self.task.name


def _fetch_base(plan: BuildPlan, made: Made) -> None:
    made.base = fetch_base(plan)


def _launch(plan: BuildPlan, made: Made) -> None:
    assert made.base is not None
    made.guest = launch(plan, made.base.image)


def _wait_boot(plan: BuildPlan, made: Made) -> None:
    assert made.guest is not None
    wait_boot(plan, made.guest)


def _customize(plan: BuildPlan, made: Made) -> None:
    assert made.guest is not None
    customize(plan, made.guest)


def _sanitize(plan: BuildPlan, made: Made) -> None:
    assert made.guest is not None
    sanitize(plan, made.guest)


def _snapshot(plan: BuildPlan, made: Made) -> None:
    assert made.guest is not None
    made.image = snapshot(plan, made.guest)


def _verify(plan: BuildPlan, made: Made) -> None:
    assert made.image is not None
    made.verification = verify(plan, made.image)


def _register(plan: BuildPlan, made: Made) -> None:
    assert made.base is not None and made.image is not None and made.verification is not None
    made.registered = register(plan, made.base, made.image, made.verification)


# One slot of the cloud's VM limit from launch to verify's end: the build guest is released in snapshot before
# verify boots the image, so the build never runs two VMs, and it neither pays a slot's release and re-acquisition
# (two Prefect requests) nor waits for a slot again half-way.
STAGES: tuple[Stage, ...] = (
    Stage(fetch_base, holds_vm=False, step=_fetch_base),
    Stage(launch, holds_vm=True, step=_launch),
    Stage(wait_boot, holds_vm=True, step=_wait_boot),
    Stage(customize, holds_vm=True, step=_customize),
    Stage(sanitize, holds_vm=True, step=_sanitize),
    Stage(snapshot, holds_vm=True, step=_snapshot),
    Stage(verify, holds_vm=True, step=_verify),
    Stage(register, holds_vm=False, step=_register),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def run_stages(plan: BuildPlan, stages: Sequence[Stage] = STAGES) -> Made:
    """Run the stages in order, holding one slot of the cloud's VM limit over the stages that hold a VM. A failure
    is concluded by the one policy while the slot is still held (what the build holds is released before the slot
    is, so a cloud never runs more kiln VMs than its limit), then raised."""
    made, holding = Made(), False
    with ExitStack() as slot:
        try:
            for stage in stages:
                if stage.holds_vm != holding:
                    if stage.holds_vm:
                        slot.enter_context(vm_slot(limit_name_for(plan.cloud)))
                    else:
                        slot.close()
                    holding = stage.holds_vm
                if stage.name == plan.pause_before:
                    pause_before(plan, stage.name, made.guest, cancelled=CANCELLED.is_set)
                run_stage(plan, stage, made)
        except BaseException as exc:
            conclude_failure(plan, exc)
            raise
    return made


def run_stage(plan: BuildPlan, stage: Stage, made: Made) -> None:
    """One stage; with --on-error ask, a failure asks the terminal watching the build what to do: retry the stage
    (after the recipe was fixed: it is read again), abort (keep everything) or clean up."""
    while True:
        try:
            stage.step(plan, made)
            return
        except Exception as exc:
            if plan.on_error != "ask" or is_cancellation(exc) or isinstance(exc, PauseTimedOut):
                raise
            choice = ask_on_error(plan, stage.name, exc)
            if choice != "retry":
                plan.on_error = choice  # abort keeps the machines, cleanup releases them: the policy below
                raise
            reread_recipe(plan)


ON_ERROR_CHOICES = ("retry", "abort", "cleanup")


def ask_on_error(plan: BuildPlan, stage: str, exc: BaseException) -> str:
    """retry, abort or cleanup, from the first listener that can ask a person; cleanup when none can (a worker, a
    build whose terminal is not interactive)."""
    question = f"{stage} failed: {describe(exc).splitlines()[0] if describe(exc) else type(exc).__name__}"
    for listener in LISTENERS:
        ask = getattr(listener, "ask", None)
        answer = ask(plan, stage, question, ON_ERROR_CHOICES) if ask is not None else None
        if answer in ON_ERROR_CHOICES:
            return answer
    return "cleanup"


def reread_recipe(plan: BuildPlan) -> None:
    """A stage retried after the recipe was fixed runs what the recipe says now, and provenance records the
    recipe version the build was finished from (its fingerprint, commit, dirty state)."""
    recipe = load_recipe(plan.recipe.path)
    git = gitinfo.capture(recipe.path, recipe.referenced_files())
    version_id = store.record_recipe_version(
        name=recipe.name, version=recipe.version, fingerprint=recipe.fingerprint(),
        recipe_json=json.dumps(recipe.stored_form(), sort_keys=True), git=git,
    )  # fmt: skip
    store.set_recipe_version(plan.build_id, version_id)
    plan.recipe, plan.git, plan.recipe_version_id = recipe, git, version_id


# -- the failure policy ------------------------------------------------------------------------------------------


def is_cancellation(exc: BaseException) -> bool:
    """Ctrl-C in this process, a signal, or Prefect cancelling the run (its TerminationSignal)."""
    return (
        CANCELLED.is_set()
        or isinstance(exc, KeyboardInterrupt | SystemExit)
        or type(exc).__name__ == "TerminationSignal"
    )


def keeps_machines(plan: BuildPlan, *, cancelled: bool) -> bool:
    """--on-error abort keeps a failed build's machines for debugging; a cancelled build keeps nothing, nor does a
    paused one that nobody resumed in time."""
    return plan.on_error == "abort" and not cancelled and not plan.timed_out


def conclude_failure(plan: BuildPlan, exc: BaseException) -> None:
    """Record the failure, then undo everything in reverse order — or keep it all, saying how to reach it."""
    for guest in plan.guests:
        if guest.session is not None:
            guest.session.close()
            guest.session = None
    cancelled = is_cancellation(exc)
    plan.timed_out = isinstance(exc, PauseTimedOut)
    if keeps_machines(plan, cancelled=cancelled):
        notes = keep_for_debugging(plan)
        for note in notes:  # the terminal watching the build says how to reach what it kept
            for listener in LISTENERS:
                listener.line(plan, "kept", note)
        store.finish_build(plan.build_id, "failed", error="\n".join([describe(exc), *notes]))
        return
    leftovers = release_open(plan)
    error = describe(exc) + (f"; could not release: {'; '.join(leftovers)}" if leftovers else "")
    store.finish_build(plan.build_id, "cancelled" if cancelled else "failed", error=error)


def release_unless_kept(plan: BuildPlan, *, cancelled: bool) -> list[str]:
    """What a run's end (a Prefect hook, Ctrl-C) does with what the build still holds; what could not be released."""
    return [] if keeps_machines(plan, cancelled=cancelled) else release_open(plan)


@contextmanager
def watched_by(listener: BuildListener) -> Iterator[None]:
    """Tell `listener` of every stage change, note and log line of the builds in this process meanwhile."""
    LISTENERS.append(listener)
    try:
        yield
    finally:
        LISTENERS.remove(listener)
