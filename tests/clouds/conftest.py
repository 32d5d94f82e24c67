"""Fixtures for the cloud tests: a throwaway sshd on 127.0.0.1, the bootstrap base (built once and kept in
the user's kiln cache between sessions), and the check that no test leaves a QEMU process or instance
directory behind."""

from __future__ import annotations

import getpass
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from clouds import qemu, ssh
from clouds.base import BaseImage, KeyPair
from clouds.local import LocalCloud
from core import settings

BASE_SOURCES = ("image", "name", "ssm_parameter", "file", "url", "bootstrap")


@dataclass(frozen=True)
class Spec:
    """Stands in for core.recipe.BaseSpec: the same attribute names, None when unset, and kind."""

    image: str | None = None
    name: str | None = None
    ssm_parameter: str | None = None
    file: str | None = None
    url: str | None = None
    sha256: str | None = None
    bootstrap: str | None = None
    packages: list[str] | None = None

    @property
    def kind(self) -> str:
        return next(source for source in BASE_SOURCES if getattr(self, source) is not None)


def user_data(user: str, key: KeyPair) -> str:
    """What the launch stage writes: the user with only this key and passwordless sudo."""
    config = {
        "users": [
            {
                "name": user,
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "shell": "/bin/bash",
                "lock_passwd": True,
                "ssh_authorized_keys": [key.public_key],
            }
        ],
        "ssh_pwauth": False,
    }
    return "#cloud-config\n" + yaml.safe_dump(config, sort_keys=False)


def our_qemu_processes(state_dir: Path) -> dict[int, str]:
    """QEMU processes whose command line points into this session's state directory: pid → command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and os.path.basename(args[0].decode(errors="replace")).startswith("qemu-system"):
            line = " ".join(arg.decode(errors="replace") for arg in args)
            if str(state_dir) in line and qemu.process_alive(int(entry.name)):
                found[int(entry.name)] = line
    return found


@pytest.fixture(scope="session")
def shared_instances() -> set[str]:
    """Instance ids a module fixture keeps alive across tests on purpose (one boot, several assertions)."""
    return set()


@pytest.fixture(autouse=True)
def nothing_left_behind(shared_instances: set[str]) -> Iterator[None]:
    """After every test: no QEMU process and no instance directory (overlay, seed) of ours remains."""
    yield
    state = settings.state_dir()
    processes = {
        pid: line
        for pid, line in our_qemu_processes(state).items()
        if not any(instance in line for instance in shared_instances)
    }
    assert processes == {}, f"QEMU processes left behind: {processes}"
    leftovers = sorted(p.name for p in state.iterdir() if p.name not in shared_instances)
    assert leftovers == [], f"instance directories left behind under {state}: {leftovers}"


@pytest.fixture(scope="session")
def cloud() -> LocalCloud:
    """The local cloud on this session's KILN_HOME, with the user's kiln cache (KILN_CACHE if set)."""
    return LocalCloud()


@pytest.fixture(scope="session")
def bootstrap_base(cloud: LocalCloud) -> BaseImage:
    """The debian-bookworm bootstrap base: built the first time (a few minutes), then served from the cache."""
    return cloud.resolve_base(Spec(bootstrap="debian-bookworm"), "debian")


@dataclass
class SshServer:
    host: str
    port: int
    user: str
    key: KeyPair
    host_fingerprint: str
    pid: int


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SshServer]:
    """A real OpenSSH server on 127.0.0.1 with its own host key, accepting one fresh key pair; stopped by pid."""
    work = tmp_path / "sshd"
    work.mkdir()
    host_key = work / "host_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    listing = subprocess.run(["ssh-keygen", "-l", "-f", f"{host_key}.pub"], check=True, capture_output=True, text=True)
    host_fingerprint = listing.stdout.split()[1]
    key = KeyPair.generate("kiln-test-sshd")
    (work / "authorized_keys").write_text(key.public_key + "\n")
    port = qemu.free_port()
    config = work / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {work}/authorized_keys\n"
        f"PidFile {work}/sshd.pid\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nSubsystem sftp internal-sftp\n"
        "LogLevel VERBOSE\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    log = open(work / "sshd.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while not ssh.ssh_answers("127.0.0.1", port, timeout=1):
            assert server.poll() is None, (work / "sshd.log").read_text()
            assert time.monotonic() < deadline, "sshd did not answer within 15 s"
            time.sleep(0.1)
        yield SshServer("127.0.0.1", port, getpass.getuser(), key, host_fingerprint, server.pid)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()
