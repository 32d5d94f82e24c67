"""Build machines as containers on this host, for the local cloud's `build_in: container`.

A working copy of the base disk (sparse raw), its root filesystem loop-mounted, and the image's own systemd
booted on it by systemd-nspawn, in a network namespace of its own whose only way out is slirp4netns (outbound
NAT: apt works, and a service the recipe starts listens on no port of this host). Commands run inside with
nsenter, under the container's capability bounding set, so a script can do what the image's services can.

Every part lives in, or is named after, the instance directory: the working copy and the mount point inside it,
the loop device found by its backing file, the processes by their command line or their root, the network
namespace by name. So teardown finds whatever a killed build left from the directory alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import select
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clouds import disk, qemu
from clouds.base import CloudError
from clouds.session import (
    TAIL_LINES,
    CommandFailed,
    CommandTimeout,
    LineSink,
    RunResult,
    ShellSession,
    env_assignments,
    install_command,
    label_of,
)

log = logging.getLogger(__name__)

NSPAWN = "systemd-nspawn"
SLIRP = "slirp4netns"
NETNS_DIR = Path("/run/netns")
PROPAGATE_DIR = Path("/run/systemd/nspawn/propagate")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SLIRP_DNS = "10.0.2.3"  # slirp4netns's forwarder to this host's resolver
STOP_GRACE = 60.0  # for the container's systemd to shut down in order before it is killed
# Capability numbers (linux/capability.h) by setpriv's names: commands get the container's bounding set.
CAPABILITIES = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid", "setpcap",
    "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw", "ipc_lock", "ipc_owner",
    "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct", "sys_admin", "sys_boot", "sys_nice",
    "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease", "audit_write", "audit_control", "setfcap",
    "mac_override", "mac_admin", "syslog", "wake_alarm", "block_suspend", "audit_read", "perfmon", "bpf",
    "checkpoint_restore",
)  # fmt: skip
# Failures that usually mean the recipe needs a kernel of its own (modules, sysctls, mounts).
KERNEL_BOUND = re.compile(
    r"modprobe|insmod|sysctl|/proc/sys|/lib/modules|\bmount\b|kernel module|read-only file system", re.IGNORECASE
)
KERNEL_HINT = (
    "hint: this looks like something a container cannot do on the host's kernel (modules, sysctls, mounts); "
    "build this target with `build_in: vm`"
)


@dataclass(frozen=True)
class Layout:
    """Where one container's parts live, all found from its instance directory."""

    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / "disk.raw"

    @property
    def root(self) -> Path:
        return self.directory / "root"

    @property
    def console(self) -> Path:
        return self.directory / "console.log"

    @property
    def netns(self) -> str:
        return f"kiln-{self.directory.name}"

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns


# ----------------------------------------------------------------------------------------------- start


def require_tools() -> None:
    missing = [tool for tool in (NSPAWN, SLIRP, "nsenter", "setpriv", "losetup", "ip") if not shutil.which(tool)]
    if missing:
        raise CloudError(
            f"build_in: container needs {', '.join(missing)} (Debian: systemd-container, slirp4netns, util-linux, "
            "iproute2; `make setup` installs them); or build with `build_in: vm`"
        )
    if os.geteuid() != 0:
        raise CloudError("build_in: container needs root (loop devices, mounts, systemd-nspawn); or `build_in: vm`")


def make_working_copy(base: Path, layout: Layout, size_gb: int | None) -> None:
    """The base as a sparse raw disk, grown (its Linux partition too) to size_gb when that is larger."""
    qemu.run([qemu.QEMU_IMG, "convert", "-O", "raw", str(base), str(layout.disk)],
             what="qemu-img convert of the base to raw", timeout=1800)  # fmt: skip
    if size_gb and size_gb * 1024**3 > layout.disk.stat().st_size:
        os.truncate(layout.disk, size_gb * 1024**3)
        disk.grow_linux_partition(layout.disk)


def mount_root(layout: Layout) -> str:
    """Loop-attach and mount the working copy's root filesystem (grown online to its partition); the loop device."""
    # The instance directory becomes an unbindable mount first: systemd-nspawn takes a recursive copy of the host's
    # mounts when a container starts, and a copy of this root would hold its loop device busy until that other
    # container ends; unbindable mounts (and what is mounted below them) are left out of such copies.
    loop = disk.attach_loop(layout.disk, read_only=False)
    disk.run(["mount", "--bind", str(layout.directory), str(layout.directory)])
    disk.run(["mount", "--make-unbindable", str(layout.directory)])
    disk.mount(loop, layout.root, read_only=False)
    if disk.run(["blkid", "-o", "value", "-s", "TYPE", loop], check=False).strip() in ("ext3", "ext4"):
        disk.run(["resize2fs", loop], check=False, timeout=600)  # no-op unless the partition grew
    return loop


def resolver_binds(layout: Layout) -> list[str]:
    """nspawn options that point the container's resolver at slirp4netns's, without writing the image:
    a runtime drop-in for systemd-resolved, else a resolv.conf mounted over the image's own."""
    resolv = layout.root / "etc/resolv.conf"
    target = os.readlink(resolv) if resolv.is_symlink() else ""
    if "systemd/resolve" in target:
        conf = layout.directory / "resolved.conf"
        conf.write_text(f"[Resolve]\nDNS={SLIRP_DNS}\n")
        return [f"--bind-ro={conf}:/run/systemd/resolved.conf.d/kiln.conf"]
    conf = layout.directory / "resolv.conf"
    conf.write_text(f"nameserver {SLIRP_DNS}\n")
    return [f"--bind-ro={conf}:/etc/resolv.conf"] if resolv.is_file() and not resolv.is_symlink() else []


def create_network(layout: Layout) -> int:
    """A named network namespace with slirp4netns's outbound NAT in it; returns slirp4netns's pid."""
    disk.run(["ip", "netns", "add", layout.netns])
    log_file = open(layout.directory / "slirp.log", "wb")  # noqa: SIM115 - the daemon's, closed below
    # --ready-fd rather than an API socket: a socket's path is limited to 107 bytes, and a deep KILN_HOME exceeds it.
    ready_read, ready_write = os.pipe()
    try:
        slirp = subprocess.Popen(
            [SLIRP, "--configure", "--disable-host-loopback", "--mtu=65520", f"--ready-fd={ready_write}",
             "--netns-type=path", str(layout.netns_path), "tap0"],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            pass_fds=(ready_write,),
        )  # fmt: skip
    finally:
        log_file.close()
        os.close(ready_write)
    try:
        ready, _, _ = select.select([ready_read], [], [], 30)
        configured = bool(ready) and os.read(ready_read, 1) == b"1"  # EOF (b"") when slirp4netns exits first
    finally:
        os.close(ready_read)
    if not configured:
        text = (layout.directory / "slirp.log").read_text(errors="replace")[-2000:]
        raise CloudError(f"slirp4netns did not set up the container's network: {text}")
    return slirp.pid


def boot(layout: Layout, name: str) -> int:
    """systemd-nspawn booting the image's own systemd, detached from kiln; returns its pid.

    The image is not touched by nspawn itself: no resolv.conf, timezone or journal link is copied into it.
    """
    args = [
        NSPAWN, "--quiet", "--register=no", "--keep-unit", f"--directory={layout.root}", "--boot",
        f"--machine={name}", f"--network-namespace-path={layout.netns_path}", "--console=read-only",
        "--resolv-conf=off", "--timezone=off", "--link-journal=no", *resolver_binds(layout),
    ]  # fmt: skip
    console = open(layout.console, "wb")  # noqa: SIM115 - the daemon's, closed below
    try:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    finally:
        console.close()
    return process.pid


# ------------------------------------------------------------------------------------------ the session


class ContainerSession(ShellSession):
    """Commands in a running container, as root, through nsenter: the same interface as an SSH session."""

    host_key_fingerprint = ""  # nothing is reached over SSH

    def __init__(self, leader: int, name: str) -> None:
        self.leader = leader
        self.name = name
        self.bounding_set = _bounding_set(leader)

    def close(self) -> None:
        """Nothing to close: every command is its own process."""

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
        stdin: bytes | None = None,
    ) -> RunResult:
        """Run command with sh -c as root in the container (sudo changes nothing: there is no other user to be),
        streaming each output line to log; coreutils' timeout inside ends it, a watchdog here covers the rest."""
        label = label or label_of(command)
        argv = [
            "setpriv", f"--bounding-set=-all,{self.bounding_set}",
            "nsenter", f"--target={self.leader}", "--all", "--root", "--wd", "--",
            "env", "-i", f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8", "TERM=dumb", *env_assignments(env),
            "timeout", "-k", "10", str(math.ceil(timeout)), "/bin/sh", "-c", command,
        ]  # fmt: skip
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        started = time.monotonic()
        process = subprocess.Popen(
            argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        outputs = {"stdout": [], "stderr": []}
        readers = [
            threading.Thread(target=_pump, args=(stream, LineSink(log, tail), outputs[key]), daemon=True)
            for key, stream in (("stdout", process.stdout), ("stderr", process.stderr))
        ]
        for reader in readers:
            reader.start()
        if stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                process.stdin.write(stdin)
            process.stdin.close()
        try:
            exit_code = process.wait(timeout=math.ceil(timeout) + 15)
        except subprocess.TimeoutExpired as exc:
            _kill_group(process)
            raise CommandTimeout(label, timeout, "\n".join(tail)) from exc
        except BaseException:
            _kill_group(process)
            raise
        finally:
            for reader in readers:
                reader.join(timeout=10)
        duration = time.monotonic() - started
        if exit_code == 124 and duration >= timeout - 1:
            raise CommandTimeout(label, timeout, "\n".join(tail))
        if check and exit_code != 0:
            text = "\n".join(tail)
            raise CommandFailed(label, exit_code, text, KERNEL_HINT if KERNEL_BOUND.search(text) else "")
        return RunResult(exit_code, "".join(outputs["stdout"]), "".join(outputs["stderr"]), duration)

    def put(
        self, source: str | Path | bytes, remote_path: str, *, mode: str = "0644", owner: str = "root:root"
    ) -> None:
        """Write a file (or bytes) to remote_path with mode and owner, streamed through the command's stdin."""
        body = source if isinstance(source, bytes) else Path(source).read_bytes()
        temp = f"/tmp/kiln-put-{os.urandom(8).hex()}"
        install = install_command(temp, remote_path, mode=mode, owner=owner)
        self.run(
            f"umask 077; cat > {temp} && {install}; status=$?; rm -f {temp}; exit $status",
            timeout=120,
            label=f"install {remote_path}",
            stdin=body,
        )


def shell_argv(leader: int) -> list[str]:
    """A root shell in the running container as `kiln shell` starts it (its arguments follow: -l, or -c COMMAND),
    with the container's capability bounding set, like every command kiln runs there."""
    return [
        "setpriv", f"--bounding-set=-all,{_bounding_set(leader)}",
        "nsenter", f"--target={leader}", "--all", "--root", "--wd", "--",
        "env", "-i", f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8", "TERM=xterm", "/bin/bash",
    ]  # fmt: skip


def _pump(stream, sink: LineSink, collected: list[str]) -> None:  # noqa: ANN001 - a binary pipe
    for raw in iter(stream.readline, b""):
        text = raw.decode(errors="replace")
        collected.append(text)
        sink.write(text)
    sink.close()
    stream.close()


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def _bounding_set(pid: int) -> str:
    """The process's capability bounding set as setpriv's list (+chown,+kill,…)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            mask = int(line.split()[1], 16)
            return ",".join(f"+{name}" for bit, name in enumerate(CAPABILITIES) if mask & (1 << bit))
    raise CloudError(f"process {pid} has no capability bounding set")


# ------------------------------------------------------------------------------------------- waiting


def leader_of(nspawn_pid: int) -> int | None:
    """The container's init (its pid 1, seen from here): nspawn's child whose own pid namespace numbers it 1."""
    try:
        children = Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith("NSpid:") and line.split()[-1] == "1":
                    return int(child)
    return None


def wait_running(
    nspawn_pid: int, name: str, console: Path, timeout: float, log: Callable[[str], None]
) -> ContainerSession:
    """A session once the container's systemd says the system is up (running, or degraded: failed units are
    listed; a container cannot start everything a VM does, e.g. remounting its root)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not qemu.process_alive(nspawn_pid):
            raise CloudError(f"the container {name} exited while booting; its console:\n{_tail(console)}")
        leader = leader_of(nspawn_pid)
        if leader is not None:
            session = ContainerSession(leader, name)
            remaining = max(1.0, deadline - time.monotonic())
            state = session.run("systemctl is-system-running --wait", check=False, timeout=remaining,
                                label="systemctl is-system-running --wait").stdout.strip()  # fmt: skip
            if state in ("running", "degraded"):
                if state == "degraded":
                    failed = session.run("systemctl --failed --no-legend --plain | cut -d' ' -f1", check=False,
                                         timeout=30).stdout.split()  # fmt: skip
                    log(f"system degraded in the container: failed units {', '.join(failed) or '(none listed)'}")
                return session
            if state in ("stopping", "maintenance"):
                raise CloudError(f"the container {name} is {state} instead of booting; its console:\n{_tail(console)}")
        time.sleep(0.1)
    raise CloudError(f"the container {name} did not finish booting within {timeout:.0f}s; its console:\n"
                     f"{_tail(console)}")  # fmt: skip


def _tail(console: Path, lines: int = 30) -> str:
    try:
        text = console.read_text(errors="replace")
    except OSError:
        return "(no console output)"
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------------------------ stop and teardown


def stop(nspawn_pid: int | None, layout: Layout, *, powering_off: bool, timeout: float = STOP_GRACE) -> str:
    """Wait for the container's own power-off (when the build asked it from inside) or ask nspawn for an orderly
    shutdown, then kill whatever is left; the filesystem stays mounted. Returns how it stopped."""
    how = "already stopped"
    if nspawn_pid and _is_nspawn_of(nspawn_pid, layout):
        how = "powered itself off"
        if not (powering_off and qemu.wait_exit(nspawn_pid, min(15.0, timeout))):
            with contextlib.suppress(ProcessLookupError):
                os.kill(nspawn_pid, signal.SIGTERM)  # nspawn asks the container's systemd to power off
            how = "orderly shutdown" if qemu.wait_exit(nspawn_pid, timeout) else f"killed after {timeout:.0f}s"
    kill_processes(layout)  # slirp4netns, and anything a killed nspawn left
    return how


def trim(layout: Layout) -> str:
    """Discard the mounted filesystem's free blocks: they become holes in the working copy (nothing to zero)."""
    done = subprocess.run(["fstrim", "-v", str(layout.root)], capture_output=True, text=True, timeout=600)
    return (done.stdout or done.stderr).strip()


def release_disk(layout: Layout) -> None:
    """Unmount the root filesystem (and anything below it) and detach its loop devices."""
    for point in disk.mounts_under(layout.directory):
        disk.unmount(point)
    for device in disk.loops_of(layout.disk):
        disk.detach_loop(device)
    # A device still held by another container's copy of this host's mounts (a container started while this one
    # ran: nspawn moves its root over the host's mounts rather than unmounting them) is only marked to go: the
    # kernel detaches it when that container ends. Wait only for this container's own namespace to finish going.
    deadline = time.monotonic() + 2
    while (left := disk.loops_of(layout.disk)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for device in left:
        if not disk.detaches_itself(device):
            raise CloudError(f"loop device {device} of {layout.disk} is still in use")
        log.info("loop device %s of %s detaches itself once the containers that hold it end", device, layout.disk)


def teardown(layout: Layout) -> None:
    """Everything of one container, newest first: processes, mounts, loop devices, network, and the directory
    nspawn leaves under /run; the instance directory itself is the caller's. Whatever is gone already is
    skipped, and one part that cannot be released does not keep the others."""
    errors = []
    for release in (kill_processes, release_disk, delete_network, _remove_propagation_dir):
        try:
            release(layout)
        except CloudError as exc:
            errors.append(str(exc))
    if errors:
        raise CloudError("; ".join(errors))


def _remove_propagation_dir(layout: Layout) -> None:
    # nspawn makes /run/systemd/nspawn/propagate/<machine> for each container and cannot remove it itself here.
    for leftover in PROPAGATE_DIR.glob(f"kiln-*-{layout.directory.name.removeprefix('i-')}"):
        with contextlib.suppress(OSError):
            leftover.rmdir()


def delete_network(layout: Layout) -> None:
    if layout.netns_path.exists():
        disk.run(["ip", "netns", "delete", layout.netns], check=False)


def processes(layout: Layout) -> list[int]:
    """Our processes of this container: nspawn and slirp4netns by their command lines, and every process whose
    root is on the container's loop device (what a killed nspawn leaves running, in its own mount namespace)."""
    markers = (str(layout.directory).encode(), str(layout.netns_path).encode())  # nspawn's; slirp4netns's
    devices = set()
    for loop in disk.loops_of(layout.disk):
        with contextlib.suppress(OSError):
            devices.add(os.stat(loop).st_rdev)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            tool = os.path.basename(args[0].decode(errors="replace")) if args else ""
            ours = tool in (NSPAWN, SLIRP) and any(marker in arg for arg in args for marker in markers)
            if ours or (devices and os.stat(entry / "root").st_dev in devices):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_processes(layout: Layout) -> None:
    """SIGKILL the container's processes (its init first: that ends its whole pid namespace), then nspawn's."""
    for pid in processes(layout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in processes(layout):
        if not qemu.wait_exit(pid, 10):
            raise CloudError(f"process {pid} of container {layout.directory.name} survived SIGKILL")


def _is_nspawn_of(pid: int, layout: Layout) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (
        bool(args)
        and os.path.basename(args[0].decode(errors="replace")) == NSPAWN
        and any(str(layout.root).encode() in arg for arg in args)
    )
