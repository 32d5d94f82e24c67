"""The image audit after snapshot: the build key in no authorized_keys, no SSH host keys, an empty machine-id,
no cloud-init instance state, no shell history. A finding fails the build.

Local images are audited offline, their disk mounted read-only (operations.audit.mounted_read_only), before anything
boots them. On clouds the audit runs on the verify guest over SSH; there first boot has already made new host
keys, a new machine-id and new cloud-init state, so those are checked against the build guest: different host
key, different machine-id, the verify instance's state the only one cloud-init holds.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from operations.audit import mounted_read_only

# Check name -> the sanitize operation that makes it pass; a recipe that disables the operation is not audited
# for it (it asked to keep that state). The build key is always audited.
CHECKS: dict[str, str | None] = {
    "build-key": None,
    "ssh-hostkeys": "ssh-hostkeys",
    "machine-id": "machine-id",
    "cloud-init-state": "cloud-init-state",
    "shell-history": "bash-history",
}
HISTORY_FILES = (".bash_history", ".zsh_history", ".sh_history", ".ash_history", ".history")
SKIP_DIRS = {"proc", "sys", "dev", "run"}


@dataclass(frozen=True)
class Finding:
    check: str
    detail: str

    def __str__(self) -> str:
        return f"{self.check}: {self.detail}"


class ImageAuditFailed(RuntimeError):
    """The image still holds something sanitize should have removed; it is not registered."""


def checks_for(enabled_operations: Iterable[str]) -> list[str]:
    enabled = set(enabled_operations)
    return [check for check, operation in CHECKS.items() if operation is None or operation in enabled]


def key_blob(public_key: str) -> str:
    """The base64 part of an OpenSSH public key: what an authorized_keys line must not contain."""
    parts = public_key.split()
    if len(parts) < 2:
        raise ValueError("not an OpenSSH public key")
    return parts[1]


# ------------------------------------------------------------------------------------------ offline (a disk)


def audit_disk(disk: Path, build_public_key: str, checks: Iterable[str]) -> list[Finding]:
    """Mount the disk read-only and audit its filesystem."""
    with mounted_read_only(disk) as root:
        return audit_tree(root, build_public_key, checks)


def audit_tree(root: Path, build_public_key: str, checks: Iterable[str]) -> list[Finding]:
    """Audit an image's filesystem mounted at root. Symlinks are never followed (they point into the image)."""
    checks = set(checks)
    findings: list[Finding] = []
    if "build-key" in checks:
        findings += _build_key_in_tree(root, key_blob(build_public_key))
    if "ssh-hostkeys" in checks:
        for path in sorted((root / "etc/ssh").glob("ssh_host_*key*")) if (root / "etc/ssh").is_dir() else []:
            findings.append(Finding("ssh-hostkeys", f"/{path.relative_to(root)} is in the image"))
    if "machine-id" in checks:
        for relative in ("etc/machine-id", "var/lib/dbus/machine-id"):
            path = root / relative
            if path.is_file() and not path.is_symlink() and path.stat().st_size > 0:
                findings.append(Finding("machine-id", f"/{relative} is not empty"))
    if "cloud-init-state" in checks:
        cloud = root / "var/lib/cloud"
        if (cloud / "instance").is_symlink() or (cloud / "instance").exists():
            findings.append(Finding("cloud-init-state", "/var/lib/cloud/instance is in the image"))
        instances = sorted(p.name for p in (cloud / "instances").iterdir()) if (cloud / "instances").is_dir() else []
        if instances:
            findings.append(Finding("cloud-init-state", f"/var/lib/cloud/instances holds {', '.join(instances)}"))
    if "shell-history" in checks:
        homes = [root / "root", *sorted((root / "home").iterdir() if (root / "home").is_dir() else [])]
        for home in homes:
            for name in HISTORY_FILES:
                path = home / name
                if path.is_symlink() or path.exists():
                    findings.append(Finding("shell-history", f"/{path.relative_to(root)} is in the image"))
    return findings


def _build_key_in_tree(root: Path, blob: str) -> list[Finding]:
    findings = []
    for directory, subdirs, files in os.walk(root):
        if Path(directory) == root:
            subdirs[:] = [d for d in subdirs if d not in SKIP_DIRS]
        for name in files:
            if not name.startswith("authorized_keys"):
                continue
            path = Path(directory) / name
            if path.is_symlink() or not path.is_file():
                continue
            if blob in path.read_text(errors="replace"):
                findings.append(Finding("build-key", f"/{path.relative_to(root)} holds the build public key"))
    return findings


# ------------------------------------------------------------------------------------- online (verify guest)


@dataclass(frozen=True)
class BuildGuestFacts:
    """What the build guest was, read before sanitize: the verify guest must differ from it."""

    host_key: str  # SHA256 fingerprint pinned when the build guest booted
    machine_id: str


def audit_script(blob: str) -> str:
    """One root shell script printing, by section, what the guest holds of each check."""
    homes = "/root /home/*"
    history = " ".join(f'"$h/{name}"' for name in HISTORY_FILES)
    return "\n".join([
        "echo '== build-key'",
        f"find / -xdev \\( -path /proc -o -path /sys -o -path /dev -o -path /run \\) -prune -o -type f "
        f"-name 'authorized_keys*' -exec grep -l -F -e {shlex.quote(blob)} {{}} + 2>/dev/null",
        "echo '== shell-history'",
        f"for h in {homes}; do for f in {history}; do [ -e \"$f\" ] || [ -L \"$f\" ] && echo \"$f\"; done; done",
        "echo '== cloud-init-state'",
        "ls -1 /var/lib/cloud/instances 2>/dev/null",
        "echo '== machine-id'",
        "cat /etc/machine-id 2>/dev/null",
        "true",
    ])  # fmt: skip


def parse_sections(output: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("== "):
            current = sections.setdefault(line[3:].strip(), [])
        elif current is not None and line.strip():
            current.append(line.strip())
    return sections


def audit_booted(
    output: str, *, host_key: str, build: BuildGuestFacts | None, checks: Iterable[str]
) -> list[Finding]:
    """Judge the audit script's output from a guest freshly booted from the image."""
    checks, found = set(checks), parse_sections(output)
    findings = [Finding("build-key", f"{p} holds the build public key") for p in found.get("build-key", [])]
    findings = findings if "build-key" in checks else []
    if "shell-history" in checks:
        findings += [Finding("shell-history", f"{p} is in the image") for p in found.get("shell-history", [])]
    if "cloud-init-state" in checks and len(found.get("cloud-init-state", [])) > 1:
        held = ", ".join(found["cloud-init-state"])
        findings.append(Finding("cloud-init-state", f"cloud-init holds the state of several instances: {held}"))
    if build is not None and "ssh-hostkeys" in checks and host_key and host_key == build.host_key:
        findings.append(Finding("ssh-hostkeys", f"the new instance presents the build guest's host key {host_key}"))
    machine_id = (found.get("machine-id") or [""])[0]
    if build is not None and "machine-id" in checks and build.machine_id and machine_id == build.machine_id:
        findings.append(Finding("machine-id", "the new instance has the build guest's machine-id"))
    return findings
