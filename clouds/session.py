"""The one interface a stage uses to work on a build machine, whatever the machine is (an SSH guest, a container
on this host): run a command with streamed output and its exit code, put a file with owner and mode; plus what
both derive from it (the OS facts, the package manifest)."""

from __future__ import annotations

import logging
import re
import shlex
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from clouds.errors import CloudError

log = logging.getLogger(__name__)

TAIL_LINES = 20
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MODE = re.compile(r"^[0-7]{3,4}$")
_OWNER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class CommandFailed(CloudError):
    """A command exited non-zero; carries its label, exit code, the last lines of its output and, where the
    machine can tell, a hint (a container says when the failure looks like one that needs a real kernel)."""

    def __init__(self, command_label: str, exit_code: int, tail: str, hint: str = "") -> None:
        self.command_label = command_label
        self.exit_code = exit_code
        self.tail = tail
        self.hint = hint
        super().__init__(
            f"{command_label} exited with {exit_code}; last lines:\n{tail}" + (f"\n{hint}" if hint else "")
        )


class CommandTimeout(CloudError):
    """A command ran longer than its timeout and was killed."""

    def __init__(self, command_label: str, timeout: float, tail: str) -> None:
        self.command_label = command_label
        self.timeout = timeout
        self.tail = tail
        super().__init__(f"{command_label} did not finish within {timeout:.0f}s and was killed; last lines:\n{tail}")


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    stdout: str
    stderr: str
    duration: float


@dataclass(frozen=True)
class GuestFacts:
    os_id: str  # ID from /etc/os-release: debian, ubuntu, rocky, alpine, …
    os_version: str  # VERSION_ID: 12, 22.04, 9.3, …
    package_manager: str  # apt | dnf | yum | zypper | apk | "" when none is found


@runtime_checkable
class Session(Protocol):
    """What customize, sanitize and verify need of a build machine."""

    host_key_fingerprint: str  # "" for a machine reached without SSH

    def run(
        self,
        command: str,
        *,
        sudo: bool = True,
        timeout: float = 600,
        log: Callable[[str], None] | None = None,
        check: bool = True,
        env: dict[str, str] | None = None,
        label: str | None = None,
    ) -> RunResult: ...

    def put(
        self, source: str | Path | bytes, remote_path: str, *, mode: str = "0644", owner: str = "root:root"
    ) -> None: ...

    def facts(self) -> GuestFacts: ...

    def package_manifest(self) -> list[tuple[str, str, str]]: ...

    def close(self) -> None: ...


class LineSink:
    """A file-like target for a command's output: whole lines go to the log callback and into the tail."""

    def __init__(self, log_line: Callable[[str], None] | None, tail: deque[str]) -> None:
        self.log_line = log_line
        self.tail = tail
        self.partial = ""

    def write(self, data: str) -> None:
        self.partial += data
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            self._emit(line)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.partial:
            self._emit(self.partial)
            self.partial = ""

    def _emit(self, line: str) -> None:
        line = line.rstrip("\r")
        self.tail.append(line)
        if self.log_line is not None:
            try:
                self.log_line(line)
            except Exception:  # a broken log callback must not kill the command's output thread
                log.exception("log callback failed")


def label_of(command: str) -> str:
    """A command as an error message names it: its first line, shortened."""
    lines = command.strip().splitlines() or ["(empty command)"]
    first = lines[0]
    return first if len(first) <= 80 and len(lines) == 1 else first[:77] + "..."


def env_assignments(env: dict[str, str] | None) -> list[str]:
    """NAME=value words for env(1), each value quoted for the shell; a bad name is refused."""
    assignments = []
    for name, value in (env or {}).items():
        if not _ENV_NAME.match(name):
            raise CloudError(f"environment variable name {name!r} is not valid")
        assignments.append(f"{name}={shlex.quote(str(value))}")
    return assignments


def owner_and_mode(owner: str, mode: str) -> tuple[str, str]:
    """(user, group) of a `user[:group]` owner, the mode checked to be octal."""
    if not _MODE.match(mode):
        raise CloudError(f"mode {mode!r} is not an octal file mode like 0644")
    user, _, group = owner.partition(":")
    group = group or user
    if not (_OWNER.match(user) and _OWNER.match(group)):
        raise CloudError(f"owner {owner!r} is not user[:group]")
    return user, group


def install_command(temp: str, remote_path: str, *, mode: str, owner: str) -> str:
    """Move an uploaded temporary file into place with its mode and owner (parent directories are created)."""
    user, group = owner_and_mode(owner, mode)
    return (
        f"install -D -m {mode} -o {shlex.quote(user)} -g {shlex.quote(group)} "
        f"{shlex.quote(temp)} {shlex.quote(remote_path)}"
    )


class ShellSession(ABC):
    """What every session derives from run(): the OS facts and the package manifest."""

    @abstractmethod
    def run(
        self,
        command: str,
        *,
        sudo: bool = True,
        timeout: float = 600,
        log: Callable[[str], None] | None = None,
        check: bool = True,
        env: dict[str, str] | None = None,
        label: str | None = None,
    ) -> RunResult: ...

    def facts(self) -> GuestFacts:
        """OS id and version from /etc/os-release, and the package manager found on the PATH."""
        result = self.run(
            "cat /etc/os-release; for pm in apt-get dnf yum zypper apk; do "
            'if command -v "$pm" >/dev/null 2>&1; then echo "KILN_PM=$pm"; break; fi; done',
            sudo=False,
            timeout=60,
            label="read /etc/os-release",
        )
        fields: dict[str, str] = {}
        for line in result.stdout.splitlines():
            name, sep, value = line.partition("=")
            if sep:
                fields[name.strip()] = value.strip().strip("\"'")
        manager = fields.get("KILN_PM", "")
        return GuestFacts(
            os_id=fields.get("ID", ""),
            os_version=fields.get("VERSION_ID", ""),
            package_manager="apt" if manager == "apt-get" else manager,
        )

    def package_manifest(self) -> list[tuple[str, str, str]]:
        """Installed packages as (name, version, arch), sorted, from dpkg-query or rpm."""
        script = (
            "if command -v dpkg-query >/dev/null 2>&1; then "
            "dpkg-query -W -f='${db:Status-Abbrev}\\t${Package}\\t${Version}\\t${Architecture}\\n'; "
            "elif command -v rpm >/dev/null 2>&1; then "
            "rpm -qa --qf 'ii \\t%{NAME}\\t%|EPOCH?{%{EPOCH}:}|%{VERSION}-%{RELEASE}\\t%{ARCH}\\n'; "
            "else echo 'neither dpkg-query nor rpm is installed' >&2; exit 3; fi"
        )
        result = self.run(script, sudo=False, timeout=300, label="list installed packages")
        packages = set()
        for line in result.stdout.splitlines():
            parts = line.split("\t")
            if len(parts) == 4 and parts[0].startswith("ii"):
                packages.add((parts[1], parts[2], parts[3]))
        return sorted(packages)
