"""What a repeatability audit compares: two package manifests, and every file of two disks mounted read-only.

A disk (qcow2 or any format qemu-img reads) is converted to a sparse raw file, its Linux partition found with
sfdisk (a bare filesystem is used whole), attached read-only through a loop device at the partition's offset
(partitions of a loop device get no device nodes here) and mounted `ro,noload` (ext4 replays no journal).
Every regular file and symlink is hashed; paths that legitimately differ between two builds of one commit
are left out (EXCLUDED, documented below).
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from clouds.disk import DiskError, linux_partition, mounted_read_only  # noqa: F401 - re-exported
from core.digests import sha256_file

# Paths (relative to the filesystem root, fnmatch patterns where * also crosses /) that differ between two
# builds of the same commit for reasons unrelated to the recipe:
EXCLUDED: tuple[tuple[str, str], ...] = (
    ("etc/machine-id", "per-machine identity, emptied by sanitize but regenerated on verify/boot"),
    ("var/lib/dbus/machine-id", "same identity, D-Bus copy"),
    ("etc/ssh/ssh_host_*", "host keys: generated per machine (sanitize removes them, first boot recreates)"),
    ("etc/hostname", "set by cloud-init from the instance's name"),
    ("var/log/*", "logs: timestamps, boot ids"),
    ("var/lib/cloud/*", "cloud-init state: instance id, user-data of the build"),
    ("var/lib/apt/lists/*", "package indexes fetched at build time: change whenever the mirror publishes"),
    ("var/cache/apt/*", "package cache (removed by sanitize when enabled)"),
    ("var/cache/debconf/*-old", "debconf's backups of its own databases"),
    ("var/cache/man/*", "man-db's index, rebuilt in the order pages arrive"),
    ("var/cache/ldconfig/aux-cache", "ldconfig's cache of file stamps"),
    ("var/lib/dpkg/*-old", "dpkg's backups of its databases, written at each run"),
    ("var/lib/systemd/random-seed", "entropy seed, saved at shutdown"),
    ("var/lib/systemd/credential.secret", "per-machine credential key"),
    ("var/lib/systemd/timers/*", "timestamps of timer units"),
    ("var/lib/systemd/timesync/*", "clock stamp of the last shutdown"),
    ("var/lib/systemd/catalog/database", "journal catalog, rebuilt with timestamps"),
    ("var/lib/dhcp/*", "DHCP leases (addresses, times)"),
    ("var/lib/private/*", "state of DynamicUser services"),
    ("var/lib/sudo/*", "sudo's lecture and timestamp records"),
    ("var/lib/ucf/cache/*", "ucf's copies of configuration files with timestamps"),
    ("var/backups/*", "daily backups of dpkg and passwd databases"),
    ("var/tmp/*", "temporary files"),
    ("tmp/*", "temporary files"),
    ("root/.bash_history", "shell history"),
    ("home/*/.bash_history", "shell history"),
    ("root/.cache/*", "per-user caches"),
    ("home/*/.cache/*", "per-user caches"),
    ("*/__pycache__/*", "Python bytecode: embeds source timestamps"),
    ("*.pyc", "Python bytecode: embeds source timestamps"),
    ("lost+found/*", "fsck's findings"),
    ("etc/.pwd.lock", "lock file"),
    ("etc/shadow-", "backups written by user tools (timestamps of password changes)"),
    ("etc/gshadow-", "backup written by group tools"),
    ("etc/passwd-", "backup written by user tools"),
    ("etc/group-", "backup written by group tools"),
    ("etc/subuid-", "backup written by user tools"),
    ("etc/subgid-", "backup written by group tools"),
)
EXCLUDED_PATTERNS = tuple(pattern for pattern, _why in EXCLUDED)
DIFF_LIST_CAP = 500  # paths kept per kind of difference in the record (counts are always complete)


def excluded(path: str, patterns: Iterable[str] = EXCLUDED_PATTERNS) -> bool:
    """Whether a root-relative path is one that legitimately differs between builds."""
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


# --------------------------------------------------------------------------------------------- packages


@dataclass(frozen=True)
class PackageDiff:
    added: list[str]  # "name version" present only in the rebuild
    removed: list[str]  # only in the original
    changed: list[str]  # "name: old -> new"

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def to_dict(self) -> dict[str, list[str]]:
        return {"added": self.added, "removed": self.removed, "changed": self.changed}


def compare_packages(original: Iterable[tuple[str, str, str]], rebuild: Iterable[tuple[str, str, str]]) -> PackageDiff:
    """Manifests of (name, version, arch): what the rebuild added, removed, or has at another version."""
    before = {(name, arch): version for name, version, arch in original}
    after = {(name, arch): version for name, version, arch in rebuild}

    def label(key: tuple[str, str]) -> str:
        return f"{key[0]}:{key[1]}" if key[1] else key[0]

    return PackageDiff(
        added=sorted(f"{label(k)} {after[k]}" for k in after.keys() - before.keys()),
        removed=sorted(f"{label(k)} {before[k]}" for k in before.keys() - after.keys()),
        changed=sorted(f"{label(k)}: {before[k]} -> {after[k]}" for k in before.keys() & after.keys()
                       if before[k] != after[k]),
    )


# ------------------------------------------------------------------------------------------------ files


@dataclass
class FileComparison:
    """Per-file sha256 of two disks: how many paths compared, how many identical, and the differences."""

    compared: int
    identical: int
    only_original: list[str] = field(default_factory=list)
    only_rebuild: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    excluded_count: int = 0

    @property
    def identity(self) -> float:
        """Percent of compared paths whose content is identical (100 when there is nothing to compare)."""
        return 100.0 * self.identical / self.compared if self.compared else 100.0

    def to_dict(self, cap: int = DIFF_LIST_CAP) -> dict:
        return {
            "compared": self.compared,
            "identical": self.identical,
            "identity": round(self.identity, 3),
            "excluded": self.excluded_count,
            "counts": {"only_original": len(self.only_original), "only_rebuild": len(self.only_rebuild),
                       "changed": len(self.changed)},
            "only_original": self.only_original[:cap],
            "only_rebuild": self.only_rebuild[:cap],
            "changed": self.changed[:cap],
        }


def compare_digests(original: dict[str, str], rebuild: dict[str, str]) -> FileComparison:
    """Compare two {path: sha256} maps over the union of their paths."""
    paths = original.keys() | rebuild.keys()
    result = FileComparison(compared=len(paths), identical=0)
    for path in sorted(paths):
        if path not in rebuild:
            result.only_original.append(path)
        elif path not in original:
            result.only_rebuild.append(path)
        elif original[path] != rebuild[path]:
            result.changed.append(path)
        else:
            result.identical += 1
    return result


def compare_disks(original: Path, rebuild: Path, patterns: Iterable[str] = EXCLUDED_PATTERNS) -> FileComparison:
    """Mount both disks read-only and compare every file's sha256, leaving out the excluded paths."""
    patterns = tuple(patterns)
    first, first_excluded = disk_digests(original, patterns)
    second, second_excluded = disk_digests(rebuild, patterns)
    result = compare_digests(first, second)
    result.excluded_count = len(first_excluded | second_excluded)
    return result


def disk_digests(disk: Path, patterns: Iterable[str] = EXCLUDED_PATTERNS) -> tuple[dict[str, str], set[str]]:
    """{root-relative path: sha256} of every regular file and symlink on the disk's Linux filesystem, and the
    set of paths left out by the patterns."""
    patterns = tuple(patterns)
    with mounted_read_only(disk) as root:
        return tree_digests(root, patterns)


def tree_digests(root: Path, patterns: Iterable[str] = EXCLUDED_PATTERNS) -> tuple[dict[str, str], set[str]]:
    """Digests of a directory tree: files by content, symlinks by target (never followed), others skipped."""
    patterns = tuple(patterns)
    digests: dict[str, str] = {}
    left_out: set[str] = set()
    for directory, _subdirs, names in os.walk(root):
        for name in names:
            full = os.path.join(directory, name)
            relative = os.path.relpath(full, root)
            if excluded(relative, patterns):
                left_out.add(relative)
                continue
            info = os.lstat(full)
            if stat.S_ISLNK(info.st_mode):
                digests[relative] = "symlink:" + os.readlink(full)
            elif stat.S_ISREG(info.st_mode):
                digests[relative] = sha256_file(full)
    return digests, left_out
