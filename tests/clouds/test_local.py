"""The local QEMU cloud: bases (download cache, files, bootstrap), launch/stop/terminate, snapshots in every
format, owned/release, and real boots of the bootstrap base and of a snapshot (marked vm)."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import shutil
import subprocess
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clouds import fetch, open_cloud, qemu, ssh
from clouds.base import BaseImage, CloudError, HostKeyMismatch, Instance, KeyPair, Resource
from clouds.bootstrap import MBR_BIN, PARTITION_OFFSET
from clouds.local import LocalCloud
from clouds.ova import ovf_descriptor
from core.recipe import LocalTarget
from tests.clouds.conftest import Spec, our_qemu_processes, user_data

TAGS = {"kiln:build-id": "test-build", "kiln:recipe": "tests"}
GROWN_DISK_GB = 3  # the bootstrap base is 2 GiB
OVF_NS = {"ovf": "http://schemas.dmtf.org/ovf/envelope/1"}
OVF = "{http://schemas.dmtf.org/ovf/envelope/1}"
RASD = "{http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- KVM probe -------------------------------------------------------------------------------------------


def test_kvm_probe_returns_a_boolean_and_caches_it(tmp_path: Path) -> None:
    qemu.kvm_works.cache_clear()
    cache = tmp_path / "kvm-probe.json"
    answer = qemu.kvm_works(cache)
    assert isinstance(answer, bool)
    if Path("/dev/kvm").exists():
        assert json.loads(cache.read_text())["kvm"] is answer
    assert qemu.kvm_works(cache) is answer


def test_the_probe_guest_passes_under_tcg_so_a_failure_means_kvm() -> None:
    assert qemu.run_probe_guest(timeout=30, accel="tcg") is True


@pytest.mark.skipif(shutil.which("as") is None, reason="binutils (as) is not installed to rebuild the probe")
def test_the_probe_boot_sector_is_built_from_its_source(tmp_path: Path) -> None:
    source = qemu.PROBE_SECTOR.with_suffix(".S")
    subprocess.run(["as", "--32", "-o", str(tmp_path / "probe.o"), str(source)], check=True)
    subprocess.run(
        ["objcopy", "-O", "binary", "-j", ".text", str(tmp_path / "probe.o"), str(tmp_path / "probe.bin")], check=True
    )
    assert (tmp_path / "probe.bin").read_bytes() == qemu.PROBE_SECTOR.read_bytes()
    assert len(qemu.PROBE_SECTOR.read_bytes()) == 512


# -- bases: files and downloads ----------------------------------------------------------------------------


@dataclass
class RangeServer:
    """An HTTP server on 127.0.0.1 that honours Range (or not), can drop the first response half-way,
    and records every request's Range header."""

    payload: bytes
    honour_range: bool = True
    drop_first_after: int | None = None
    requests: list[str | None] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def range_server() -> Iterator[RangeServer]:
    state = RangeServer(payload=bytes(range(256)) * 4096)  # 1 MiB

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            asked = self.headers.get("Range")
            state.requests.append(asked)
            body, status, extra = state.payload, 200, {}
            if asked and state.honour_range:
                start = int(asked.removeprefix("bytes=").split("-")[0])
                body, status = state.payload[start:], 206
                extra["Content-Range"] = f"bytes {start}-{len(state.payload) - 1}/{len(state.payload)}"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            if state.drop_first_after is not None and len(state.requests) == 1:
                self.wfile.write(body[: state.drop_first_after])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/base.qcow2"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_with_a_wrong_sha256_fails_and_keeps_nothing(range_server: RangeServer, tmp_path: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(CloudError, match="the recipe says 0000"):
        fetch.download(range_server.url, wrong, tmp_path)
    assert list((tmp_path / "bases" / "sha256").glob("0000*[!k]")) == [], "no file and no .part may remain"


def test_download_resumes_a_partial_file_with_range(range_server: RangeServer, tmp_path: Path) -> None:
    digest = sha256(range_server.payload)
    part = fetch.cache_path(tmp_path, digest).with_name(digest + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(range_server.payload[:300_000])
    path = fetch.download(range_server.url, digest, tmp_path)
    assert range_server.requests == ["bytes=300000-"]
    assert path.read_bytes() == range_server.payload
    assert path == fetch.cache_path(tmp_path, digest)
    assert not part.exists()


def test_download_resumes_after_the_connection_drops(range_server: RangeServer, tmp_path: Path) -> None:
    range_server.drop_first_after = 400_000
    digest = sha256(range_server.payload)
    path = fetch.download(range_server.url, digest, tmp_path)
    assert range_server.requests == [None, "bytes=400000-"]
    assert sha256(path.read_bytes()) == digest


def test_download_starts_over_when_the_server_ignores_range(range_server: RangeServer, tmp_path: Path) -> None:
    range_server.honour_range = False
    digest = sha256(range_server.payload)
    part = fetch.cache_path(tmp_path, digest).with_name(digest + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes that must not stay in front")
    path = fetch.download(range_server.url, digest, tmp_path)
    assert path.read_bytes() == range_server.payload


def test_a_cached_download_is_not_fetched_again(range_server: RangeServer, tmp_path: Path) -> None:
    digest = sha256(range_server.payload)
    fetch.download(range_server.url, digest, tmp_path)
    fetch.download(range_server.url, digest, tmp_path)
    assert range_server.requests == [None]


def test_url_base_resolves_to_the_cached_disk_and_its_digest(
    range_server: RangeServer, tmp_path: Path, blank_disk: Path
) -> None:
    range_server.payload = blank_disk.read_bytes()
    digest = sha256(range_server.payload)
    cloud = LocalCloud(cache_dir=tmp_path / "cache")
    base = cloud.resolve_base(Spec(url=range_server.url, sha256=f"sha256:{digest.upper()}"), "debian")
    assert base.digest == digest
    assert base.details["format"] == "qcow2"
    assert Path(base.image_id) == fetch.cache_path(tmp_path / "cache", digest)
    assert base.name == "base.qcow2"


def test_file_base_is_verified_and_copied_into_the_cache(tmp_path: Path, blank_disk: Path) -> None:
    cloud = LocalCloud(cache_dir=tmp_path / "cache")
    digest = sha256(blank_disk.read_bytes())
    base = cloud.resolve_base(Spec(file=blank_disk.name, sha256=digest), "debian", base_dir=blank_disk.parent)
    assert base.digest == digest and Path(base.image_id).read_bytes() == blank_disk.read_bytes()
    with pytest.raises(CloudError, match="the recipe says"):
        cloud.resolve_base(Spec(file=str(blank_disk), sha256="1" * 64), "debian")
    with pytest.raises(CloudError, match="sha256 is required"):
        cloud.resolve_base(Spec(file=str(blank_disk)), "debian")


def test_bases_the_local_cloud_cannot_use_are_refused(tmp_path: Path) -> None:
    cloud = LocalCloud(cache_dir=tmp_path / "cache")
    with pytest.raises(CloudError, match="base.ssm_parameter"):
        cloud.resolve_base(Spec(ssm_parameter="/aws/service/debian"), "admin")
    with pytest.raises(CloudError, match="not a known bootstrap"):
        cloud.resolve_base(Spec(bootstrap="windows-95"), "admin")
    with pytest.raises(CloudError, match="img-nothing"):
        cloud.resolve_base(Spec(image="img-nothing"), "debian")


# -- OVF --------------------------------------------------------------------------------------------------


def test_ovf_descriptor_describes_the_disk_and_the_hardware() -> None:
    text = ovf_descriptor("web & co", "web-disk1.vmdk", 12345, 2 * 1024**3, cpus=4, memory_mb=1024)
    root = ET.fromstring(text)
    file = root.find("ovf:References/ovf:File", OVF_NS)
    assert file is not None
    assert (file.get(f"{OVF}href"), file.get(f"{OVF}size"), file.get(f"{OVF}id")) == (
        "web-disk1.vmdk",
        "12345",
        "file1",
    )
    disk = root.find("ovf:DiskSection/ovf:Disk", OVF_NS)
    assert disk is not None
    assert disk.get(f"{OVF}capacity") == str(2 * 1024**3)
    assert disk.get(f"{OVF}fileRef") == "file1"
    assert disk.get(f"{OVF}format", "").endswith("#streamOptimized")
    system = root.find("ovf:VirtualSystem", OVF_NS)
    assert system is not None and system.get(f"{OVF}id") == "web & co"
    items = {
        item.findtext(f"{RASD}ResourceType"): item for item in root.iter("{http://schemas.dmtf.org/ovf/envelope/1}Item")
    }
    assert items["3"].findtext(f"{RASD}VirtualQuantity") == "4"  # CPUs
    assert items["4"].findtext(f"{RASD}VirtualQuantity") == "1024"  # memory, MiB
    assert items["17"].findtext(f"{RASD}HostResource") == "ovf:/disk/vmdisk1"  # the disk on the controller
    # devices Debian's cloud kernel drives: PIIX IDE for the disk, VMXNET3 for the network
    assert items["17"].findtext(f"{RASD}Parent") == items["5"].findtext(f"{RASD}InstanceID")
    assert items["5"].findtext(f"{RASD}ResourceSubType") == "PIIX4"
    assert items["10"].findtext(f"{RASD}ResourceSubType") == "VMXNET3"


# -- instances on a blank disk (QEMU runs, no operating system boots) -----------------------------------------


@pytest.fixture
def blank_disk(tmp_path: Path) -> Path:
    disk = tmp_path / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    return disk


@pytest.fixture
def blank_base(blank_disk: Path) -> BaseImage:
    digest = sha256(blank_disk.read_bytes())
    return BaseImage("local", str(blank_disk), digest, "debian", name="blank", details={"path": str(blank_disk)})


@pytest.fixture
def launched(cloud: LocalCloud, blank_base: BaseImage) -> Iterator[Instance]:
    key = KeyPair.generate("kiln-test")
    instance = cloud.launch(blank_base, key, user_data("debian", key), TAGS, [8080], role="build")
    try:
        yield instance
    finally:
        cloud.terminate(instance)


def test_launch_runs_qemu_on_an_overlay_with_forwards_and_records_it(
    cloud: LocalCloud, launched: Instance, blank_base: BaseImage
) -> None:
    directory = Path(launched.details["dir"])
    record = json.loads((directory / "instance.json").read_text())
    assert record["tags"] == TAGS and record["pid"] == launched.details["pid"]
    assert set(record["ports"]) == {"22", "8080"}
    args = Path(f"/proc/{launched.details['pid']}/cmdline").read_bytes().split(b"\0")
    line = b" ".join(args).decode()
    assert "-kernel" not in line, "guests boot from their own disk"
    assert "discard=unmap" in line and "detect-zeroes=unmap" in line
    assert f"-accel {launched.details['accel']}" in line
    host, port = cloud.endpoint(launched, 8080)
    assert host == "127.0.0.1" and port == launched.details["ports"][8080]
    assert cloud.endpoint(launched, 22)[1] != port
    with pytest.raises(CloudError, match="was not forwarded"):
        cloud.endpoint(launched, 443)
    info = qemu.image_info(launched.details["overlay"])
    assert info["backing-filename"] == blank_base.image_id
    assert sha256(Path(blank_base.image_id).read_bytes()) == blank_base.digest, "the base is never written"
    assert "user-data" not in {p.name for p in directory.iterdir()}, "only the seed ISO carries user-data"


def test_launch_grows_the_overlay_to_the_asked_disk_size(cloud: LocalCloud, blank_base: BaseImage) -> None:
    bigger = LocalCloud(state_dir=cloud.state_dir, images_dir=cloud.images_dir, disk_size_gb=1)
    key = KeyPair.generate("kiln-test")
    instance = bigger.launch(blank_base, key, user_data("debian", key), TAGS, [])
    try:
        assert qemu.image_info(instance.details["overlay"])["virtual-size"] == 1024**3
        assert qemu.image_info(blank_base.image_id)["virtual-size"] == 64 * 1024**2, "the base keeps its size"
    finally:
        bigger.terminate(instance)


def test_a_local_targets_disk_size_grows_the_overlay(blank_base: BaseImage) -> None:
    target = LocalTarget(base={"bootstrap": "debian-bookworm"}, disk_size_gb=1, accel="tcg", build_in="vm")
    local = open_cloud(target)
    key = KeyPair.generate("kiln-test")
    instance = local.launch(blank_base, key, user_data("debian", key), TAGS, [])
    try:
        assert qemu.image_info(instance.details["overlay"])["virtual-size"] == 1024**3
    finally:
        local.terminate(instance)


def test_terminate_kills_qemu_removes_the_directory_and_is_idempotent(cloud: LocalCloud, blank_base: BaseImage) -> None:
    key = KeyPair.generate("kiln-test")
    instance = cloud.launch(blank_base, key, user_data("debian", key), TAGS, [])
    pid = instance.details["pid"]
    cloud.terminate(instance)
    assert not qemu.process_alive(pid)
    assert not Path(instance.details["dir"]).exists()
    cloud.terminate(instance)  # gone already is success


def test_stop_kills_a_guest_that_ignores_the_power_button_and_says_so(
    cloud: LocalCloud, launched: Instance, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="clouds.local"):
        result = cloud.stop(launched, timeout=3)
    assert result.forced is True
    assert "killed" in result.detail
    assert not qemu.process_alive(launched.details["pid"])
    assert any("forced stop" in record.getMessage() for record in caplog.records)
    assert launched.details["stop"]["forced"] is True
    assert cloud.stop(launched, timeout=3).forced is False  # stopping a stopped instance is a no-op


def test_snapshot_refuses_a_running_instance(cloud: LocalCloud, launched: Instance) -> None:
    with pytest.raises(CloudError, match="still running"):
        cloud.snapshot(launched, "x", TAGS, ["qcow2"])
    assert list(cloud.images_dir.glob("img-*")) == []


def test_snapshot_writes_every_format_with_size_and_digest(cloud: LocalCloud, launched: Instance) -> None:
    cloud.stop(launched, timeout=1)
    with pytest.raises(CloudError, match="iso"):
        cloud.snapshot(launched, "app", TAGS, ["qcow2", "iso"])
    image = cloud.snapshot(launched, "app 1.0", TAGS, ["ova", "raw", "vmdk", "vdi"])
    try:
        assert [f.format for f in image.files] == ["qcow2", "ova", "raw", "vmdk", "vdi"]
        for file in image.files:
            path = Path(file.path)
            assert path.parent == cloud.images_dir / image.image_id
            assert (file.size, file.sha256) == (path.stat().st_size, sha256(path.read_bytes()))
        formats = {f.format: f for f in image.files}
        for fmt in ("qcow2", "raw", "vmdk", "vdi"):
            info = qemu.image_info(formats[fmt].path)
            assert info["format"] == fmt and info["virtual-size"] == 64 * 1024**2
            assert "backing-filename" not in info, "outputs stand alone"
        assert_ova_is_well_formed(Path(formats["ova"].path), tmp_dir=cloud.images_dir / image.image_id)
        meta = json.loads((cloud.images_dir / image.image_id / "meta.json").read_text())
        assert meta["tags"] == TAGS and meta["name"] == "app 1.0"
        cloud.tag_image(image, {"kiln:commit": "abc"})
        meta = json.loads((cloud.images_dir / image.image_id / "meta.json").read_text())
        assert meta["tags"] == {**TAGS, "kiln:commit": "abc"}
    finally:
        cloud.delete_image(image)
    assert not (cloud.images_dir / image.image_id).exists()
    cloud.delete_image(image)  # gone already is success


def assert_ova_is_well_formed(ova: Path, tmp_dir: Path) -> None:
    """Descriptor first, manifest second, the streamOptimized disk last; manifest digests match."""
    with tarfile.open(ova) as tar:
        names = tar.getnames()
        assert names[0].endswith(".ovf") and names[1].endswith(".mf") and names[2].endswith(".vmdk")
        contents = {name: tar.extractfile(name).read() for name in names}  # type: ignore[union-attr]
    manifest = contents[names[1]].decode().splitlines()
    assert manifest == [f"SHA256({name})= {sha256(contents[name])}" for name in (names[0], names[2])]
    root = ET.fromstring(contents[names[0]])
    file = root.find("ovf:References/ovf:File", OVF_NS)
    assert file is not None and file.get(f"{OVF}href") == names[2]
    assert file.get(f"{OVF}size") == str(len(contents[names[2]]))
    vmdk = tmp_dir / "extracted.vmdk"
    vmdk.write_bytes(contents[names[2]])
    try:
        info = qemu.image_info(vmdk)
        assert info["format"] == "vmdk"
        assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    finally:
        vmdk.unlink()


def test_owned_finds_what_kiln_made_by_tag_and_release_removes_it(cloud: LocalCloud, blank_base: BaseImage) -> None:
    key = KeyPair.generate("kiln-test")
    mine = cloud.launch(blank_base, key, user_data("debian", key), TAGS, [])
    other = cloud.launch(blank_base, key, user_data("debian", key), {"kiln:build-id": "other"}, [])
    cloud.stop(other, timeout=1)
    image = cloud.snapshot(other, "other", {"kiln:build-id": "other"}, [])
    try:
        found = {(r.kind, r.resource_id) for r in cloud.owned({"kiln:build-id": "test-build"})}
        assert found == {("instance", mine.instance_id), ("process", str(mine.details["pid"]))}
        everything = {(r.kind, r.resource_id) for r in cloud.owned()}
        assert ("instance", other.instance_id) in everything and ("image", image.image_id) in everything
        assert ("process", str(other.details["pid"])) not in everything, "a stopped instance has no process"
        for resource in cloud.owned({"kiln:build-id": "test-build"}):
            cloud.release(resource)
        for resource in cloud.owned({"kiln:build-id": "other"}):
            cloud.release(resource)
        assert cloud.owned({"kiln:build-id": "test-build"}) == []
        assert cloud.owned({"kiln:build-id": "other"}) == []
        cloud.release(Resource("local", "instance", mine.instance_id))  # gone already is success
        cloud.release(Resource("local", "keypair", "kiln-test"))  # the local cloud never made one
    finally:
        cloud.terminate(mine)
        cloud.terminate(other)
        cloud.delete_image(image)


def test_a_registered_image_is_a_base_by_id_and_by_name(cloud: LocalCloud, launched: Instance) -> None:
    cloud.stop(launched, timeout=1)
    image = cloud.snapshot(launched, "webserver-1.2.0", TAGS, [])
    try:
        by_id = cloud.resolve_base(Spec(image=image.image_id), "debian")
        assert by_id.details["kiln_image_id"] == image.image_id
        assert by_id.image_id == image.files[0].path and by_id.digest == image.sha256
        by_name = cloud.resolve_base(Spec(name="webserver-*"), "debian")
        assert by_name.details["kiln_image_id"] == image.image_id
        with pytest.raises(CloudError, match="no local image is named"):
            cloud.resolve_base(Spec(name="database-*"), "debian")
    finally:
        cloud.delete_image(image)


# -- real boots (vm) -----------------------------------------------------------------------------------------


@dataclass
class Guest:
    instance: Instance
    key: KeyPair
    session: ssh.GuestSession
    boot_seconds: float


def boot(cloud: LocalCloud, base: BaseImage, role: str, shared: set[str]) -> Guest:
    """Launch, wait for SSH with the host key pinned from the console, cloud-init done."""
    key = KeyPair.generate(f"kiln-test-{role}")
    started = time.monotonic()
    instance = cloud.launch(base, key, user_data("debian", key), {**TAGS, "kiln:role": role}, [8080], role=role)
    shared.add(instance.instance_id)
    try:
        session = ssh.wait_for_ssh(
            *cloud.endpoint(instance, 22),
            instance.ssh_user,
            key,
            expected_host_keys_from=lambda: ssh.host_key_fingerprints_from_console(cloud.console(instance)),
            console=lambda: cloud.console(instance),
            timeout=900,
        )
    except BaseException:
        dispose(cloud, instance, shared)
        raise
    return Guest(instance, key, session, time.monotonic() - started)


def dispose(cloud: LocalCloud, instance: Instance, shared: set[str]) -> None:
    cloud.terminate(instance)
    shared.discard(instance.instance_id)
    assert not Path(instance.details["dir"]).exists()
    assert instance.instance_id not in " ".join(our_qemu_processes(cloud.state_dir).values())


@pytest.fixture(scope="module")
def build_guest(cloud: LocalCloud, bootstrap_base: BaseImage, shared_instances: set[str]) -> Iterator[Guest]:
    """One boot of the bootstrap base shared by the tests below (each TCG boot costs about a minute), on a disk
    grown past the base's size so cloud-init's growpart and resizefs have something to do."""
    grown = LocalCloud(state_dir=cloud.state_dir, images_dir=cloud.images_dir, disk_size_gb=GROWN_DISK_GB)
    guest = boot(grown, bootstrap_base, "build", shared_instances)
    logging.getLogger(__name__).info("bootstrap base: boot to SSH in %.1fs", guest.boot_seconds)
    try:
        yield guest
    finally:
        guest.session.close()
        dispose(cloud, guest.instance, shared_instances)


@pytest.mark.vm
def test_the_bootstrap_base_is_one_bootable_partition_with_its_own_bootloader(
    bootstrap_base: BaseImage, tmp_path: Path
) -> None:
    raw = tmp_path / "base.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", bootstrap_base.image_id, str(raw)], check=True)
    with open(raw, "rb") as disk:
        mbr = disk.read(512)
    assert mbr[:440] == MBR_BIN.read_bytes()[:440], "syslinux's mbr.bin boots the active partition"
    assert mbr[510:] == b"\x55\xaa"
    entries = [mbr[446 + 16 * n : 446 + 16 * (n + 1)] for n in range(4)]
    assert entries[0][0] == 0x80 and entries[0][4] == 0x83, "one active Linux partition"
    assert int.from_bytes(entries[0][8:12], "little") * 512 == PARTITION_OFFSET
    assert entries[1:] == [bytes(16)] * 3, "no /boot, no swap: a single partition"
    assert sha256(Path(bootstrap_base.image_id).read_bytes()) == bootstrap_base.digest


@pytest.mark.vm
def test_the_base_boots_from_its_own_disk_and_logs_in_with_the_build_key(cloud: LocalCloud, build_guest: Guest) -> None:
    cmdline = Path(f"/proc/{build_guest.instance.details['pid']}/cmdline").read_bytes()
    assert b"-kernel" not in cmdline
    session = build_guest.session
    assert session.run("id -un", sudo=False, timeout=60).stdout.strip() == "debian"
    assert session.run("id -u", timeout=60).stdout.strip() == "0", "run is root by default (sudo)"
    assert session.run("findmnt -no SOURCE /", timeout=60).stdout.strip() == "/dev/vda1"
    assert session.host_key_fingerprint in ssh.host_key_fingerprints_from_console(cloud.console(build_guest.instance))
    lines: list[str] = []
    session.run("for n in 1 2 3; do echo line $n; done", log=lines.append, timeout=60)
    assert lines == ["line 1", "line 2", "line 3"]
    with pytest.raises(ssh.CommandFailed) as failure:
        session.run("echo about to fail; false", timeout=60)
    assert failure.value.exit_code == 1 and "about to fail" in failure.value.tail


@pytest.mark.vm
def test_the_root_filesystem_grows_to_the_launched_disk_size(bootstrap_base: BaseImage, build_guest: Guest) -> None:
    base_bytes = int(qemu.image_info(bootstrap_base.image_id)["virtual-size"])
    disk = build_guest.session.run("lsblk -bdno SIZE /dev/vda", timeout=60).stdout.strip()
    root = build_guest.session.run("df -B1 --output=size / | tail -1", timeout=60).stdout.strip()
    assert int(disk) == GROWN_DISK_GB * 1024**3 > base_bytes
    assert int(root) > base_bytes, "growpart and resize2fs took the root filesystem past the base's size"


@pytest.mark.vm
def test_the_guest_resolves_the_debian_mirror_for_customize(build_guest: Guest) -> None:
    result = build_guest.session.run("getent hosts deb.debian.org", sudo=False, timeout=120)
    assert result.stdout.strip()


@pytest.mark.vm
def test_put_installs_a_file_with_mode_and_owner(build_guest: Guest) -> None:
    build_guest.session.put(b"SUCCESSFUL TEST\n", "/srv/kiln/test.txt", mode="0640", owner="root:adm")
    result = build_guest.session.run("stat -c '%a %U %G' /srv/kiln/test.txt; cat /srv/kiln/test.txt", timeout=60)
    assert result.stdout == "640 root adm\nSUCCESSFUL TEST\n"


@pytest.mark.vm
def test_facts_and_package_manifest_of_the_bootstrap_base(build_guest: Guest) -> None:
    facts = build_guest.session.facts()
    assert (facts.os_id, facts.os_version, facts.package_manager) == ("debian", "12", "apt")
    names = {name for name, _version, _arch in build_guest.session.package_manifest()}
    assert {"linux-image-cloud-amd64", "openssh-server", "cloud-init", "sudo", "systemd-sysv"} <= names


@pytest.mark.vm
def test_host_key_pinning_rejects_a_wrong_fingerprint_and_accepts_the_consoles(
    cloud: LocalCloud, build_guest: Guest
) -> None:
    host, port = cloud.endpoint(build_guest.instance, 22)
    announced = ssh.host_key_fingerprints_from_console(cloud.console(build_guest.instance))
    assert announced
    with pytest.raises(HostKeyMismatch):
        ssh.connect(host, port, "debian", build_guest.key, expected_host_keys=["SHA256:" + "x" * 43], timeout=30)
    with ssh.connect(host, port, "debian", build_guest.key, expected_host_keys=announced, timeout=30) as session:
        assert session.run("hostname", sudo=False, timeout=60).stdout.strip() == build_guest.instance.name


@pytest.mark.parametrize("compression", ["zstd", "zlib"])
def test_the_output_qcow2_uses_the_targets_compression(compression: str, tmp_path: Path) -> None:
    """zlib is what a QEMU older than 5.1 (an older OpenStack compute host) can read; zstd is the default."""
    source = tmp_path / "disk.raw"
    with source.open("wb") as disk:
        disk.write(b"kiln " * 200_000)
        disk.truncate(64 * 1024**2)
    target = LocalTarget(base={"bootstrap": "debian-bookworm"}, accel="tcg", qcow2_compression=compression)
    local = open_cloud(target)

    written = local._write_qcow2(source, tmp_path / "out.qcow2")

    info = qemu.image_info(written.path)
    assert info["format-specific"]["data"]["compression-type"] == compression
    assert info["cluster-size"] == 256 * 1024
