"""QEMU plumbing for the local cloud: the KVM probe, qemu-img, QMP, and finding/ending our own processes."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from clouds.base import CloudError

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"

# The probe guest (data/kvm_probe.S): long mode, 768 MiB of memory writes and a 50M-step loop, then
# 0x21 to the isa-debug-exit port, which ends QEMU with status (0x21 << 1) | 1 = 67.
PROBE_SECTOR = Path(__file__).parent / "data" / "kvm_probe.bin"
_PROBE_EXIT_STATUS = 67


def run(args: list[str], *, timeout: float = 600, what: str = "") -> subprocess.CompletedProcess[str]:
    """Run a host command; a failure raises CloudError with the command's own words."""
    log.debug("running %s", " ".join(args))
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise CloudError(f"{args[0]} is not installed (make setup installs it)") from exc
    except subprocess.TimeoutExpired as exc:
        raise CloudError(f"{what or args[0]} did not finish within {timeout:.0f}s") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-20:])
        raise CloudError(f"{what or ' '.join(args[:2])} failed (exit {done.returncode}): {tail}")
    return done


def image_info(path: Path | str) -> dict[str, Any]:
    """`qemu-img info` as a dict: format, virtual-size, actual-size, backing file."""
    done = run([QEMU_IMG, "info", "--output=json", "-U", str(path)], what=f"qemu-img info {path}")
    return json.loads(done.stdout)


def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return "unknown"


def _qemu_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    return "unknown"


def run_probe_guest(timeout: float, accel: str = "kvm") -> bool:
    """Boot the probe sector; True only when the guest's own instruction reached the exit port."""
    with tempfile.TemporaryDirectory(prefix="kiln-kvm-probe-") as tmp:
        disk = Path(tmp) / "probe.img"
        disk.write_bytes(PROBE_SECTOR.read_bytes())
        args = [
            QEMU, "-machine", f"pc,accel={accel}", "-cpu", "host" if accel == "kvm" else "max",
            "-m", "160", "-nodefaults", "-display", "none", "-no-reboot",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-drive", f"file={disk},format=raw,if=ide",
        ]  # fmt: skip
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            log.info("%s probe: the guest did not run within %.0fs", accel, timeout)
            return False
        except OSError as exc:
            log.info("%s probe: could not start %s: %s", accel, QEMU, exc)
            return False
    if done.returncode == _PROBE_EXIT_STATUS:
        return True
    reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[0]
    log.info("%s probe failed: %s", accel, reason)
    return False


@functools.cache
def kvm_works(cache_file: Path | None = None, timeout: float = 10.0) -> bool:
    """Whether KVM really runs guest code here (not merely whether /dev/kvm exists).

    The answer is cached in this process and, when cache_file is given, on disk for this host boot and
    QEMU version (a probe costs a few seconds, and a faulting KVM costs the whole timeout).
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    key = {"boot_id": _boot_id(), "qemu": _qemu_version(), "kernel": platform.release()}
    if cache_file is not None:
        with contextlib.suppress(OSError, ValueError):
            cached = json.loads(cache_file.read_text())
            if cached.get("key") == key:
                return bool(cached["kvm"])
    works = run_probe_guest(timeout, "kvm")
    log.info("KVM %s here; guests run under %s", "works" if works else "faults", "KVM" if works else "TCG")
    if cache_file is not None:
        with contextlib.suppress(OSError):
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, "kvm": works}))
            tmp.replace(cache_file)
    return works


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now (QEMU binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def is_our_qemu(pid: int, marker: str) -> bool:
    """The pid is a QEMU whose command line names marker (an instance directory): safe to signal."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if not args or not os.path.basename(args[0].decode(errors="replace")).startswith("qemu-system"):
        return False
    return any(marker.encode() in arg for arg in args)


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait until the process is gone; True if it went within timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.2)
    return not process_alive(pid)


def kill_qemu(pid: int, marker: str) -> bool:
    """End our QEMU (TERM, then KILL); False when the pid is not ours or already gone."""
    if not process_alive(pid) or not is_our_qemu(pid, marker):
        return False
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if wait_exit(pid, grace):
            return True
    raise CloudError(f"QEMU process {pid} survived SIGKILL")


class QMP:
    """A minimal QMP client over the instance's unix socket: capabilities, then commands."""

    def __init__(self, path: Path | str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP socket closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise CloudError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
            # anything else is an asynchronous event: skip it

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> QMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
