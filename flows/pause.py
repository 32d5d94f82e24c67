"""Hands on a build: a build paused before a stage (how to get in, waiting for someone to say go on, giving up
after its timeout), `kiln shell` (a shell in the paused build machine, its transcript recorded and the build marked
interactive) and `kiln resume`."""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import math
import os
import pty
import re
import shlex
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect.runtime import flow_run

from clouds.base import OpensSessions
from core import settings
from flows.request import BadInput
from provenance import lineage, store
from provenance.redact import redact
from tasks.common import LISTENERS, BuildPlan
from tasks.launch import Guest

log = logging.getLogger("kiln.pause")

# The stages a build may pause before: its build machine is up (wait_boot is done) and not yet snapshotted.
PAUSABLE = ("customize", "sanitize", "snapshot")
DEFAULT_STAGE = "sanitize"
POLL_SECONDS = 1.0
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>]")


class PauseTimedOut(RuntimeError):
    """Nobody resumed a paused build in time: it gives up, and everything it holds is released."""


def pause_problem(stage: str | None, *, require_clean: bool) -> str | None:
    """What is wrong with `--pause-before STAGE` (None: nothing), checked before anything launches."""
    if stage is None:
        return None
    if stage not in PAUSABLE:
        return (f"--pause-before: {stage!r} is not a stage a build can pause before (its build machine runs from "
                f"wait_boot to snapshot): one of {', '.join(PAUSABLE)}")
    if require_clean:
        return ("--pause-before: a build changed by hand is not reproducible from its recipe, which "
                "--require-clean demands; drop one of them")
    return None


# ---------------------------------------------------------------------------------------------- the pause


def pause_before(plan: BuildPlan, stage: str, guest: Guest | None, *, cancelled: Callable[[], bool]) -> None:
    """Wait before `stage` until someone says go on (Enter, `kiln resume`), saying how to get in meanwhile;
    PauseTimedOut after plan.pause_timeout seconds."""
    if guest is None:
        raise RuntimeError(f"no build machine to pause before {stage}")
    started = time.monotonic()
    deadline = store.utcnow() + dt.timedelta(seconds=plan.pause_timeout)
    step_id = store.start_step(plan.build_id, "pause")
    in_prefect: threading.Event | None = None
    try:
        store.pause_build(plan.build_id, stage=stage, deadline=deadline, shell=shell_access(plan, guest))
        in_prefect = pause_in_prefect(plan.pause_timeout)
        _tell(plan, step_id, [
            f"paused before {stage}: the build machine is yours until {deadline:%Y-%m-%d %H:%M:%SZ}",
            f"  get in:   kiln shell {plan.build_id}   (the session is recorded; the build becomes interactive)",
            f"  go on:    Enter here, or kiln resume {plan.build_id}",
            f"  give up:  Ctrl-C, or wait {plan.pause_timeout:.0f}s (everything is then cleaned up)",
        ])  # fmt: skip
        how = _wait(plan, deadline, cancelled, in_prefect)
    except BaseException as exc:
        store.finish_step(step_id, "failed", error=str(exc) or type(exc).__name__)
        raise
    finally:
        store.end_pause(plan.build_id)
        forget_shell_files(plan.build_id)
        if in_prefect is not None:
            end_prefect_pause(flow_run.id)
    _tell(plan, step_id, [f"resumed by {how} after {time.monotonic() - started:.0f}s; going on with {stage}"])
    store.finish_step(step_id, "succeeded")


def _tell(plan: BuildPlan, step_id: int, lines: list[str]) -> None:
    store.append_step_log(step_id, "\n".join(lines) + "\n")
    for line in lines:
        log.info("%s", line)
        for listener in LISTENERS:
            listener.line(plan, "pause", line)


def _wait(
    plan: BuildPlan, deadline: dt.datetime, cancelled: Callable[[], bool], in_prefect: threading.Event | None
) -> str:
    """Who said go on: `kiln resume` (the database), Prefect's Resume (the UI), Enter (a listener's terminal).
    PauseTimedOut at the deadline."""
    while True:
        if store.resume_requested(plan.build_id):
            return "kiln resume"
        if in_prefect is not None and in_prefect.is_set():
            return "Prefect (Resume)"
        if cancelled():
            raise KeyboardInterrupt("cancelled while paused")
        if store.utcnow() >= deadline:
            raise PauseTimedOut(f"paused for {plan.pause_timeout:.0f}s and nobody resumed it: gave up, cleaned up")
        if _enter_pressed():
            return "Enter"


def _enter_pressed() -> bool:
    """Wait up to POLL_SECONDS for Enter in a terminal that watches the build (a listener's wait_enter)."""
    until = time.monotonic() + POLL_SECONDS
    for listener in LISTENERS:
        if (wait_enter := getattr(listener, "wait_enter", None)) is not None and wait_enter(POLL_SECONDS):
            return True
    time.sleep(max(0.0, until - time.monotonic()))
    return False


def pause_in_prefect(timeout: float) -> threading.Event | None:
    """A run a worker started (from the UI, a schedule, an automation) also pauses the Prefect way, with Prefect's
    own pause_flow_run, so the UI offers its Resume; the event is set when the run is resumed there. None for a
    `kiln build` in a terminal (Enter and `kiln resume` are its ways on)."""
    if not os.environ.get("PREFECT__FLOW_RUN_ID") or not flow_run.id:
        return None
    from prefect.flow_runs import pause_flow_run

    resumed = threading.Event()

    def wait() -> None:
        try:
            pause_flow_run(timeout=math.ceil(timeout), poll_interval=2, key=f"kiln-pause-{time.time_ns()}")
        except Exception as exc:  # timed out, or the run ended: kiln's own deadline decides
            log.info("Prefect pause ended without a resume: %s", exc)
            return
        resumed.set()

    threading.Thread(target=contextvars.copy_context().run, args=(wait,), name="kiln-prefect-pause",
                     daemon=True).start()  # fmt: skip
    return resumed


def end_prefect_pause(flow_run_id: str | None) -> None:
    """Prefect's pause of this run ends with kiln's (resumed from the terminal or by `kiln resume`, or given up)."""
    if not flow_run_id:
        return
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    if state is not None and state.is_paused():
        try:
            resume_flow_run(flow_run_id)
        except Exception as exc:  # the run's own state machine decides; the build goes on regardless
            log.warning("could not resume Prefect's pause of flow run %s: %s", flow_run_id, exc)


# ------------------------------------------------------------------------------------------- getting in


def shell_dir(build_id: str) -> Path:
    return settings.data_dir() / "shell" / build_id


def forget_shell_files(build_id: str) -> None:
    """The build key and pinned host key `kiln shell` used while the build was paused."""
    shutil.rmtree(shell_dir(build_id), ignore_errors=True)


def shell_access(plan: BuildPlan, guest: Guest) -> dict[str, Any]:
    """How `kiln shell` gets a root shell in the build machine: a shell in the container, or SSH with the build
    key and the pinned host key (both written 0600 under the data directory while paused). No secret is in it."""
    if isinstance(plan.cloud, OpensSessions) and (argv := plan.cloud.shell_command(guest.instance)):
        return {"kind": "container", "argv": argv, "machine": guest.instance.instance_id}
    directory = shell_dir(plan.build_id)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_file, known_hosts = directory / "build_ed25519", directory / "known_hosts"
    host, port = plan.cloud.endpoint(guest.instance, 22)
    _private(key_file, guest.key.private_key)
    host_key = guest.session.host_key_line() if guest.session is not None else ""  # type: ignore[attr-defined]
    _private(known_hosts, f"{host if port == 22 else f'[{host}]:{port}'} {host_key}\n")
    argv = ["ssh", "-t", "-i", str(key_file), "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "GlobalKnownHostsFile=/dev/null", "-p", str(port),
            f"{guest.instance.ssh_user}@{host}", "--", "sudo"]  # fmt: skip
    return {"kind": "ssh", "argv": argv, "machine": guest.instance.instance_id}


def _private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _paused(build_id: str) -> lineage.BuildDetail:
    detail = lineage.get_build(build_id)
    if detail is None:
        raise BadInput(f"no build {build_id!r} in the provenance database (see `kiln builds`)")
    if detail.build.status != "running" or not detail.build.paused_before:
        raise BadInput(f"build {detail.build.id} is {detail.build.status} and not paused "
                       "(`kiln build RECIPE --pause-before STAGE` pauses one)")  # fmt: skip
    return detail


def shell_argv(access: dict[str, Any], command: str | None) -> list[str]:
    """The full command line: a login shell, or `command` run by a shell."""
    argv = list(access["argv"])
    if access["kind"] == "container":
        return argv + (["-c", command] if command else ["-l"])
    return argv + (["bash", "-c", shlex.quote(command)] if command else ["-i"])


def open_shell(build_id: str, command: str | None = None) -> tuple[str, int]:
    """`kiln shell`: a root shell (or `command`) in a paused build's machine, on a pseudo-terminal whose every byte
    is kept; the build is marked interactive first, and the transcript (redacted) becomes a "shell" step of its
    log. Returns the build id and the shell's exit code."""
    detail = _paused(build_id)
    build = detail.build
    argv = shell_argv(json.loads(build.shell_json or "{}"), command)
    store.mark_interactive(build.id)
    started = store.utcnow()
    chunks: list[bytes] = []

    def keep(fd: int) -> bytes:
        data = os.read(fd, 4096)
        chunks.append(data)
        return data

    status = 255
    try:
        status = os.waitstatus_to_exitcode(pty.spawn(argv, keep))
    finally:
        header = f"$ {command}\n" if command else ""
        footer = f"[kiln shell: exit {status}]\n"
        store.record_shell_session(build.id, header + clean_transcript(b"".join(chunks)) + footer, started=started)
    return build.id, status


def clean_transcript(raw: bytes) -> str:
    """A terminal session as text: escape sequences dropped, CR-LF as LF, a line erased by backspaces as typed,
    then redacted (private keys, cloud secrets)."""
    text = _ANSI.sub("", raw.decode(errors="replace")).replace("\r", "")
    while "\x08" in text:
        text, count = re.subn("[^\x08\n]\x08", "", text)
        if not count:
            text = text.replace("\x08", "")
    text = "".join(ch for ch in text if ch in "\n\t" or ch >= " ")
    if text and not text.endswith("\n"):
        text += "\n"
    return redact(text)


def resume(build_id: str) -> str:
    """`kiln resume`: tell a paused build to go on; returns its id."""
    detail = _paused(build_id)
    if not store.request_resume(detail.build.id):
        raise BadInput(f"build {detail.build.id} is no longer paused")
    return detail.build.id
