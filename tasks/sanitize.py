"""Stage 5: clean the machine with named operations, like virt-sysprep's, each logging what it removed."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass

from clouds.session import CommandFailed, Session
from core.recipe import SANITIZE_OPERATIONS
from tasks.common import BuildPlan, StepLog, stage
from tasks.launch import Guest

# Each script prints what it removed, one path a line, so the step log says exactly what went.
_LIST_AND_REMOVE = 'for f in {globs}; do [ -e "$f" ] || [ -L "$f" ] || continue; echo "$f"; rm -rf -- "$f"; done'


@dataclass(frozen=True)
class Operation:
    name: str
    heading: str
    description: str
    script: Callable[[str], str]  # ssh user -> shell script run as root


def _remove(*globs: str) -> Callable[[str], str]:
    return lambda user: _LIST_AND_REMOVE.format(globs=" ".join(globs))


def _ssh_userdir(user: str) -> str:
    home = f"$(getent passwd {shlex.quote(user)} | cut -d: -f6)"
    return _LIST_AND_REMOVE.format(globs=f'"{home}/.ssh" /root/.ssh/authorized_keys /root/.ssh/authorized_keys2')


_LOGFILES = r"""
find /var/log -type f \( -name '*.gz' -o -name '*.[0-9]' -o -name '*.old' \
  -o -name '*.journal' -o -name '*.journal~' \) -print -delete
find /var/log -type f -size +0 -print -exec truncate -s 0 {} +
"""

_ZERO_FREE_SPACE = """
if trimmed=$(fstrim -av 2>/dev/null) && [ -n "$trimmed" ]; then echo "$trimmed"; else
  dd if=/dev/zero of=/kiln-zero bs=1M status=none 2>/dev/null; sync; rm -f /kiln-zero; echo "zeroed free space on /"
fi
"""

# What `cloud-init clean --logs --seed` removes (everything under its /var/lib/cloud, and its two logs), in the
# shell: the Python command takes ~15 s to start under TCG. Only a cloud-init with clean.d hook scripts (executable
# files there; Debian ships a README) runs itself.
_CLOUD_INIT_STATE = (
    "if command -v cloud-init >/dev/null && "
    '[ -n "$(find /etc/cloud/clean.d -maxdepth 1 -type f -perm -u+x 2>/dev/null)" ]; then '
    "cloud-init clean --logs --seed && echo 'cloud-init clean --logs --seed'; else "
    + _LIST_AND_REMOVE.format(globs="/var/lib/cloud/* /var/log/cloud-init.log /var/log/cloud-init-output.log")
    + "; fi"
)

REGISTRY: tuple[Operation, ...] = (
    Operation(
        "ssh-hostkeys",
        "Remove the SSH host keys",
        "Every instance generates its own at first boot "
        "(cloud-init); shared host keys let one instance impersonate another.",
        _remove("/etc/ssh/ssh_host_*_key", "/etc/ssh/ssh_host_*_key.pub"),
    ),
    Operation(
        "ssh-userdir",
        "Remove the build user's .ssh directory and root's authorized keys",
        "The build key must not open the published image; users get their keys from cloud-init.",
        _ssh_userdir,
    ),
    Operation(
        "machine-id",
        "Empty /etc/machine-id",
        "systemd makes a new one at first boot, so instances do not share DHCP client ids or journal ids.",
        lambda user: (
            "[ -s /etc/machine-id ] && echo /etc/machine-id; truncate -s 0 /etc/machine-id; "
            "[ -e /var/lib/dbus/machine-id ] && echo /var/lib/dbus/machine-id; rm -f /var/lib/dbus/machine-id; true"
        ),
    ),
    Operation(
        "cloud-init-state",
        "Remove cloud-init's instance state, seeds and logs",
        "So the image runs cloud-init afresh on its first boot as a new instance.",
        lambda user: _CLOUD_INIT_STATE,
    ),
    Operation(
        "udev-persistent-net",
        "Remove udev's persistent network rules",
        "Otherwise a new NIC MAC address becomes eth1 and the image boots without network.",
        _remove("/etc/udev/rules.d/70-persistent-net.rules"),
    ),
    Operation(
        "bash-history",
        "Remove shell history",
        "History can hold commands with secrets.",
        _remove("/root/.bash_history", "/home/*/.bash_history", "/root/.lesshst", "/home/*/.lesshst"),
    ),
    Operation(
        "logfiles",
        "Empty log files and remove rotated logs and journals",
        "Build-time logs mean nothing to the image's users and may hold build details.",
        lambda user: _LOGFILES,
    ),
    Operation(
        "tmp-files",
        "Remove temporary files",
        "Nothing in /tmp or /var/tmp survives into the image (running services' systemd-private directories "
        "go at shutdown).",
        lambda user: "find /tmp /var/tmp -mindepth 1 -maxdepth 1 ! -name 'systemd-private-*' -print -exec rm -rf {} +",
    ),
    Operation(
        "package-manager-cache",
        "Remove package caches and downloaded package lists",
        "Smaller images; lists are stale by the time anyone boots the image.",
        _remove(
            "/var/cache/apt/archives/*.deb",
            "/var/cache/apt/*.bin",
            "/var/lib/apt/lists/*_*",
            "/var/cache/dnf/*",
            "/var/cache/yum/*",
            "/var/cache/zypp/*",
        ),
    ),
    Operation(
        "dhcp-client-state",
        "Remove DHCP leases",
        "A new instance must not ask for the builder's lease.",
        _remove(
            "/var/lib/dhcp/*",
            "/var/lib/dhclient/*",
            "/var/lib/NetworkManager/*.lease",
            "/var/lib/systemd/network/*",
        ),
    ),
    Operation(
        "zero-free-space",
        "Discard (or zero) free space",
        "Unused blocks compress to nothing, so the image is small; run last.",
        lambda user: _ZERO_FREE_SPACE,
    ),
)

assert tuple(op.name for op in REGISTRY) == SANITIZE_OPERATIONS, "the recipe schema and the registry disagree"


def operations(selected: list[str]) -> list[Operation]:
    by_name = {op.name: op for op in REGISTRY}
    return [by_name[name] for name in selected]


# Markers around each operation's output in the one script that runs them all (one SSH round trip).
_MARK = "@@kiln-sanitize"


def sanitize_script(ops: list[Operation], ssh_user: str) -> str:
    """One shell script running every operation in order as root, each in its own subshell.

    Each operation's output is framed by marker lines carrying its name and exit code, so the step log
    still says what each removed; the first failing operation stops the script with its exit code.
    The machine's identity (for the image audit) is printed first, and the disk is synced last.
    """
    lines = [
        f'echo "{_MARK} fact machine-id $(cat /etc/machine-id 2>/dev/null)"',
    ]
    uptime = "$(cut -d' ' -f1 /proc/uptime 2>/dev/null)"  # seconds since boot: how long each operation took
    for op in ops:
        lines += [
            f'echo "{_MARK} begin {op.name} {uptime}"',
            f"( {op.script(ssh_user).strip()}\n)",
            f'rc=$?; echo "{_MARK} end {op.name} $rc {uptime}"; [ "$rc" -eq 0 ] || exit "$rc"',
        ]
    lines.append("sync")
    return "\n".join(lines) + "\n"


@dataclass
class SanitizeOutput:
    """What the script printed, by operation: the lines each reported removing and its exit code."""

    facts: dict[str, str]
    removed: dict[str, list[str]]
    exit_codes: dict[str, int]
    seconds: dict[str, float]


def _uptime(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_output(stdout: str) -> SanitizeOutput:
    out = SanitizeOutput(facts={}, removed={}, exit_codes={}, seconds={})
    current: str | None = None
    began: float | None = None
    for line in stdout.splitlines():
        if line.startswith(_MARK + " "):
            kind, _, rest = line[len(_MARK) + 1 :].partition(" ")
            if kind == "fact":
                name, _, value = rest.partition(" ")
                out.facts[name] = value.strip()
            elif kind == "begin":
                current, _, at = rest.partition(" ")
                out.removed[current], began = [], _uptime(at)
            elif kind == "end":
                name, code, *at = rest.split(" ")
                out.exit_codes[name] = int(code)
                ended = _uptime(at[0]) if at else None
                if began is not None and ended is not None:
                    out.seconds[name] = ended - began
                current = None
        elif current is not None and line.strip():
            out.removed[current].append(line)
    return out


def run_operations(session: Session, ops: list[Operation], ssh_user: str, step_log: StepLog) -> SanitizeOutput:
    """Run every operation as root in one SSH command; logs per operation what it reported removing."""
    result = session.run(sanitize_script(ops, ssh_user), timeout=1800, check=False, label="sanitize")
    out = parse_output(result.stdout)
    for op in ops:
        if op.name not in out.removed:
            break
        for line in out.removed[op.name]:
            step_log(f"{op.name}: {line}")
        code = out.exit_codes.get(op.name)
        took = f", {out.seconds[op.name]:.1f}s" if op.name in out.seconds else ""
        if code == 0:
            step_log(f"{op.name}: done ({len(out.removed[op.name])} removed{took})")
    if result.exit_code != 0:
        failed = next((name for name, code in out.exit_codes.items() if code != 0), None)
        failed = failed or next((name for name in out.removed if name not in out.exit_codes), "sanitize script")
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-20:])
        raise CommandFailed(f"sanitize operation {failed}", result.exit_code, tail)
    return out


@stage("sanitize")
def sanitize(plan: BuildPlan, guest: Guest, *, step_log: StepLog) -> list[str]:
    selected = plan.recipe.sanitize.selected()
    skipped = [name for name in SANITIZE_OPERATIONS if name not in selected]
    if skipped:
        step_log(f"disabled by the recipe: {', '.join(skipped)}")
    # The image audit in verify proves a fresh instance is not this machine: remember what this machine was.
    guest.facts["host-key"] = guest.session.host_key_fingerprint
    out = run_operations(guest.session, operations(selected), guest.instance.ssh_user, step_log)
    guest.facts["machine-id"] = out.facts.get("machine-id", "")
    return selected
