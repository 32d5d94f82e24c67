"""Stage 7: boot the new image as a user would (fresh key, fresh user-data), run the recipe's probes,
and prove the build key no longer opens it."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from clouds import ssh
from clouds.base import ImageRef
from core.recipe import BaseSpec, Probe
from operations.image_audit import (
    BuildGuestFacts,
    ImageAuditFailed,
    audit_booted,
    audit_disk,
    audit_script,
    checks_for,
    key_blob,
)
from provenance import store
from tasks.common import BuildPlan, StepLog, stage
from tasks.launch import Guest, release_guest, start_guest
from tasks.wait_boot import connect_when_booted


class VerifyFailed(RuntimeError):
    """A probe failed or the build key still works; the image is not registered."""


@dataclass(frozen=True)
class ProbeOutcome:
    name: str
    kind: str
    passed: bool
    detail: str
    duration: float


@dataclass
class Verification:
    outcomes: list[ProbeOutcome]
    packages: list[tuple[str, str, str]] = field(default_factory=list)
    os: str = ""


def run_probe(plan: BuildPlan, guest: Guest, probe: Probe) -> ProbeOutcome:
    started = time.monotonic()
    passed, detail = _PROBES[probe.kind](plan, guest, probe)
    return ProbeOutcome(probe.label, probe.kind, passed, detail[:2000], time.monotonic() - started)


def _command(plan: BuildPlan, guest: Guest, probe: Probe) -> tuple[bool, str]:
    spec = probe.command
    result = guest.session.run(spec.run, timeout=probe.timeout, check=False)
    output = result.stdout.strip()
    if result.exit_code != spec.exit_code:
        return False, f"exit code {result.exit_code}, expected {spec.exit_code}; output: {output[-500:]}"
    if spec.expect is not None and spec.expect not in result.stdout:
        return False, f"output does not contain {spec.expect!r}: {output[-500:]}"
    return True, f"exit code {result.exit_code}; output: {output[-200:]}"


def _port(plan: BuildPlan, guest: Guest, probe: Probe) -> tuple[bool, str]:
    host, port = plan.cloud.endpoint(guest.instance, probe.port.port)
    open_ = ssh.probe_port(host, port, timeout=probe.timeout)
    return open_, f"guest port {probe.port.port} ({host}:{port}) {'open' if open_ else 'closed'}"


def _http(plan: BuildPlan, guest: Guest, probe: Probe) -> tuple[bool, str]:
    spec = probe.http
    host, port = plan.cloud.endpoint(guest.instance, spec.port)
    url = f"http://{host}:{port}{spec.path}"
    try:
        status, body = ssh.probe_http(url, timeout=probe.timeout)
    except OSError as exc:
        return False, f"GET {spec.path} on guest port {spec.port}: {exc}"
    if status != spec.status:
        return False, f"GET {spec.path}: status {status}, expected {spec.status}"
    if spec.expect is not None and spec.expect not in body:
        return False, f"GET {spec.path}: body does not contain {spec.expect!r}: {body[:200]!r}"
    return True, f"GET {spec.path}: status {status}" + (f", body contains {spec.expect!r}" if spec.expect else "")


_PROBES = {"command": _command, "port": _port, "http": _http}


def build_key_rejected(plan: BuildPlan, guest: Guest) -> ProbeOutcome:
    started = time.monotonic()
    host, port = plan.cloud.endpoint(guest.instance, 22)
    rejected = ssh.key_rejected(host, port, guest.instance.ssh_user, plan.build_key, timeout=30)
    detail = "the build key is refused" if rejected else "the build key still logs in: sanitize did not remove it"
    return ProbeOutcome("build key rejected", "build-key", rejected, detail, time.monotonic() - started)


def audit_image_file(plan: BuildPlan, image: ImageRef, step_log: StepLog) -> None:
    """A local image's disk, mounted read-only before anything boots it (needs root for the loop mount)."""
    if not image.files or os.geteuid() != 0:
        step_log("image audit of the disk: skipped (no image file here, or not root to mount it)")
        return
    checks = checks_for(plan.recipe.sanitize.selected())
    findings = audit_disk(Path(image.files[0].path), plan.build_key.public_key, checks)
    _judge("disk", findings, checks, step_log)


def audit_booted_image(plan: BuildPlan, guest: Guest, step_log: StepLog) -> None:
    """On the guest booted from the image: no build key, no history, and not the build guest's identity."""
    checks = checks_for(plan.recipe.sanitize.selected())
    output = guest.session.run(audit_script(key_blob(plan.build_key.public_key)), timeout=600).stdout
    facts = plan.guests[0].facts if plan.guests and plan.guests[0].facts else {}
    build = BuildGuestFacts(facts["host-key"], facts["machine-id"]) if facts else None
    findings = audit_booted(output, host_key=guest.session.host_key_fingerprint, build=build, checks=checks)
    _judge("booted image", findings, checks, step_log)


def _judge(where: str, findings: list, checks: list[str], step_log: StepLog) -> None:
    for finding in findings:
        step_log(f"image audit ({where}) FAIL {finding}")
    if findings:
        raise ImageAuditFailed(f"image audit ({where}): " + "; ".join(str(f) for f in findings))
    step_log(f"image audit ({where}): passed {', '.join(checks)}")


@stage("verify")
def verify(plan: BuildPlan, image: ImageRef, *, step_log: StepLog) -> Verification:
    base = plan.cloud.resolve_base(BaseSpec(image=image.image_id), plan.target.ssh_user)
    guest = start_guest(plan, base, "verify", step_log)
    # The guest boots (its own process, from an overlay: the image file is never written) while the disk audit
    # reads the image file, so the audit's conversion and mount cost no wall time; a finding stops the boot. On any
    # failure the guest is the build's failure policy's (flows/stages.py): released, or kept with --on-error abort.
    audit_image_file(plan, image, step_log)
    connect_when_booted(plan, guest, step_log)
    audit_booted_image(plan, guest, step_log)
    outcomes = [run_probe(plan, guest, probe) for probe in plan.recipe.verify]
    outcomes.append(build_key_rejected(plan, guest))
    for outcome in outcomes:
        store.record_probe(
            plan.build_id,
            name=outcome.name,
            kind=outcome.kind,
            passed=outcome.passed,
            detail=outcome.detail,
            duration=outcome.duration,
        )
        step_log(f"{'PASS' if outcome.passed else 'FAIL'} {outcome.name}: {outcome.detail}")
    facts = guest.session.facts()
    packages = guest.session.package_manifest()
    step_log(f"{facts.os_id} {facts.os_version}, {len(packages)} packages")
    failed = [o.name for o in outcomes if not o.passed]
    if failed:
        raise VerifyFailed(f"{len(failed)} of {len(outcomes)} probes failed: {', '.join(failed)}")
    release_guest(plan, guest, step_log)
    return Verification(outcomes=outcomes, packages=packages, os=f"{facts.os_id} {facts.os_version}")
