"""The audit's comparison on disks the tests make (mkfs.ext4 -d): per-file sha256 of two disks mounted read-only,
with and without a partition table, qcow2 or raw, excluded paths left out, package manifests compared."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from operations.audit import (
    EXCLUDED,
    DiskError,
    compare_digests,
    compare_disks,
    compare_packages,
    disk_digests,
    excluded,
    linux_partition,
)

COMMON = {f"usr/share/doc/pkg{i}/copyright": f"licence {i}\n" for i in range(96)}


def make_disk(tmp_path: Path, name: str, files: dict[str, str], *, partitioned: bool = False,
              symlinks: dict[str, str] | None = None, qcow2: bool = False) -> Path:
    """An ext4 disk holding `files`: bare, or inside a dos partition at 1 MiB like kiln's bootstrap bases."""
    root = tmp_path / f"{name}-root"
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for relative, target in (symlinks or {}).items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, root / relative)
    raw = tmp_path / f"{name}.raw"
    if partitioned:
        subprocess.run(["truncate", "-s", "40M", str(raw)], check=True)
        subprocess.run(["sfdisk", "-q", str(raw)], input="label: dos\nstart=2048, type=83, bootable\n", text=True,
                       check=True)
        subprocess.run(["mkfs.ext4", "-F", "-q", "-E", "offset=1048576", "-d", str(root), str(raw), "30M"],
                       check=True)
    else:
        subprocess.run(["mkfs.ext4", "-F", "-q", "-d", str(root), str(raw), "16M"], check=True)
    if not qcow2:
        return raw
    converted = tmp_path / f"{name}.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", "-c", str(raw), str(converted)], check=True)
    raw.unlink()
    return converted


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _loops_of(path: Path) -> str:
    return subprocess.run(["losetup", "-j", str(path)], capture_output=True, text=True).stdout


def test_the_same_files_on_a_partitioned_qcow2_and_a_bare_raw_disk_are_100_percent_identical(tmp_path) -> None:
    files = {**COMMON, "etc/kiln-hello": "hello from kiln\n"}
    original = make_disk(tmp_path, "original", files, partitioned=True, qcow2=True,
                         symlinks={"etc/alternatives/editor": "/usr/bin/vim.tiny"})
    rebuild = make_disk(tmp_path, "rebuild", files, symlinks={"etc/alternatives/editor": "/usr/bin/vim.tiny"})

    result = compare_disks(original, rebuild)

    assert (result.compared, result.identical, result.identity) == (98, 98, 100.0)
    assert result.changed == result.only_original == result.only_rebuild == []


def test_changed_added_and_removed_files_are_listed_and_legitimate_differences_left_out(tmp_path) -> None:
    original = make_disk(tmp_path, "original", {
        **COMMON, "usr/bin/tool": "v1\n", "etc/only-old": "x\n", "etc/machine-id": "aaaa\n",
        "etc/ssh/ssh_host_ed25519_key.pub": "ssh-ed25519 AAAA one\n", "var/log/syslog": "boot 1\n",
        "usr/lib/python3/dist-packages/m/__pycache__/m.cpython-311.pyc": "stamp 1",
    }, symlinks={"etc/alternatives/editor": "/usr/bin/vim.tiny"}, partitioned=True)
    rebuild = make_disk(tmp_path, "rebuild", {
        **COMMON, "usr/bin/tool": "v2\n", "etc/only-new": "y\n", "etc/machine-id": "bbbb\n",
        "etc/ssh/ssh_host_ed25519_key.pub": "ssh-ed25519 BBBB two\n", "var/log/syslog": "boot 2\n",
        "usr/lib/python3/dist-packages/m/__pycache__/m.cpython-311.pyc": "stamp 2",
    }, symlinks={"etc/alternatives/editor": "/usr/bin/nano"})

    result = compare_disks(original, rebuild)

    assert result.changed == ["etc/alternatives/editor", "usr/bin/tool"]
    assert (result.only_original, result.only_rebuild) == (["etc/only-old"], ["etc/only-new"])
    assert (result.compared, result.identical) == (100, 96)
    assert result.identity == pytest.approx(96.0)
    assert result.excluded_count == 4  # machine-id, the host key, the log, the bytecode
    data = result.to_dict()
    assert data["counts"] == {"only_original": 1, "only_rebuild": 1, "changed": 2} and data["identity"] == 96.0


def test_disks_are_mounted_read_only_and_every_loop_device_and_mount_is_released(tmp_path) -> None:
    disk = make_disk(tmp_path, "disk", {"etc/kiln-hello": "hello\n"}, partitioned=True)
    before = _sha256(disk)

    digests, _ = disk_digests(disk)

    assert digests == {"etc/kiln-hello": hashlib.sha256(b"hello\n").hexdigest()}
    assert _sha256(disk) == before, "a read-only mount must not write to the disk (no journal replay)"
    assert _loops_of(disk) == ""
    mounts = Path("/proc/mounts").read_text()
    assert "kiln-audit-" not in mounts


def test_a_bare_filesystem_is_read_whole_and_a_disk_without_linux_partition_is_refused(tmp_path) -> None:
    bare = make_disk(tmp_path, "bare", {"a": "1"})
    assert linux_partition(bare) == (0, None)
    swap_only = tmp_path / "swap.raw"
    subprocess.run(["truncate", "-s", "8M", str(swap_only)], check=True)
    subprocess.run(["sfdisk", "-q", str(swap_only)], input="label: dos\nstart=2048, type=82\n", text=True, check=True)
    with pytest.raises(DiskError, match="no Linux partition"):
        disk_digests(swap_only)
    with pytest.raises(DiskError, match="does not exist"):
        disk_digests(tmp_path / "missing.qcow2")


def test_every_exclusion_is_documented_and_matches_below_its_directory() -> None:
    assert all(pattern and why for pattern, why in EXCLUDED)
    assert excluded("var/log/journal/abc/system.journal")
    assert excluded("etc/ssh/ssh_host_rsa_key")
    assert excluded("usr/lib/python3/dist-packages/yaml/__pycache__/x.pyc")
    assert not excluded("etc/ssh/sshd_config")
    assert not excluded("etc/kiln-hello")
    assert not excluded("var/lib/dpkg/status")


def test_digest_maps_compare_over_the_union_of_their_paths() -> None:
    result = compare_digests({"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "9", "d": "4"})
    assert (result.compared, result.identical, result.changed, result.only_original, result.only_rebuild) == (
        4, 1, ["b"], ["c"], ["d"])
    assert compare_digests({}, {}).identity == 100.0


def test_package_manifests_report_added_removed_and_changed_versions() -> None:
    original = [("bash", "5.2.15-2", "amd64"), ("curl", "7.88.1-10", "amd64"), ("tzdata", "2024a-0", "all")]
    rebuild = [("bash", "5.2.15-2", "amd64"), ("curl", "7.88.1-10+deb12u5", "amd64"), ("jq", "1.6-2.1", "amd64")]

    diff = compare_packages(original, rebuild)

    assert diff.added == ["jq:amd64 1.6-2.1"]
    assert diff.removed == ["tzdata:all 2024a-0"]
    assert diff.changed == ["curl:amd64: 7.88.1-10 -> 7.88.1-10+deb12u5"]
    assert not diff.identical and compare_packages(original, original).identical
