"""Stage 4: packages, files and scripts, in recipe order, as root on the build machine (over SSH, or in the local
cloud's build container), output streamed to the step log.

The stage is a chain of steps (the packages, each file, each script). Where the build machine keeps layers (the
local build container), each step's filesystem change is kept under a key digesting the key before it (the base's
digest at the root), the step's kind and content, every file it reads, its environment and kiln's version; a
rebuild reuses the longest run of matching layers and runs the rest, a failed build resumes at the step that failed.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from clouds.base import KeepsLayers
from clouds.session import CommandFailed, Session
from core.settings import KILN_VERSION
from provenance import store
from tasks.common import BuildPlan, StepLog, note, stage
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


def copy_file(session: Session, source: bytes, spec: object, step_log: StepLog) -> None:
    parent = spec.dest.rsplit("/", 1)[0] or "/"
    session.run(f"mkdir -p {shlex.quote(parent)}", timeout=60)
    session.put(source, spec.dest, mode=spec.mode, owner=spec.owner)
    step_log(f"file {spec.src} -> {spec.dest} ({spec.mode} {spec.owner})")


def run_script(session: Session, index: int, script: object, body: bytes, step_log: StepLog, timeout: float) -> None:
    remote = f"/tmp/kiln-script-{index}"
    session.put(body, remote, mode="0700", owner="root:root")
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in script.env.items())
    step_log(f"script {script.name}")
    try:
        _run(session, f"env {env} /bin/sh -c {shlex.quote(_exec_line(remote))}", f"script {script.name}", step_log,
             timeout)  # fmt: skip
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


@dataclass(frozen=True)
class Step:
    """One customize step: what it is called, what its layer key digests, and how it runs."""

    label: str
    inputs: dict
    run: Callable[[Session, StepLog, float], None]


def steps_of(plan: BuildPlan) -> list[Step]:
    """The recipe's packages, files and scripts as steps, in the order they run."""
    recipe, steps = plan.recipe, []
    if recipe.packages:
        steps.append(Step(f"packages: {' '.join(recipe.packages)}", {"packages": list(recipe.packages)},
                          lambda session, log, timeout: install_packages(session, recipe.packages, log, timeout)))
    for spec in recipe.files:
        body = (recipe.base_dir / spec.src).read_bytes()
        inputs = {"file": spec.dest, "mode": spec.mode, "owner": spec.owner, "sha256": _digest(body)}
        steps.append(Step(f"file {spec.src} -> {spec.dest}", inputs,
                          lambda session, log, timeout, body=body, spec=spec: copy_file(session, body, spec, log)))
    for index, script in enumerate(recipe.scripts):
        body = (recipe.base_dir / script.path).read_bytes() if script.path else script.inline.encode()
        inputs = {"script": script.name, "sha256": _digest(body), "env": dict(sorted(script.env.items()))}
        steps.append(Step(f"script {script.name}", inputs,
                          lambda session, log, timeout, i=index, s=script, b=body: run_script(session, i, s, b, log,
                                                                                               timeout)))  # fmt: skip
    return steps


def layer_keys(base_digest: str, steps: list[Step]) -> list[str]:
    """Each step's layer key: the digest of the key before it, the step's inputs and kiln's version."""
    keys, parent = [], base_digest
    for step in steps:
        parent = _digest(json.dumps({"parent": parent, "step": step.inputs, "kiln": KILN_VERSION},
                                    sort_keys=True).encode())  # fmt: skip
        keys.append(parent)
    return keys


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@stage("customize")
def customize(plan: BuildPlan, guest: Guest, *, step_log: StepLog) -> None:
    timeout, steps = plan.recipe.timeouts.customize, steps_of(plan)
    keys = layer_keys(plan.base_digest, steps)
    layers = plan.cloud.layers(guest.instance) if isinstance(plan.cloud, KeepsLayers) else None
    if layers is not None and plan.pause_before == "customize":
        # Hands on the machine before these steps: what was done by hand would be in their layers, and a later build
        # reusing them would carry it unrecorded; restoring layers would also restart the machine under the person.
        step_log("layer cache: off (the build was paused before customize for changes by hand)")
        layers = None
    chain: list[dict] = []
    reused = []
    if layers is not None and plan.use_cache:
        reused = layers.reusable(keys)
    elif layers is not None:
        step_log("layer cache: off for this build (every step runs)")
    if reused:
        for layer in reused:
            step_log(f"{layer.step}: reused layer {layer.key[:12]} made by build {layer.build_id[:8]}")
            chain.append({"step": layer.step, "key": layer.key, "reused_from": layer.build_id})
        store.record_layers(plan.build_id, chain)
        guest.session = layers.restore(reused, step_log)
        if len(reused) < len(steps):
            step_log(f"resumed after layer {reused[-1].key[:12]} of build {reused[-1].build_id[:8]}")
    if layers is not None and steps:
        note(plan, "customize", f"cached {len(reused)}/{len(steps)}")
    for step, key, parent in zip(steps[len(reused):], keys[len(reused):], ([plan.base_digest, *keys])[len(reused):],
                                 strict=False):  # fmt: skip
        if layers is not None:
            layers.begin()
        step.run(guest.session, step_log, timeout)
        if layers is not None:
            layer = layers.keep(key, step=step.label, build_id=plan.build_id, parent=parent)
            step_log(f"{step.label}: kept as layer {key[:12]} ({layer.size} bytes)")
            chain.append({"step": step.label, "key": key, "reused_from": None})
            store.record_layers(plan.build_id, chain)
    if chain:
        store.record_layers(plan.build_id, chain)
    guest.session.run("sync", timeout=120)
