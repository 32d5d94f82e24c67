"""Commands timed in a plain chroot on a working copy of a disk: the floor bench.packer holds kiln's container
customize to (the same commands, nothing booted, no session layer).

The working copy is a sparse raw conversion of the disk, its Linux filesystem loop-mounted by offset
(clouds/disk.py), with a tmpfs /run holding the resolv.conf the image's /etc/resolv.conf points to, and a
policy-rc.d that starts no service (as chroot builders do: there is no init to own it, and a daemon would
listen on this host's ports). Everything is undone on the way out, in reverse.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from clouds import disk

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POLICY_RC_D = "#!/bin/sh\n# bench: no service starts in a plain chroot\nexit 101\n"


@dataclass(frozen=True)
class ChrootRun:
    seconds: float
    output: str


def timed_in_chroot(base: Path, uploads: dict[str, Path], command: str, work: Path) -> ChrootRun:
    """Copy uploads (path in the image -> file here) into a working copy of base, then time
    `sh -c command` run as root in a chroot of it (own mount and pid namespaces, /proc mounted)."""
    with prepared_root(base, work) as root:
        for dest, source in uploads.items():
            shutil.copyfile(source, root / dest.lstrip("/"))
        argv = [
            "unshare", "--mount", "--pid", "--fork", f"--mount-proc={root}/proc", "chroot", str(root),
            "/usr/bin/env", "-i", f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8", "/bin/sh", "-c", command,
        ]  # fmt: skip
        started = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=1800)
        seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"chroot command failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return ChrootRun(seconds, done.stdout + done.stderr)


@contextmanager
def prepared_root(base: Path, work: Path) -> Iterator[Path]:
    """base's root filesystem, writable, on a sparse raw copy under work, ready for apt in a chroot."""
    work.mkdir(parents=True, exist_ok=True)
    with ExitStack() as undo:
        raw = work / "disk.raw"
        undo.callback(raw.unlink, missing_ok=True)
        # Always a copy: the base itself (the cache's) is never written, even when it is raw already.
        disk.run(["qemu-img", "convert", "-O", "raw", str(base), str(raw)], timeout=1800)
        loop = disk.attach_loop(raw, read_only=False)
        undo.callback(disk.detach_loop, loop)
        root = work / "root"
        disk.mount(loop, root, read_only=False)
        undo.callback(disk.unmount, str(root))
        disk.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(root / "run")])
        undo.callback(disk.unmount, str(root / "run"))
        write_resolv_conf(root)
        policy = root / "usr/sbin/policy-rc.d"
        if not policy.exists():
            policy.write_text(POLICY_RC_D)
            policy.chmod(0o755)
        yield root


def write_resolv_conf(root: Path) -> None:
    """This host's resolver for the chroot: at the /run path the image's /etc/resolv.conf links to (systemd-
    resolved's stub, on the fresh tmpfs), else over the image's own file (the working copy is thrown away)."""
    link = root / "etc/resolv.conf"
    inside = link
    if link.is_symlink():  # ../run/systemd/resolve/stub-resolv.conf or /run/...: taken from /etc, in the image
        inside = root / os.path.normpath(os.path.join("/etc", os.readlink(link))).lstrip("/")
    inside.parent.mkdir(parents=True, exist_ok=True)
    if inside.is_symlink():  # never follow a link out of the image
        inside.unlink()
    inside.write_text(Path("/etc/resolv.conf").read_text())
