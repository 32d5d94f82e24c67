"""Stage 4: packages, files and scripts, in recipe order, as root on the build machine (over SSH, or in the local
cloud's build container), output streamed to the step log."""

from __future__ import annotations

import shlex

from clouds.session import CommandFailed, Session
from tasks.common import BuildPlan, StepLog, stage
from tasks.launch import Guest

INSTALL_COMMANDS = {
    "apt": "export DEBIAN_FRONTEND=noninteractive; apt-get update -q && "
    "apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold {packages}",
    "dnf": "dnf install -y {packages}",
    "yum": "yum install -y {packages}",
    "zypper": "zypper --non-interactive install {packages}",
    "apk": "apk add --no-cache {packages}",
}


class CustomizeError(RuntimeError):
    """A package install, file copy or script failed; the message names which, the exit code and the last lines."""


def install_packages(session: Session, packages: list[str], step_log: StepLog, timeout: float) -> None:
    manager = session.facts().package_manager
    if manager not in INSTALL_COMMANDS:
        raise CustomizeError(f"packages: the guest has no package manager kiln knows ({manager or 'none found'})")
    command = INSTALL_COMMANDS[manager].format(packages=" ".join(shlex.quote(p) for p in packages))
    step_log(f"installing {len(packages)} package(s) with {manager}: {' '.join(packages)}")
    _run(session, command, f"packages ({manager})", step_log, timeout)


def copy_files(plan: BuildPlan, session: Session, step_log: StepLog) -> None:
    for spec in plan.recipe.files:
        parent = spec.dest.rsplit("/", 1)[0] or "/"
        session.run(f"mkdir -p {shlex.quote(parent)}", timeout=60)
        session.put(plan.recipe.base_dir / spec.src, spec.dest, mode=spec.mode, owner=spec.owner)
        step_log(f"file {spec.src} -> {spec.dest} ({spec.mode} {spec.owner})")


def run_scripts(plan: BuildPlan, session: Session, step_log: StepLog, timeout: float) -> None:
    for index, script in enumerate(plan.recipe.scripts):
        body = (plan.recipe.base_dir / script.path).read_bytes() if script.path else script.inline.encode()
        remote = f"/tmp/kiln-script-{index}"
        session.put(body, remote, mode="0700", owner="root:root")
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in script.env.items())
        step_log(f"script {script.name}")
        try:
            _run(
                session,
                f"env {env} /bin/sh -c {shlex.quote(_exec_line(remote))}",
                f"script {script.name}",
                step_log,
                timeout,
            )
        finally:
            session.run(f"rm -f {remote}", timeout=60, check=False)


def _exec_line(remote: str) -> str:
    # A script with a shebang runs with its own interpreter; one without runs with /bin/sh -e.
    return f'if head -c2 {remote} | grep -q "#!"; then exec {remote}; else exec /bin/sh -e {remote}; fi'


def _run(session: Session, command: str, label: str, step_log: StepLog, timeout: float) -> None:
    try:
        session.run(command, timeout=timeout, log=step_log)
    except CommandFailed as exc:
        tail = "\n".join(exc.tail[-10:]) if isinstance(exc.tail, list) else str(exc.tail)
        hint = f"\n{exc.hint}" if exc.hint else ""
        raise CustomizeError(f"{label} failed with exit code {exc.exit_code}; last lines:\n{tail}{hint}") from None


@stage("customize")
def customize(plan: BuildPlan, guest: Guest, *, step_log: StepLog) -> None:
    session, timeout = guest.session, plan.recipe.timeouts.customize
    if plan.recipe.packages:
        install_packages(session, plan.recipe.packages, step_log, timeout)
    copy_files(plan, session, step_log)
    run_scripts(plan, session, step_log, timeout)
    session.run("sync", timeout=120)
