"""Boot-to-SSH of the debian-bookworm bootstrap base on the local cloud (TCG by default), and the sizes of
the base and of a qcow2 snapshot of the booted guest. Run: python -m bench.local_boot [--accel auto] [--analyze]
(--analyze also prints systemd-analyze and cloud-init analyze from inside the guest: where the boot goes)."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import paramiko

from clouds import ssh
from clouds.base import KeyPair
from clouds.local import LocalCloud
from core.digests import sha256_file

TARGET_BOOT_SECONDS = 60
USER = "debian"


@dataclass(frozen=True)
class LocalBootFigures:
    accel: str
    first_login_seconds: float  # launch → the first SSH login with the build key (sshd up, user created)
    boot_to_ssh_seconds: float  # launch → what wait_boot waits for: host key pinned and cloud-init done
    guest_uptime_seconds: float  # the guest kernel's own uptime at that moment (the rest is firmware + loader)
    cloud_init_done_uptime_seconds: float  # guest uptime when cloud-init wrote result.json (its final stage ended)
    qemu_cpu_seconds: float  # CPU time QEMU used until ready: the boot's work, less sensitive to a busy host
    base_qcow2_bytes: int
    output_qcow2_bytes: int
    virtual_bytes: int


def user_data(key: KeyPair) -> str:
    return (
        "#cloud-config\nusers:\n"
        f"  - name: {USER}\n    sudo: 'ALL=(ALL) NOPASSWD:ALL'\n    shell: /bin/bash\n"
        f"    lock_passwd: true\n    ssh_authorized_keys: ['{key.public_key}']\n"
    )


# Where a boot's time goes, read inside the guest once it is ready (printed by --analyze).
ANALYZE_COMMANDS = (
    "systemd-analyze time",
    "systemd-analyze blame | head -25",
    "systemd-analyze critical-chain",
    "cloud-init analyze show",
    "cloud-init analyze blame | head -25",
    "ls -l /boot/initrd.img* /boot/vmlinuz*",
    "cat /proc/cmdline",
    "grep -m2 -E 'vendor_id|model name' /proc/cpuinfo",
    "cat /sys/devices/system/clocksource/clocksource0/current_clocksource",
    "grep . /sys/devices/system/cpu/vulnerabilities/*",
)


def measure_local_boot(
    accel: str = "tcg",
    *,
    boot_timeout: float = 900,
    analyze: list[str] | None = None,
    base_file: Path | None = None,
    cpus: int = 2,
    snapshot: bool = True,
) -> LocalBootFigures:
    """Boot the bootstrap base (or base_file, a disk to compare with it) once, time it, snapshot it.

    When analyze is a list, the output of ANALYZE_COMMANDS (and the console log) is appended to it."""
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        cloud = LocalCloud(state_dir=Path(tmp) / "state", images_dir=Path(tmp) / "images", accel=accel, cpus=cpus)
        if base_file is None:
            spec = SimpleNamespace(kind="bootstrap", bootstrap="debian-bookworm", packages=None)
        else:
            spec = SimpleNamespace(kind="file", file=str(base_file), sha256=sha256_file(base_file))
        base = cloud.resolve_base(spec, USER)
        key = KeyPair.generate("kiln-bench")
        started = time.monotonic()
        instance = cloud.launch(base, key, user_data(key), {"kiln:role": "bench"}, [])
        try:
            first_login = _first_login(cloud.endpoint(instance, 22), key, started + boot_timeout) - started
            session = ssh.wait_for_ssh(
                *cloud.endpoint(instance, 22),
                USER,
                key,
                expected_host_keys_from=lambda: ssh.host_key_fingerprints_from_console(cloud.console(instance)),
                console=lambda: cloud.console(instance),
                timeout=max(1.0, started + boot_timeout - time.monotonic()),
                console_poll_seconds=cloud.console_poll_seconds,
            )
            boot_seconds = time.monotonic() - started
            cpu_seconds = _cpu_seconds(int(instance.details["pid"]))
            with session:
                uptime = float(session.run("cut -d' ' -f1 /proc/uptime", sudo=False, timeout=60).stdout)
                cloud_init_done = _cloud_init_done_uptime(session)
                if analyze is not None:
                    for command in ANALYZE_COMMANDS:
                        result = session.run(command, timeout=300, check=False)
                        analyze.append(f"$ {command}\n{result.stdout}{result.stderr}")
                    analyze.append("console log:\n" + cloud.console(instance))
            output_bytes = virtual_bytes = 0
            if snapshot:
                cloud.stop(instance)
                image = cloud.snapshot(instance, "bench", {"kiln:role": "bench"}, ["qcow2"])
                output_bytes, virtual_bytes = image.files[0].size, int(image.details["virtual_size"])
                cloud.delete_image(image)
            figures = LocalBootFigures(
                accel=instance.details["accel"],
                first_login_seconds=round(first_login, 1),
                boot_to_ssh_seconds=round(boot_seconds, 1),
                guest_uptime_seconds=round(uptime, 1),
                cloud_init_done_uptime_seconds=round(cloud_init_done, 1),
                qemu_cpu_seconds=round(cpu_seconds, 1),
                base_qcow2_bytes=int(base.details["size"]),
                output_qcow2_bytes=output_bytes,
                virtual_bytes=virtual_bytes,
            )
            return figures
        finally:
            cloud.terminate(instance)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cloud_init_done_uptime(session: ssh.GuestSession) -> float:
    """The guest's uptime when cloud-init's final stage wrote result.json (from the file's mtime)."""
    script = (
        f"now=$(date +%s.%N); done=$(stat -c %.9Y {ssh.CLOUD_INIT_RESULT}); up=$(cut -d' ' -f1 /proc/uptime); "
        'awk -v u="$up" -v n="$now" -v d="$done" \'BEGIN { printf "%.2f\\n", u - (n - d) }\''
    )
    return float(session.run(script, sudo=False, timeout=60).stdout.strip())


def _first_login(endpoint: tuple[str, int], key: KeyPair, deadline: float) -> float:
    """When SSH first lets the build key in (host key not checked: this only times the boot)."""
    while time.monotonic() < deadline:
        try:
            ssh.connect(*endpoint, USER, key, expected_host_keys=None, timeout=10).close()
            return time.monotonic()
        except (OSError, EOFError, paramiko.SSHException):
            time.sleep(0.5)
    raise TimeoutError("no SSH login before the boot timeout")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.local_boot", description=__doc__)
    parser.add_argument("--accel", choices=("tcg", "kvm", "auto"), default="tcg")
    parser.add_argument("--analyze", action="store_true", help="print systemd-analyze/cloud-init analyze output")
    parser.add_argument("--base", type=Path, help="boot this disk instead of the bootstrap base (to compare)")
    parser.add_argument("--cpus", type=int, default=2, help="guest vCPUs (the local cloud's default is 2)")
    parser.add_argument("--no-snapshot", action="store_true", help="only time the boot (no stop, no snapshot)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)  # refused logins while the guest boots are expected
    analysis: list[str] | None = [] if args.analyze else None
    figures = measure_local_boot(
        args.accel, analyze=analysis, base_file=args.base, cpus=args.cpus, snapshot=not args.no_snapshot
    )
    for block in analysis or []:
        print(block)
    mib = 1024**2
    print(f"accel                      {figures.accel}")
    print(f"boot to first SSH login    {figures.first_login_seconds:.1f} s (target <= {TARGET_BOOT_SECONDS} s)")
    print(
        f"boot to ready              {figures.boot_to_ssh_seconds:.1f} s (host key pinned from the console, "
        f"cloud-init done; guest uptime then {figures.guest_uptime_seconds:.1f} s)"
    )
    print(f"cloud-init done at uptime   {figures.cloud_init_done_uptime_seconds:.1f} s (result.json written)")
    print(f"QEMU CPU time until ready  {figures.qemu_cpu_seconds:.1f} s (both vCPUs and QEMU's own threads)")
    print(f"bootstrap base qcow2       {figures.base_qcow2_bytes / mib:.1f} MiB ({figures.base_qcow2_bytes} bytes)")
    print(f"output qcow2 after a boot  {figures.output_qcow2_bytes / mib:.1f} MiB ({figures.output_qcow2_bytes} bytes)")
    print(f"virtual disk size          {figures.virtual_bytes / mib:.0f} MiB")
    print(asdict(figures))


if __name__ == "__main__":
    main()
