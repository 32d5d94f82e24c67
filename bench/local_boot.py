"""Boot-to-SSH of the debian-bookworm bootstrap base on the local cloud (TCG by default), and the sizes of
the base and of a qcow2 snapshot of the booted guest. Run: python -m bench.local_boot [--accel auto]."""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import paramiko

from clouds import ssh
from clouds.base import KeyPair
from clouds.local import LocalCloud

TARGET_BOOT_SECONDS = 60
USER = "debian"


@dataclass(frozen=True)
class LocalBootFigures:
    accel: str
    first_login_seconds: float  # launch → the first SSH login with the build key (sshd up, user created)
    boot_to_ssh_seconds: float  # launch → what wait_boot waits for: host key pinned and cloud-init done
    guest_uptime_seconds: float  # the guest kernel's own uptime at that moment (the rest is firmware + loader)
    base_qcow2_bytes: int
    output_qcow2_bytes: int
    virtual_bytes: int


def user_data(key: KeyPair) -> str:
    return (
        "#cloud-config\nusers:\n"
        f"  - name: {USER}\n    sudo: 'ALL=(ALL) NOPASSWD:ALL'\n    shell: /bin/bash\n"
        f"    lock_passwd: true\n    ssh_authorized_keys: ['{key.public_key}']\n"
    )


def measure_local_boot(accel: str = "tcg", *, boot_timeout: float = 900) -> LocalBootFigures:
    """Boot the bootstrap base once (building it first if the cache lacks it), time it, snapshot it."""
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        cloud = LocalCloud(state_dir=Path(tmp) / "state", images_dir=Path(tmp) / "images", accel=accel)
        base = cloud.resolve_base(SimpleNamespace(kind="bootstrap", bootstrap="debian-bookworm", packages=None), USER)
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
            )
            boot_seconds = time.monotonic() - started
            with session:
                uptime = float(session.run("cut -d' ' -f1 /proc/uptime", sudo=False, timeout=60).stdout)
            cloud.stop(instance)
            image = cloud.snapshot(instance, "bench", {"kiln:role": "bench"}, ["qcow2"])
            output = image.files[0]
            figures = LocalBootFigures(
                accel=instance.details["accel"],
                first_login_seconds=round(first_login, 1),
                boot_to_ssh_seconds=round(boot_seconds, 1),
                guest_uptime_seconds=round(uptime, 1),
                base_qcow2_bytes=int(base.details["size"]),
                output_qcow2_bytes=output.size,
                virtual_bytes=int(image.details["virtual_size"]),
            )
            cloud.delete_image(image)
            return figures
        finally:
            cloud.terminate(instance)


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    figures = measure_local_boot(args.accel)
    mib = 1024**2
    print(f"accel                      {figures.accel}")
    print(f"boot to first SSH login    {figures.first_login_seconds:.1f} s (target <= {TARGET_BOOT_SECONDS} s)")
    print(
        f"boot to ready              {figures.boot_to_ssh_seconds:.1f} s (host key pinned from the console, "
        f"cloud-init done; guest uptime then {figures.guest_uptime_seconds:.1f} s)"
    )
    print(f"bootstrap base qcow2       {figures.base_qcow2_bytes / mib:.1f} MiB ({figures.base_qcow2_bytes} bytes)")
    print(f"output qcow2 after a boot  {figures.output_qcow2_bytes / mib:.1f} MiB ({figures.output_qcow2_bytes} bytes)")
    print(f"virtual disk size          {figures.virtual_bytes / mib:.0f} MiB")
    print(asdict(figures))


if __name__ == "__main__":
    main()
