"""Bootstrap bases: a Debian disk built from Debian's packages with mmdebstrap, bootable from its own disk.

The disk is what a cloud expects of an appliance: a dos label with one bootable ext4 partition at 1 MiB
(no /boot, no swap, no LVM), extlinux in that partition and syslinux's mbr.bin in the first 440 bytes,
cloud-init with the NoCloud datasource, no SSH host keys and no credentials. Built as root (one loop
mount, for extlinux), converted to a compressed qcow2, and cached by a digest of its inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from clouds import qemu
from clouds.base import CloudError
from clouds.fetch import file_lock
from core.digests import sha256_file

log = logging.getLogger(__name__)

# Bump when the build below changes in a way the inputs digest cannot see (the texts written into
# the image are hashed already).
BOOTSTRAP_VERSION = "2"
DEFAULT_MIRROR = os.environ.get("KILN_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITES = {"debian-bookworm": "bookworm"}
BASE_PACKAGES = (
    "linux-image-cloud-amd64",
    "systemd-sysv",
    "systemd-resolved",
    "udev",
    "openssh-server",
    "cloud-init",
    "cloud-guest-utils",  # growpart: the root partition grows to a larger disk at first boot
    "e2fsprogs",
    "sudo",
    "lz4",  # the initramfs compressor (see INITRAMFS_CONF); without it mkinitramfs falls back to gzip
)
DISK_SIZE = 2 * 1024**3  # virtual size; the qcow2 holds only what is written, and launch can grow it
PARTITION_OFFSET = 1024**2
MBR_BIN = Path("/usr/lib/syslinux/mbr/mbr.bin")
# Timers (and a boot-time e2scrub for LVM snapshots we never have) that wake up during a build and slow
# the boot or churn the disk for nothing.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
)

# The initramfs holds only the drivers a cloud's root disk needs instead of most of the kernel's (Debian's
# MODULES=most: 52 MiB unpacked, 15 MiB gzip), and lz4 unpacks several times faster than gzip: the firmware
# reads a third of the bytes and the kernel unpacks them in a fraction of the time (seconds under TCG).
# FSTYPE: the image is made before its /etc/fstab, from which mkinitramfs would otherwise learn that the root
# is ext4; without it the initramfs carries no e2fsck and the root is checked by a systemd service instead.
# The drivers: virtio (QEMU/KVM, OpenStack), Xen (older EC2), Hyper-V, IDE/SCSI/CD; NVMe (EC2 Nitro) and
# ext4 are built into the cloud kernel (which has no AHCI driver at all).
INITRAMFS_CONF = """\
# kiln: a small initramfs (the root disk drivers of hooks/kiln-root-disks), quick to unpack, that checks the
# ext4 root itself (so systemd-fsck-root does not, later, on the boot's critical path)
MODULES=list
COMPRESS=lz4
FSTYPE=ext4
"""
INITRAMFS_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "sr_mod",
    "ata_piix",
    "ata_generic",
    "xen_blkfront",
    "hv_storvsc",
)
INITRAMFS_HOOK = f"""\
#!/bin/sh
# kiln: the drivers of a cloud's root disk (udev loads the one the machine has)
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
manual_add_modules {" ".join(INITRAMFS_MODULES)}
"""

CLOUD_CFG = """\
# kiln: boot fast and predictably on any cloud (written by kiln's bootstrap)
# NoCloud first (the local cloud's seed), then what OpenStack and EC2 serve: ds-identify enables only the ones
# the machine shows, so a local boot probes nothing more and a published image still finds its metadata.
datasource_list: [NoCloud, ConfigDrive, OpenStack, Ec2, None]
ssh_genkeytypes: [ed25519]
ssh_deletekeys: true
manage_etc_hosts: true
locale: C.UTF-8
grub_dpkg: {enabled: false}
# The image carries its own DHCP configuration for every Ethernet link (systemd-networkd).
network: {config: disabled}
"""
NETWORK = """\
[Match]
Name=en* eth*

[Network]
DHCP=yes
"""
# A small image carries no manuals, translations or documentation but the copyright files; mmdebstrap
# keeps these in the image (/etc/dpkg/dpkg.cfg.d/99mmdebstrap), so packages added later follow suit.
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)
# Online as soon as any link is (not all of them), and give up after a minute: a guest whose NIC has no
# driver in the cloud kernel (say, qemu's default e1000) must still boot, without a two-minute stall.
WAIT_ONLINE = """\
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=60
"""
HOSTS = """\
127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
ff02::1\tip6-allnodes
ff02::2\tip6-allrouters
"""


@dataclass(frozen=True)
class BootstrapResult:
    path: Path
    sha256: str
    size: int
    inputs_digest: str
    inputs: dict[str, object]


def inputs_for(flavour: str, packages: list[str] | None, mirror: str = DEFAULT_MIRROR) -> dict[str, object]:
    """Everything that decides the bootstrap's content; its digest names the cached disk."""
    if flavour not in SUITES:
        raise CloudError(f"base.bootstrap: {flavour!r} is not a known bootstrap (known: {', '.join(SUITES)})")
    extra = sorted({p.strip() for p in packages or [] if p.strip()})
    return {
        "flavour": flavour,
        "suite": SUITES[flavour],
        "mirror": mirror,
        "packages": sorted(set(BASE_PACKAGES) | set(extra)),
        "version": BOOTSTRAP_VERSION,
        "files": hashlib.sha256(
            "\n".join([CLOUD_CFG, NETWORK, WAIT_ONLINE, HOSTS, INITRAMFS_CONF, INITRAMFS_HOOK, *DPKG_EXCLUDES]).encode()
        ).hexdigest(),
        "masked": list(MASKED_UNITS),
        "disk_size": DISK_SIZE,
    }


def stable_id(flavour: str, disk_sha256: str) -> str:
    """The base's name on every host: its bootstrap and its disk's digest (the cache path is one host's)."""
    return f"base:{flavour}@sha256:{disk_sha256}"


def digest_of(inputs: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def bootstrap_base(
    flavour: str, packages: list[str] | None, cache_root: Path, mirror: str = DEFAULT_MIRROR
) -> BootstrapResult:
    """The cached bootstrap disk for these inputs, building it first when it is not there yet."""
    inputs = inputs_for(flavour, packages, mirror)
    digest = digest_of(inputs)
    directory = cache_root / "bases" / "bootstrap"
    disk = directory / f"{digest}.qcow2"
    sidecar = directory / f"{digest}.json"
    cached = _read_cached(disk, sidecar)
    if cached:
        return cached
    with file_lock(directory / f"{digest}.lock"):
        cached = _read_cached(disk, sidecar)  # another process may have built it while we waited
        if cached:
            return cached
        require_root()
        started = time.monotonic()
        log.info("bootstrapping %s (%d packages) from %s", flavour, len(inputs["packages"]), mirror)
        for stale in directory.glob(f"build-{digest}-*"):  # left by a killed build: we hold the lock now
            _remove_build_dir(stale)
        with tempfile.TemporaryDirectory(prefix=f"build-{digest}-", dir=directory) as tmp:
            work = Path(tmp)
            rootfs = work / "rootfs"
            build_rootfs(rootfs, str(inputs["suite"]), list(inputs["packages"]), mirror)
            raw = work / "disk.raw"
            assemble_disk(rootfs, raw, DISK_SIZE)
            part = work / "disk.qcow2"
            qemu.run([qemu.QEMU_IMG, "convert", "-O", "qcow2", "-c", str(raw), str(part)], what="qemu-img convert")
            sha = sha256_file(part)
            size = part.stat().st_size
            os.replace(part, disk)
        record = {"inputs": inputs, "sha256": sha, "size": size, "created": time.time()}
        tmp_sidecar = sidecar.with_suffix(".json.tmp")
        tmp_sidecar.write_text(json.dumps(record, indent=2))
        os.replace(tmp_sidecar, sidecar)
        log.info("bootstrapped %s in %.0fs: %s (%d bytes)", flavour, time.monotonic() - started, disk, size)
        return BootstrapResult(disk, sha, size, digest, inputs)


def _remove_build_dir(path: Path) -> None:
    """Remove a dead build's directory, unmounting whatever it left mounted inside first."""
    for line in Path("/proc/mounts").read_text().splitlines():
        target = line.split()[1]
        if target.startswith(f"{path}/"):
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)
    for raw in path.glob("*.raw"):
        attached = subprocess.run(["losetup", "-j", str(raw)], capture_output=True, text=True, check=False)
        for line in attached.stdout.splitlines():
            subprocess.run(["losetup", "-d", line.split(":")[0]], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


def _read_cached(disk: Path, sidecar: Path) -> BootstrapResult | None:
    if not (disk.exists() and sidecar.exists()):
        return None
    try:
        record = json.loads(sidecar.read_text())
        return BootstrapResult(disk, record["sha256"], record["size"], disk.stem, record["inputs"])
    except (OSError, ValueError, KeyError):
        return None


def build_rootfs(rootfs: Path, suite: str, packages: list[str], mirror: str) -> None:
    """mmdebstrap the root filesystem into a directory and configure it for a cloud."""
    security = mirror.rsplit("/debian", 1)[0] + "/debian-security" if mirror.endswith("/debian") else mirror
    sources = [
        f"deb {mirror} {suite} main",
        f"deb {mirror} {suite}-updates main",
        f"deb {security} {suite}-security main",
    ]
    initramfs = "$1/etc/initramfs-tools"
    customize = [
        'chroot "$1" systemctl enable systemd-networkd.service',
        'chroot "$1" systemctl mask ' + " ".join(MASKED_UNITS),
        f'printf %s {shlex.quote(INITRAMFS_CONF)} > "{initramfs}/conf.d/kiln.conf"',
        f'printf %s {shlex.quote(INITRAMFS_HOOK)} > "{initramfs}/hooks/kiln-root-disks"',
        f'chmod 0755 "{initramfs}/hooks/kiln-root-disks"',
        'chroot "$1" update-initramfs -u -k all',
    ]
    args = [
        "mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory",
        "--aptopt=Acquire::Languages \"none\"",
        "--include=" + ",".join(packages),
        *[f"--dpkgopt={option}" for option in DPKG_EXCLUDES],
        *[f"--customize-hook={hook}" for hook in customize],
        suite, str(rootfs), *sources,
    ]  # fmt: skip
    _run_logged(args, what="mmdebstrap", timeout=3600)
    configure_rootfs(rootfs)


def configure_rootfs(rootfs: Path) -> None:
    """What makes the tree a cloud appliance: cloud-init config, DHCP, no host keys, a clean identity."""
    (rootfs / "etc/cloud/cloud.cfg.d/90_kiln.cfg").write_text(CLOUD_CFG)
    network = rootfs / "etc/systemd/network"
    network.mkdir(parents=True, exist_ok=True)
    (network / "80-kiln-dhcp.network").write_text(NETWORK)
    drop_in = rootfs / "etc/systemd/system/systemd-networkd-wait-online.service.d"
    drop_in.mkdir(parents=True, exist_ok=True)
    (drop_in / "kiln.conf").write_text(WAIT_ONLINE)
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # cloud-init makes fresh ones on each instance's first boot
    (rootfs / "etc/hostname").write_text("localhost\n")
    (rootfs / "etc/hosts").write_text(HOSTS)
    (rootfs / "etc/machine-id").write_text("")  # systemd makes one per instance at first boot
    with contextlib.suppress(FileNotFoundError):
        (rootfs / "var/lib/dbus/machine-id").unlink()
    for leftover in ("var/cache/apt", "var/lib/apt/lists"):
        for item in (rootfs / leftover).glob("*.bin"):
            item.unlink()
    for log_file in (rootfs / "var/log").rglob("*"):
        if log_file.is_file():
            log_file.write_bytes(b"")


def assemble_disk(rootfs: Path, raw: Path, size: int) -> None:
    """A raw disk: dos label, one bootable ext4 partition at 1 MiB holding rootfs, extlinux, mbr.bin."""
    fs_size = size - PARTITION_OFFSET
    fs_uuid = str(uuid.uuid4())
    (rootfs / "etc/fstab").write_text(f"UUID={fs_uuid}\t/\text4\tdefaults,discard,errors=remount-ro\t0\t1\n")
    extlinux_dir = rootfs / "boot/extlinux"
    extlinux_dir.mkdir(parents=True, exist_ok=True)
    # /vmlinuz and /initrd.img are the symlinks Debian's kernel packages keep pointing at the newest
    # kernel, so a kernel upgrade during customize boots without touching this file.
    (extlinux_dir / "extlinux.conf").write_text(
        "DEFAULT debian\nPROMPT 0\nTIMEOUT 1\n\nLABEL debian\n  LINUX /vmlinuz\n  INITRD /initrd.img\n"
        f"  APPEND root=UUID={fs_uuid} ro console=ttyS0 quiet\n"
    )
    with open(raw, "wb") as handle:
        handle.truncate(size)
    layout = f"label: dos\nstart={PARTITION_OFFSET // 512}, type=83, bootable\n"
    _run_logged(["sfdisk", "--quiet", str(raw)], what="sfdisk", stdin=layout)
    _run_logged(
        [
            "mkfs.ext4", "-q", "-F", "-L", "root", "-U", fs_uuid, "-d", str(rootfs),
            "-E", f"offset={PARTITION_OFFSET}", str(raw), f"{fs_size // 1024}k",
        ],
        what="mkfs.ext4",
    )  # fmt: skip
    install_extlinux(raw, fs_size)
    with open(raw, "r+b") as handle:
        handle.write(MBR_BIN.read_bytes()[:440])


def install_extlinux(raw: Path, fs_size: int) -> None:
    """extlinux needs the filesystem mounted: loop the partition by offset, mount, install, undo."""
    loop = _run_logged(
        ["losetup", "--find", "--show", "--offset", str(PARTITION_OFFSET), "--sizelimit", str(fs_size), str(raw)],
        what="losetup",
    ).strip()
    try:
        mountpoint = raw.parent / "mnt"
        mountpoint.mkdir()
        _run_logged(["mount", "-t", "ext4", loop, str(mountpoint)], what="mount")
        try:
            _run_logged(["extlinux", "--install", f"{mountpoint}/boot/extlinux"], what="extlinux --install")
        finally:
            _run_logged(["umount", str(mountpoint)], what="umount")
            mountpoint.rmdir()
    finally:
        _run_logged(["losetup", "--detach", loop], what="losetup --detach")


def _run_logged(args: list[str], *, what: str, timeout: float = 600, stdin: str | None = None) -> str:
    """Run a root build step; its output goes to the debug log, and its tail into the error on failure."""
    log.debug("bootstrap: %s", " ".join(args))
    try:
        done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise CloudError(f"bootstrap needs {args[0]} (make setup installs it)") from exc
    except subprocess.TimeoutExpired as exc:
        raise CloudError(f"bootstrap: {what} did not finish within {timeout:.0f}s") from exc
    for line in (done.stdout + done.stderr).splitlines():
        log.debug("%s: %s", what, line)
    if done.returncode != 0:
        tail = "\n".join((done.stderr + done.stdout).strip().splitlines()[-20:])
        raise CloudError(f"bootstrap: {what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def require_root() -> None:
    if os.geteuid() != 0:
        raise CloudError("bootstrap bases are built as root (mmdebstrap --mode=root, a loop mount for extlinux)")
