"""A disk image's Linux filesystem on this host: found with sfdisk, attached through a loop device at the
partition's offset (partitions of a loop device get no device nodes here), mounted; and the loop devices and
mounts a directory still holds, for cleanup after a crash.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from clouds.base import CloudError

LINUX_PARTITION_TYPES = {"83", "8300", "0fc63daf-8483-4772-8e79-3d69d8477de4"}


class DiskError(CloudError):
    """A disk could not be opened (unreadable, no Linux filesystem, mount refused)."""


def run(argv: list[str], *, check: bool = True, timeout: float = 300) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise DiskError(f"{argv[0]} is not installed (make setup installs it)") from exc
    if check and result.returncode != 0:
        raise DiskError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def linux_partition(raw: Path) -> tuple[int, int | None]:
    """(byte offset, byte size) of the disk's Linux filesystem: the largest Linux partition of a dos or GPT
    label, or (0, None) for a bare filesystem without a partition table."""
    listing = subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True)
    if listing.returncode != 0:
        return 0, None
    table = json.loads(listing.stdout).get("partitiontable", {})
    sector = int(table.get("sectorsize", 512))
    partitions = [p for p in table.get("partitions", []) if str(p.get("type", "")).lower() in LINUX_PARTITION_TYPES]
    if not partitions:
        raise DiskError(f"disk {raw} has a partition table but no Linux partition")
    largest = max(partitions, key=lambda p: int(p["size"]))
    return int(largest["start"]) * sector, int(largest["size"]) * sector


def grow_linux_partition(raw: Path) -> bool:
    """Grow the disk's Linux partition over the free space after it (a raw disk just made larger); False when
    it is not the last partition or the disk has no partition table (a bare filesystem takes the whole file)."""
    listing = subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True)
    if listing.returncode != 0:
        return False
    partitions = json.loads(listing.stdout).get("partitiontable", {}).get("partitions", [])
    linux = [p for p in partitions if str(p.get("type", "")).lower() in LINUX_PARTITION_TYPES]
    if not linux:
        return False
    largest = max(linux, key=lambda p: int(p["size"]))
    if int(largest["start"]) < max(int(p["start"]) for p in partitions):
        return False
    number = re.search(r"(\d+)$", str(largest.get("node", ""))).group(1)  # disk.raw1 -> 1
    done = subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", "-N", number, str(raw)],
                          input=", +\n", capture_output=True, text=True, timeout=60)  # fmt: skip
    if done.returncode != 0:
        raise DiskError(f"could not grow the Linux partition of {raw}: {done.stderr.strip()}")
    return True


def as_raw(disk: Path, raw: Path) -> Path:
    """The disk itself when it is raw already, else a sparse raw conversion at `raw`."""
    info = json.loads(run(["qemu-img", "info", "--output=json", "-U", str(disk)]))
    if info.get("format") == "raw":
        return disk
    run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], timeout=1800)
    return raw


def attach_loop(raw: Path, *, read_only: bool) -> str:
    """A loop device on the disk's Linux filesystem; returns its path."""
    offset, size = linux_partition(raw)
    return run([
        "losetup", "--find", "--show", *(["--read-only"] if read_only else []), "--offset", str(offset),
        *(["--sizelimit", str(size)] if size else []), str(raw),
    ]).strip()  # fmt: skip


def mount(device: str, mountpoint: Path, *, read_only: bool) -> None:
    fstype = run(["blkid", "-o", "value", "-s", "TYPE", device], check=False).strip()
    # noload: a read-only ext4 replays no journal (the disk is not written at all)
    options = ("ro,noload" if fstype in ("ext3", "ext4") else "ro") if read_only else "rw"
    mountpoint.mkdir(parents=True, exist_ok=True)
    run(["mount", "-o", options, device, str(mountpoint)])


@contextmanager
def mounted_read_only(disk: Path) -> Iterator[Path]:
    """The disk's Linux filesystem mounted read-only on a temporary directory; everything undone on exit."""
    disk = Path(disk)
    if not disk.is_file():
        raise DiskError(f"disk {disk} does not exist")
    with ExitStack() as undo:
        work = Path(tempfile.mkdtemp(prefix="kiln-audit-"))
        undo.callback(shutil.rmtree, work, True)
        raw = as_raw(disk, work / "disk.raw")
        loop = attach_loop(raw, read_only=True)
        undo.callback(run, ["losetup", "--detach", loop], check=False)
        mountpoint = work / "root"
        mount(loop, mountpoint, read_only=True)
        undo.callback(run, ["umount", str(mountpoint)], check=False)
        yield mountpoint


def loops_of(backing_file: Path) -> list[str]:
    """Loop devices attached to a file (found by the kernel's record of their backing file)."""
    listing = run(["losetup", "--json", "--list", "--output", "NAME,BACK-FILE"], check=False)
    if not listing.strip():
        return []
    wanted = os.path.realpath(backing_file)
    return [
        device["name"]
        for device in json.loads(listing).get("loopdevices", [])
        if (device.get("back-file") or "").removesuffix(" (deleted)") == wanted
    ]


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below a directory, deepest first (the order to unmount them in)."""
    prefix = os.path.realpath(directory)
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].encode().decode("unicode_escape")  # \040 and friends
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def unmount(mountpoint: str) -> None:
    """Unmount; a busy mount is detached lazily (it goes once the last process using it ends)."""
    run(["umount", mountpoint], check=False, timeout=120)
    if _is_mounted(mountpoint):
        run(["umount", "--lazy", mountpoint], check=False, timeout=120)
    if _is_mounted(mountpoint):
        raise DiskError(f"could not unmount {mountpoint}")


def detach_loop(device: str) -> None:
    run(["losetup", "--detach", device], check=False)


def _is_mounted(mountpoint: str) -> bool:
    return subprocess.run(["mountpoint", "-q", mountpoint], check=False).returncode == 0
