"""The local cloud: QEMU guests on this machine, qcow2/raw/vmdk/vdi/OVA images in kiln's images directory.

Every instance lives in one directory under the state directory (overlay, NoCloud seed, console log,
QMP socket, pid file, instance.json), so what a killed build leaves is found by looking there (owned).
Every image lives in one directory under the images directory with a meta.json holding its tags.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from clouds import bootstrap, container, disk, fetch, qemu
from clouds.base import (
    Backend,
    BaseImage,
    CloudError,
    ImageFile,
    ImageRef,
    Instance,
    KeyPair,
    Resource,
    StopResult,
)
from clouds.layers import Layer, LayerCache, Manifest, manifest
from clouds.ova import build_ova
from clouds.session import Session
from core import settings
from core.digests import sha256_file
from core.recipe import BaseSpec, LocalTarget, Timeouts

log = logging.getLogger(__name__)

FORMATS = ("qcow2", "raw", "vmdk", "vdi", "ova")
INSTANCE_ID = re.compile(r"^i-[0-9a-f]{12}$")
IMAGE_ID = re.compile(r"^img-[0-9a-f]{12}$")
INSTANCE_FILE = "instance.json"
IMAGE_FILE = "meta.json"
POWERDOWN_REPEAT = 15.0  # seconds: a guest still booting may miss the first ACPI event
# The snapshot's qcow2: zstd compresses ~6x faster than qcow2's default zlib and smaller, but only QEMU >= 5.1 reads
# it, so a target may ask for zlib; 256 KiB clusters give each compressed unit more context (smaller again) while a
# read still decompresses little.
QCOW2_COMPRESSIONS = ("zstd", "zlib")


def qcow2_output_options(compression: str = "zstd") -> tuple[str, ...]:
    if compression not in QCOW2_COMPRESSIONS:
        raise CloudError(f"qcow2_compression: {compression!r} is not one of {', '.join(QCOW2_COMPRESSIONS)}")
    return ("-c", "-o", f"compression_type={compression},cluster_size=256k", "-W", "-m", "8")
UNIX_PATH_MAX = 107
BUILD_IN = ("container", "vm")


class LocalCloud:
    """QEMU on this machine: overlays on cached bases, user networking on 127.0.0.1, images as files.

    With build_in "container" the build machine (role "build") is instead a container booted on a working copy of
    the base disk (clouds/container.py): customize runs at native speed, and verify still boots the image in QEMU.
    """

    name = "local"
    region = ""  # this host
    console_poll_seconds = 0.5  # the console is a local file: the boot wait may read it often

    def __init__(
        self,
        state_dir: Path | str | None = None,
        images_dir: Path | str | None = None,
        cache_dir: Path | str | None = None,
        accel: str = "auto",
        memory_mb: int = 2048,
        cpus: int = 2,
        disk_size_gb: int | None = None,
        qcow2_compression: str = "zstd",
        build_in: str = "vm",
    ) -> None:
        if accel not in ("auto", "kvm", "tcg"):
            raise CloudError(f"accel: {accel!r} is not one of auto, kvm, tcg")
        if build_in not in BUILD_IN:
            raise CloudError(f"build_in: {build_in!r} is not one of {', '.join(BUILD_IN)}")
        self.build_in = build_in
        self.qcow2_options = qcow2_output_options(qcow2_compression)
        self.state_dir = Path(state_dir) if state_dir else settings.state_dir()
        self.images_dir = Path(images_dir) if images_dir else settings.images_dir()
        self.cache_dir = Path(cache_dir) if cache_dir else settings.cache_dir()
        self.layers_dir = self.cache_dir / "layers" if cache_dir else settings.layers_dir()
        self.accel = accel
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.disk_size_gb = disk_size_gb
        for directory in (self.state_dir, self.images_dir, self.cache_dir):
            directory.mkdir(parents=True, exist_ok=True)

    # -- bases ---------------------------------------------------------------------------------------

    def resolve_base(self, spec: BaseSpec, ssh_user: str, *, base_dir: Path | str | None = None) -> BaseImage:
        """A disk file to start from: a cached file/URL download, a kiln local image (by id, or the newest
        whose name matches a pattern), or a bootstrap. A relative file is taken from base_dir (the recipe's
        directory), else from the working directory."""
        kind = _base_kind(spec)
        if kind == "file":
            sha = fetch.normalize_sha256(getattr(spec, "sha256", None), "base.sha256")
            source = Path(str(spec.file)).expanduser()
            if not source.is_absolute() and base_dir is not None:
                source = Path(base_dir) / source
            path = fetch.cache_file(source, sha, self.cache_dir)
            return self._cached_base(path, sha, ssh_user, name=source.name, origin={"file": str(source)})
        if kind == "url":
            sha = fetch.normalize_sha256(getattr(spec, "sha256", None), "base.sha256")
            path = fetch.download(str(spec.url), sha, self.cache_dir)
            name = str(spec.url).rstrip("/").rsplit("/", 1)[-1]
            return self._cached_base(path, sha, ssh_user, name=name, origin={"url": str(spec.url)})
        if kind == "image":
            return self._registered_base(str(spec.image), ssh_user)
        if kind == "name":
            return self._registered_base(self._newest_image_named(str(spec.name)), ssh_user)
        if kind == "bootstrap":
            result = bootstrap.bootstrap_base(str(spec.bootstrap), getattr(spec, "packages", None), self.cache_dir)
            return BaseImage(
                cloud=self.name,
                image_id=str(result.path),
                digest=result.sha256,
                ssh_user=ssh_user,
                name=str(spec.bootstrap),
                stable_id=bootstrap.stable_id(str(spec.bootstrap), result.sha256),
                details={
                    "path": str(result.path),
                    "format": "qcow2",
                    "size": result.size,
                    "bootstrap": str(spec.bootstrap),
                    "inputs_digest": result.inputs_digest,
                    "packages": result.inputs["packages"],
                },
            )
        raise CloudError(
            f"base.{kind}: the local cloud starts from a file, url, image (a kiln local image id), name or bootstrap"
        )

    def _cached_base(self, path: Path, sha: str, ssh_user: str, *, name: str, origin: dict[str, str]) -> BaseImage:
        info = qemu.image_info(path)
        if info.get("backing-filename"):
            raise CloudError(f"base {name}: a disk with a backing file is not self-contained; flatten it first")
        return BaseImage(
            cloud=self.name,
            image_id=str(path),
            digest=sha,
            ssh_user=ssh_user,
            name=name,
            details={"path": str(path), "format": info["format"], "size": path.stat().st_size, **origin},
            stable_id=f"sha256:{sha}",
        )

    def _newest_image_named(self, pattern: str) -> str:
        """The id of the newest local image whose name matches pattern (shell wildcards)."""
        matches = []
        for directory in self.images_dir.glob("img-*"):
            meta = _read_json(directory / IMAGE_FILE)
            if meta and fnmatch.fnmatchcase(str(meta.get("name", "")), pattern):
                matches.append((str(meta.get("created", "")), directory.name))
        if not matches:
            raise CloudError(f"base.name: no local image is named like {pattern!r} (under {self.images_dir})")
        return max(matches)[1]

    def _registered_base(self, image_id: str, ssh_user: str) -> BaseImage:
        meta = self._image_meta(image_id)
        if meta is None:
            raise CloudError(f"base.image: {image_id} is not a local kiln image (none under {self.images_dir})")
        primary = meta["files"][0]
        return BaseImage(
            cloud=self.name,
            image_id=primary["path"],
            digest=primary["sha256"],
            ssh_user=ssh_user,
            name=meta["name"],
            stable_id=image_id,  # the kiln image it is: lineage runs through that image's own row
            details={
                "path": primary["path"],
                "format": primary["format"],
                "size": primary["size"],
                "kiln_image_id": image_id,
            },
        )

    # -- instances -----------------------------------------------------------------------------------

    def import_key(self, key: KeyPair, tags: dict[str, str]) -> str | None:
        """Nothing to import: the public key travels in the instance's NoCloud seed (user-data)."""
        return None

    def delete_keypair(self, key: KeyPair) -> None:
        """Nothing to delete: the key lives in the caller's memory and in the seed, removed with the instance."""

    def open_ports(self, name: str, ports: list[int], tags: dict[str, str]) -> str | None:
        """Nothing to open: launch forwards every asked port from 127.0.0.1 (no firewall object exists)."""
        return None

    def launch(
        self,
        base: BaseImage,
        key: KeyPair,
        user_data: str,
        tags: dict[str, str],
        ports: list[int],
        *,
        role: str = "build",
        firewall: str | None = None,
    ) -> Instance:
        """Start a guest on an overlay of the base, with a NoCloud seed and 127.0.0.1 forwards for ports; with
        build_in container, the build machine is a container on a working copy of the base instead."""
        base_path = Path(base.details.get("path") or base.image_id)
        if not base_path.is_file():
            raise CloudError(f"base disk {base_path} does not exist (resolve_base it again)")
        if role == "build" and self.build_in == "container":
            return self._launch_container(base, base_path, tags, role)
        base_format = base.details.get("format") or qemu.image_info(base_path)["format"]
        instance_id = f"i-{secrets.token_hex(6)}"
        name = f"kiln-{role}-{instance_id[2:]}"
        directory = self.state_dir / instance_id
        directory.mkdir(parents=True)
        record: dict[str, Any] = {
            "instance_id": instance_id,
            "name": name,
            "role": role,
            "ssh_user": base.ssh_user,
            "tags": dict(tags),
            "created": _now(),
            "dir": str(directory),
            "base": {"path": str(base_path), "format": base_format, "digest": base.digest, "name": base.name},
            "status": "starting",
        }
        _write_json(directory / INSTANCE_FILE, record)  # first, so a crash below still leaves a findable dir
        try:
            overlay = directory / "disk.qcow2"
            self._create_overlay(base_path, base_format, overlay, base.details.get("disk_size_gb"))
            seed = directory / "seed.iso"
            _write_seed(seed, user_data, instance_id, name)
            accel = self._accel()
            qmp = _socket_path(directory, instance_id)
            pid, forwards, args = self._start_qemu(directory, overlay, seed, qmp, ports, accel, name)
        except BaseException:
            self._destroy(directory, None)
            raise
        record.update(
            status="running",
            pid=pid,
            accel=accel,
            ports={str(guest): host for guest, host in forwards.items()},
            overlay=str(overlay),
            seed=str(seed),
            console=str(directory / "console.log"),
            qmp=str(qmp),
            command=args,
        )
        _write_json(directory / INSTANCE_FILE, record)
        log.info(
            "launched %s (%s, pid %d, %s) from %s; ssh on 127.0.0.1:%d",
            instance_id, role, pid, accel, base.name or base_path, forwards[22],
        )  # fmt: skip
        return _instance_from_record(record)

    def _launch_container(self, base: BaseImage, base_path: Path, tags: dict[str, str], role: str) -> Instance:
        """A working copy of the base, its root mounted, a network of its own, and the image's systemd booted in
        a container; each part is in the instance's record before it is made (teardown finds it from there)."""
        container.require_tools()
        instance_id = f"i-{secrets.token_hex(6)}"
        name = f"kiln-{role}-{instance_id[2:]}"
        directory = self.state_dir / instance_id
        layout = container.Layout(directory)
        directory.mkdir(parents=True)
        record: dict[str, Any] = {
            "instance_id": instance_id, "name": name, "role": role, "ssh_user": base.ssh_user, "tags": dict(tags),
            "created": _now(), "dir": str(directory), "machine": "container", "status": "starting",
            "base": {"path": str(base_path), "digest": base.digest, "name": base.name},
            "disk": str(layout.disk), "root": str(layout.root), "netns": layout.netns, "console": str(layout.console),
        }  # fmt: skip
        _write_json(directory / INSTANCE_FILE, record)
        try:
            container.make_working_copy(base_path, layout, base.details.get("disk_size_gb") or self.disk_size_gb)
            record["loop"] = container.mount_root(layout)
            record["slirp_pid"] = container.create_network(layout)
            _write_json(directory / INSTANCE_FILE, record)
            record["pid"] = container.boot(layout, name)
        except BaseException:
            self._destroy(directory, None)
            raise
        record["status"] = "running"
        _write_json(directory / INSTANCE_FILE, record)
        log.info("launched %s (%s, container, nspawn pid %d) from %s", instance_id, role, record["pid"],
                 base.name or base_path)  # fmt: skip
        return _instance_from_record(record)

    def open_session(self, instance: Instance, timeout: float, log: Any) -> Session | None:
        """A container build machine's session once its systemd is up; None for a QEMU guest (reached over SSH)."""
        if instance.details.get("machine") != "container":
            return None
        console = Path(instance.details["console"])
        return container.wait_running(int(instance.details["pid"]), instance.name, console, timeout, log)

    def layers(self, instance: Instance) -> ContainerLayers | None:
        """The layer cache bound to a container build machine; None for a QEMU guest (its disk is not ours to read
        while it runs)."""
        if instance.details.get("machine") != "container":
            return None
        return ContainerLayers(self, instance, LayerCache(self.layers_dir))

    def reboot_container(self, instance: Instance, change: Any, log: Any) -> Session:
        """Stop the build container, let `change(root)` edit its filesystem, boot it again: the new session."""
        directory = self._instance_dir(instance)
        layout = container.Layout(directory)
        container.stop(int(instance.details["pid"]), layout, powering_off=False)
        container.delete_network(layout)
        change(layout.root)
        record = _read_json(directory / INSTANCE_FILE) or {}
        record["slirp_pid"] = container.create_network(layout)
        record["pid"] = container.boot(layout, instance.name)
        _write_json(directory / INSTANCE_FILE, record)
        instance.details["pid"] = record["pid"]
        return container.wait_running(record["pid"], instance.name, layout.console, 300, log)

    def access_hint(self, instance: Instance) -> str | None:
        """How a person gets a shell in a kept container (--on-error abort); None for a QEMU guest."""
        if instance.details.get("machine") != "container":
            return None
        leader = container.leader_of(int(instance.details["pid"]))
        return (
            f"build container {instance.instance_id} kept (filesystem at {instance.details['root']}): "
            f"sudo nsenter --target {leader} --all --root --wd /bin/bash" if leader else
            f"build container {instance.instance_id} is no longer running (filesystem at {instance.details['root']})"
        )  # fmt: skip

    def shell_command(self, instance: Instance) -> list[str] | None:
        """A root shell in a running build container (`kiln shell`); None for a QEMU guest (reached over SSH)."""
        if instance.details.get("machine") != "container":
            return None
        leader = container.leader_of(int(instance.details["pid"]))
        if leader is None:
            raise CloudError(f"build container {instance.instance_id} is no longer running")
        return container.shell_argv(leader)

    def _accel(self) -> str:
        if self.accel != "auto":
            return self.accel
        return "kvm" if qemu.kvm_works(self.cache_dir / "kvm-probe.json") else "tcg"

    def _create_overlay(self, base: Path, base_format: str, overlay: Path, size_gb: int | None) -> None:
        """A qcow2 whose reads fall through to the base, which is never written; grown when asked."""
        qemu.run(
            [qemu.QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(overlay)],
            what="qemu-img create overlay",
        )
        wanted_gb = size_gb or self.disk_size_gb
        if wanted_gb:
            current = int(qemu.image_info(overlay)["virtual-size"])
            if wanted_gb * 1024**3 > current:  # cloud-init's growpart and resizefs take it from there
                qemu.run([qemu.QEMU_IMG, "resize", "-q", str(overlay), f"{wanted_gb}G"], what="qemu-img resize")

    def _start_qemu(
        self,
        directory: Path,
        overlay: Path,
        seed: Path,
        qmp: Path,
        ports: list[int],
        accel: str,
        name: str,
    ) -> tuple[int, dict[int, int], list[str]]:
        """Start QEMU daemonized; a host port taken between picking and binding means a retry."""
        guest_ports = sorted({22, *ports})
        last_error = ""
        for _attempt in range(5):
            forwards = {guest: qemu.free_port() for guest in guest_ports}
            args = self._qemu_args(directory, overlay, seed, qmp, forwards, accel, name)
            done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
            if done.returncode == 0:
                pid = int((directory / "qemu.pid").read_text().strip())
                return pid, forwards, args
            last_error = done.stderr.strip()
            if "host forwarding" not in last_error and "Address already in use" not in last_error:
                break
        raise CloudError(f"QEMU did not start for {directory.name}: {last_error}")

    def _qemu_args(
        self,
        directory: Path,
        overlay: Path,
        seed: Path,
        qmp: Path,
        forwards: dict[int, int],
        accel: str,
        name: str,
    ) -> list[str]:
        hostfwd = ",".join(f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in forwards.items())
        cpu = "host" if accel == "kvm" else "max"
        return [
            qemu.QEMU, "-name", f"{name},process=kiln-{directory.name}",
            "-machine", "q35", "-accel", accel, "-cpu", cpu, "-smp", str(self.cpus), "-m", str(self.memory_mb),
            "-nodefaults", "-no-user-config", "-display", "none", "-rtc", "base=utc",
            "-drive", f"if=none,id=disk0,file={overlay},format=qcow2,discard=unmap,detect-zeroes=unmap",
            "-device", "virtio-blk-pci,drive=disk0,bootindex=1",
            "-drive", f"if=none,id=seed,file={seed},format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=seed",
            # romfile= (none): no iPXE option ROM for SeaBIOS to load and run on every boot; we boot from disk
            "-netdev", f"user,id=net0,{hostfwd}", "-device", "virtio-net-pci,netdev=net0,romfile=",
            "-device", "virtio-rng-pci",
            "-serial", f"file:{directory / 'console.log'}",
            "-qmp", f"unix:{qmp},server=on,wait=off",
            "-pidfile", str(directory / "qemu.pid"), "-daemonize",
        ]  # fmt: skip

    def endpoint(self, instance: Instance, port: int) -> tuple[str, int]:
        """Where the host reaches a guest port: 127.0.0.1 and the forward chosen at launch."""
        forwards = {int(guest): int(host) for guest, host in instance.details.get("ports", {}).items()}
        if port not in forwards:
            raise CloudError(
                f"guest port {port} of {instance.instance_id} was not forwarded at launch "
                f"(forwarded: {sorted(forwards)}); list it among the ports to launch with"
            )
        return "127.0.0.1", forwards[port]

    def console(self, instance: Instance) -> str:
        """The serial console so far (kernel, systemd and cloud-init output, host key fingerprints)."""
        path = Path(instance.details.get("console") or self.state_dir / instance.instance_id / "console.log")
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def expect_power_off(self, instance: Instance) -> None:
        """QEMU exits when its guest powers itself off, and so does a container's systemd: stop() then waits for that
        (faster than an ACPI shutdown through every service) before any power-down event."""
        instance.details["guest_powering_off"] = True

    def stop(self, instance: Instance, timeout: float = 120) -> StopResult:
        """ACPI power-down through QMP, then wait; after timeout the process is killed and the result says so."""
        directory = self._instance_dir(instance)
        pid = self._pid(instance, directory)
        started = time.monotonic()
        if instance.details.get("machine") == "container":
            result = self._stop_container(instance, pid, directory, timeout, started)
        elif pid is None or not qemu.process_alive(pid) or not qemu.is_our_qemu(pid, str(directory)):
            result = StopResult(forced=False, seconds=0.0, detail="already stopped")
        else:
            qmp = Path(instance.details.get("qmp") or directory / "qmp.sock")
            result = self._power_down(instance, pid, directory, qmp, timeout, started)
        instance.details["stop"] = {
            "forced": result.forced,
            "seconds": round(result.seconds, 1),
            "detail": result.detail,
        }
        self._update_record(directory, status="stopped", stop=instance.details["stop"])
        return result

    def _stop_container(
        self, instance: Instance, pid: int | None, directory: Path, timeout: float, started: float
    ) -> StopResult:
        """Stop the container, trim its filesystem (free blocks become holes in the working copy), unmount it and
        release its network: the working copy is then an ordinary raw disk for snapshot()."""
        layout = container.Layout(directory)
        how = container.stop(pid, layout, powering_off=bool(instance.details.get("guest_powering_off")),
                             timeout=timeout)  # fmt: skip
        trimmed = container.trim(layout)
        container.release_disk(layout)
        container.delete_network(layout)
        seconds = time.monotonic() - started
        log.info("%s: container %s in %.1fs; %s", instance.instance_id, how, seconds, trimmed)
        return StopResult(forced=how.startswith("killed"), seconds=seconds, detail=f"container {how}; {trimmed}")

    def _power_down(
        self, instance: Instance, pid: int, directory: Path, qmp: Path, timeout: float, started: float
    ) -> StopResult:
        deadline = started + timeout
        # The build asked the guest to power itself off: wait for that before any ACPI event.
        if instance.details.get("guest_powering_off") and qemu.wait_exit(pid, min(POWERDOWN_REPEAT, timeout)):
            seconds = time.monotonic() - started
            log.info("%s powered itself off in %.1fs", instance.instance_id, seconds)
            return StopResult(forced=False, seconds=seconds, detail="guest powered itself off")
        while time.monotonic() < deadline:
            try:
                with qemu.QMP(qmp) as monitor:
                    monitor.execute("system_powerdown")
            except (OSError, CloudError) as exc:
                log.debug("QMP system_powerdown to %s: %s", instance.instance_id, exc)
            if qemu.wait_exit(pid, min(POWERDOWN_REPEAT, max(0.0, deadline - time.monotonic()))):
                seconds = time.monotonic() - started
                log.info("%s powered off cleanly in %.1fs", instance.instance_id, seconds)
                return StopResult(forced=False, seconds=seconds, detail="clean ACPI shutdown")
        log.warning(
            "%s did not power off within %.0fs of the ACPI request: killing QEMU (forced stop; "
            "the guest's disk may not be consistent)",
            instance.instance_id, timeout,
        )  # fmt: skip
        qemu.kill_qemu(pid, str(directory))
        seconds = time.monotonic() - started
        return StopResult(
            forced=True, seconds=seconds, detail=f"killed after ignoring ACPI power-down for {timeout:.0f}s"
        )

    def terminate(self, instance: Instance) -> None:
        """Kill the guest if it runs and remove its directory; gone already is success."""
        directory = self._instance_dir(instance)
        self._destroy(directory, self._pid(instance, directory))
        if instance.details.get("qmp"):
            Path(instance.details["qmp"]).unlink(missing_ok=True)
        log.info("terminated %s", instance.instance_id)

    def _destroy(self, directory: Path, pid: int | None) -> None:
        if (_read_json(directory / INSTANCE_FILE) or {}).get("machine") == "container":
            container.teardown(container.Layout(directory))
            shutil.rmtree(directory, ignore_errors=True)
            if directory.exists():
                raise CloudError(f"could not remove {directory}")
            return
        if pid is None:
            pid = _read_pid(directory)
        if pid is not None and qemu.process_alive(pid):
            qemu.kill_qemu(pid, str(directory))
        record = _read_json(directory / INSTANCE_FILE) or {}
        if record.get("qmp"):
            Path(record["qmp"]).unlink(missing_ok=True)
        shutil.rmtree(directory, ignore_errors=True)
        if directory.exists():
            raise CloudError(f"could not remove {directory}")

    # -- images --------------------------------------------------------------------------------------

    def snapshot(self, instance: Instance, name: str, tags: dict[str, str], formats: list[str]) -> ImageRef:
        """Flatten the stopped instance's disk into a compressed qcow2 (always first), then the other formats."""
        directory = self._instance_dir(instance)
        pid = self._pid(instance, directory)
        if pid is not None and qemu.process_alive(pid) and qemu.is_our_qemu(pid, str(directory)):
            raise CloudError(f"{instance.instance_id} is still running: stop it before the snapshot")
        overlay = Path(instance.details.get("disk") or instance.details.get("overlay") or directory / "disk.qcow2")
        if not overlay.is_file():
            raise CloudError(f"{instance.instance_id} has no disk at {overlay}")
        if disk.mounts_under(directory):
            raise CloudError(f"{instance.instance_id}'s filesystem is still mounted: stop it before the snapshot")
        wanted = _formats(formats)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "image"
        image_id = f"img-{secrets.token_hex(6)}"
        out = self.images_dir / image_id
        out.mkdir(parents=True)
        try:
            files = [self._write_qcow2(overlay, out / f"{stem}.qcow2")]
            for fmt in wanted[1:]:
                files.append(self._write_format(fmt, Path(files[0].path), out, stem, image_id))
            record = _read_json(directory / INSTANCE_FILE) or {}
            meta = {
                "image_id": image_id,
                "name": name,
                "created": _now(),
                "tags": dict(tags),
                "files": [file.__dict__ for file in files],
                "virtual_size": int(qemu.image_info(files[0].path)["virtual-size"]),
                "source_instance": instance.instance_id,
                "base": record.get("base", {}),
            }
            _write_json(out / IMAGE_FILE, meta)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        log.info("image %s: %s", image_id, ", ".join(f"{f.format} {f.size} bytes" for f in files))
        return ImageRef(
            cloud=self.name,
            image_id=image_id,
            name=name,
            files=tuple(files),
            details={"dir": str(out), "virtual_size": meta["virtual_size"]},
        )

    def _write_qcow2(self, source: Path, dest: Path) -> ImageFile:
        partial = dest.with_name(dest.name + ".part")
        source_format = "raw" if source.suffix == ".raw" else "qcow2"  # a container's working copy, or an overlay
        qemu.run(
            [qemu.QEMU_IMG, "convert", "-f", source_format, "-O", "qcow2", *self.qcow2_options, str(source),
             str(partial)],
            what="qemu-img convert to compressed qcow2",
            timeout=3600,
        )
        partial.replace(dest)
        return _image_file("qcow2", dest)

    def _write_format(self, fmt: str, source: Path, out: Path, stem: str, image_id: str) -> ImageFile:
        dest = out / f"{stem}.{fmt}"
        if fmt == "ova":
            build_ova(source, dest, stem, cpus=self.cpus, memory_mb=self.memory_mb, annotation=f"kiln image {image_id}")
            return _image_file(fmt, dest)
        options = {"raw": [], "vdi": [], "vmdk": ["-o", "subformat=streamOptimized"]}[fmt]
        partial = dest.with_name(dest.name + ".part")
        qemu.run(
            [qemu.QEMU_IMG, "convert", "-O", fmt, *options, str(source), str(partial)],
            what=f"qemu-img convert to {fmt}",
            timeout=3600,
        )
        partial.replace(dest)
        return _image_file(fmt, dest)

    def delete_image(self, image: ImageRef) -> None:
        """Remove the image's directory; gone already is success."""
        directory = self._image_dir(image.image_id)
        shutil.rmtree(directory, ignore_errors=True)
        if directory.exists():
            raise CloudError(f"could not remove image {image.image_id} at {directory}")

    def tag_image(self, image: ImageRef, tags: dict[str, str]) -> None:
        """Merge tags into the image's meta.json."""
        meta = self._image_meta(image.image_id)
        if meta is None:
            raise CloudError(f"image {image.image_id} does not exist under {self.images_dir}")
        meta["tags"] = {**meta.get("tags", {}), **tags}
        _write_json(self._image_dir(image.image_id) / IMAGE_FILE, meta)

    def revoke_image(self, image: ImageRef, reason: str) -> None:
        """Flag the image revoked in its meta.json (the local catalog); the files stay for forensics."""
        meta = self._image_meta(image.image_id)
        if meta is None:
            raise CloudError(f"image {image.image_id} does not exist under {self.images_dir}")
        meta["revoked"] = {"reason": reason, "at": _now()}
        _write_json(self._image_dir(image.image_id) / IMAGE_FILE, meta)

    def _image_dir(self, image_id: str) -> Path:
        if not IMAGE_ID.match(image_id):
            raise CloudError(f"{image_id!r} is not a local image id (img-<12 hex digits>)")
        return self.images_dir / image_id

    def _image_meta(self, image_id: str) -> dict[str, Any] | None:
        return _read_json(self._image_dir(image_id) / IMAGE_FILE)

    # -- garbage collection ----------------------------------------------------------------------------

    @property
    def scope(self) -> tuple[str, ...]:
        return ("local", str(self.state_dir), str(self.images_dir))

    def reaches(self, region: str) -> bool:
        """This host holds all that provenance records of the local cloud (its region is always "")."""
        return True

    def owned(self, tags: dict[str, str] | None = None) -> list[Resource]:
        """Every instance directory (and its QEMU process while alive) and image whose tags match all of tags."""
        wanted = tags or {}
        found: list[Resource] = []
        for directory in sorted(self.state_dir.glob("i-*")):
            if not (directory.is_dir() and INSTANCE_ID.match(directory.name)):
                continue
            record = _read_json(directory / INSTANCE_FILE) or {}
            instance_tags = record.get("tags", {})
            if any(instance_tags.get(k) != v for k, v in wanted.items()):
                continue
            created = _parse_time(record.get("created"))
            found.append(Resource(self.name, "instance", directory.name, instance_tags, created=created))
            if record.get("machine") == "container":
                found += [Resource(self.name, kind, part, instance_tags, created=created)
                          for kind, part in _container_parts(directory)]  # fmt: skip
                continue
            pid = record.get("pid") or _read_pid(directory)
            if pid and qemu.process_alive(pid) and qemu.is_our_qemu(pid, str(directory)):
                found.append(Resource(self.name, "process", str(pid), instance_tags, created=created))
        for directory in sorted(self.images_dir.glob("img-*")):
            if not (directory.is_dir() and IMAGE_ID.match(directory.name)):
                continue
            meta = _read_json(directory / IMAGE_FILE) or {}
            image_tags = meta.get("tags", {})
            if any(image_tags.get(k) != v for k, v in wanted.items()):
                continue
            found.append(
                Resource(self.name, "image", directory.name, image_tags, created=_parse_time(meta.get("created")))
            )
        return found

    def release(self, resource: Resource) -> None:
        """Undo what owned() (or the ledger) names; releasing what is gone already succeeds."""
        if resource.kind == "instance":
            if not INSTANCE_ID.match(resource.resource_id):
                raise CloudError(f"{resource.resource_id!r} is not a local instance id")
            directory = self.state_dir / resource.resource_id
            self._destroy(directory, None)
        elif resource.kind == "process":
            pid = int(resource.resource_id)
            if qemu.process_alive(pid) and qemu.is_our_qemu(pid, str(self.state_dir)):
                qemu.kill_qemu(pid, str(self.state_dir))
            elif layout := self._container_with(lambda parts: ("process", str(pid)) in parts):
                container.kill_processes(layout)
        elif resource.kind in ("mount", "loop", "netns"):
            # A container's parts go together, newest first: what holds the mount goes before it.
            if layout := self._container_with(lambda parts: (resource.kind, resource.resource_id) in parts):
                container.teardown(layout)
        elif resource.kind == "image":
            self.delete_image(ImageRef(cloud=self.name, image_id=resource.resource_id, name=""))
        elif resource.kind in ("keypair", "security-group"):
            return  # the local cloud never creates these (import_key and open_ports return None)
        else:
            raise CloudError(f"the local cloud has no {resource.kind!r} resources to release")

    # -- helpers ---------------------------------------------------------------------------------------

    def _container_with(self, holds: Any) -> container.Layout | None:
        """The container (instance directory) whose parts `holds` accepts; None when no container has it."""
        for directory in sorted(self.state_dir.glob("i-*")):
            if INSTANCE_ID.match(directory.name) and holds(_container_parts(directory)):
                return container.Layout(directory)
        return None

    def _instance_dir(self, instance: Instance) -> Path:
        if not INSTANCE_ID.match(instance.instance_id):
            raise CloudError(f"{instance.instance_id!r} is not a local instance id")
        return self.state_dir / instance.instance_id

    def _pid(self, instance: Instance, directory: Path) -> int | None:
        pid = instance.details.get("pid")
        return int(pid) if pid else _read_pid(directory)

    def _update_record(self, directory: Path, **changes: Any) -> None:
        record = _read_json(directory / INSTANCE_FILE)
        if record is not None:
            record.update(changes)
            _write_json(directory / INSTANCE_FILE, record)


class ContainerLayers:
    """A build container's steps as layers: find the reusable ones, put them in place, keep each new step's change."""

    def __init__(self, cloud: LocalCloud, instance: Instance, cache: LayerCache) -> None:
        self.cloud, self.instance, self.cache = cloud, instance, cache
        self.root = Path(instance.details["root"])
        self._before: Manifest | None = None

    def reusable(self, keys: list[str]) -> list[Layer]:
        """The longest run of cached layers from the first key (each checked against its sha256)."""
        found = []
        for key in keys:
            layer = self.cache.get(key)
            if layer is None:
                break
            found.append(layer)
        return found

    def restore(self, layers: list[Layer], log: Any) -> Session:
        """Apply the layers in order with the container stopped, then boot it again, so what their steps enabled
        starts as it would have; returns the new session."""

        def apply_all(root: Path) -> None:
            for layer in layers:
                self.cache.apply(layer, root)
                self.cache.touch(layer)

        return self.cloud.reboot_container(self.instance, apply_all, log)

    def begin(self) -> None:
        """Remember the filesystem as it is before a step."""
        self._before = manifest(self.root)

    def keep(self, key: str, *, step: str, build_id: str, parent: str) -> Layer:
        """Keep what changed since begin() as the layer `key` (a layer another build made meanwhile is reused)."""
        if self._before is None:
            raise CloudError("keep() without begin(): nothing to compare the step's filesystem with")
        with self.cache.locked(key):
            layer = self.cache.get(key) or self.cache.keep(key, self.root, self._before, step=step,
                                                           build_id=build_id, parent=parent)  # fmt: skip
        self._before = None
        return layer


def _open_target(target: LocalTarget, timeouts: Timeouts | None, target_name: str) -> LocalCloud:
    return LocalCloud(
        accel=target.accel, memory_mb=target.memory_mb, cpus=target.cpus, disk_size_gb=target.disk_size_gb,
        qcow2_compression=target.qcow2_compression, build_in=target.build_in,
    )


BACKEND = Backend(
    kind="local",
    target_model=LocalTarget,
    open_target=_open_target,
    default_vm_limit=lambda: max(1, (os.cpu_count() or 2) // 2),  # a QEMU guest under TCG wants about two cores
    open_place=lambda place: LocalCloud(),  # the one this host has
    collected_always=True,
    is_image_id=lambda image_id: bool(IMAGE_ID.match(image_id)),  # img-…, not a file form (img-….raw) or a path
)


def _container_parts(directory: Path) -> list[tuple[str, str]]:
    """(kind, id) of what a container instance holds right now: processes, mounts, loop devices, network."""
    layout = container.Layout(directory)
    parts = [("process", str(pid)) for pid in container.processes(layout)]
    parts += [("mount", point) for point in disk.mounts_under(directory)]
    parts += [("loop", device) for device in disk.loops_of(layout.disk)]
    if layout.netns_path.exists():
        parts.append(("netns", layout.netns))
    return parts


def _base_kind(spec: Any) -> str:
    kind = getattr(spec, "kind", None)
    if kind:
        return str(kind)
    for candidate in ("image", "name", "ssm_parameter", "file", "url", "bootstrap"):
        if getattr(spec, candidate, None):
            return candidate
    raise CloudError("base: names no image, file, url or bootstrap")


def _formats(formats: list[str]) -> list[str]:
    asked = [str(f).lower() for f in formats or []]
    unknown = [f for f in asked if f not in FORMATS]
    if unknown:
        raise CloudError(f"outputs.formats: {', '.join(unknown)} not supported (local makes {', '.join(FORMATS)})")
    return ["qcow2", *[f for f in dict.fromkeys(asked) if f != "qcow2"]]


def _write_seed(seed: Path, user_data: str, instance_id: str, hostname: str) -> None:
    """The NoCloud seed: an ISO 9660 volume labelled cidata with user-data and meta-data."""
    with tempfile.TemporaryDirectory(prefix="seed-", dir=seed.parent) as tmp:
        (Path(tmp) / "user-data").write_text(user_data)
        (Path(tmp) / "meta-data").write_text(f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n")
        qemu.run(
            [
                "genisoimage", "-quiet", "-output", str(seed), "-volid", "cidata", "-joliet", "-rock",
                str(Path(tmp) / "user-data"), str(Path(tmp) / "meta-data"),
            ],
            what="genisoimage (NoCloud seed)",
        )  # fmt: skip


def _socket_path(directory: Path, instance_id: str) -> Path:
    """The QMP socket beside the instance, unless that path is too long for a unix socket."""
    path = directory / "qmp.sock"
    if len(str(path)) <= UNIX_PATH_MAX:
        return path
    return Path(tempfile.gettempdir()) / f"kiln-{instance_id}.qmp"


def _instance_from_record(record: dict[str, Any]) -> Instance:
    return Instance(
        cloud="local",
        instance_id=record["instance_id"],
        name=record["name"],
        ssh_user=record["ssh_user"],
        tags=dict(record.get("tags", {})),
        details={
            "pid": record["pid"],
            "dir": record["dir"],
            "ports": {int(guest): int(host) for guest, host in record.get("ports", {}).items()},
            "console": record["console"],
            **{key: record[key] for key in ("qmp", "overlay", "accel", "machine", "disk", "root") if key in record},
        },
    )


def _image_file(fmt: str, path: Path) -> ImageFile:
    return ImageFile(format=fmt, path=str(path), size=path.stat().st_size, sha256=sha256_file(path))


def _read_pid(directory: Path) -> int | None:
    try:
        return int((directory / "qemu.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(partial, path)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _parse_time(value: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(value) if value else None
    except ValueError:
        return None
