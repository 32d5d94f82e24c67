"""The local cloud's build container (build_in: container) on the real bootstrap base: the session interface a stage
uses (run with streamed output and exit code, put with owner and mode, facts, manifest), a service started by the
image's own systemd in a network namespace of its own, the snapshot of the working copy, and teardown of whatever a
dead build left (processes, mount, loop device, network namespace). No QEMU: these take seconds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from clouds import container, disk
from clouds.base import BaseImage, CloudError, Instance, KeyPair
from clouds.local import LocalCloud
from clouds.session import CommandFailed, Session
from tests.clouds.conftest import Spec

TAGS = {"kiln:build-id": "test-container", "kiln:recipe": "tests"}
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containers need root (loop devices, mounts, nspawn)")


@pytest.fixture(scope="module")
def containers(tmp_path_factory: pytest.TempPathFactory) -> LocalCloud:
    home = tmp_path_factory.mktemp("container-cloud")
    return LocalCloud(state_dir=home / "state", images_dir=home / "images", build_in="container")


@pytest.fixture(scope="module")
def base(containers: LocalCloud) -> BaseImage:
    return containers.resolve_base(Spec(bootstrap="debian-bookworm"), "debian")


@pytest.fixture(scope="module")
def running(containers: LocalCloud, base: BaseImage) -> Iterator[tuple[Instance, Session]]:
    """One build container for the module's session tests; released at the end (asserted by the last test)."""
    instance = containers.launch(base, KeyPair.generate("t"), "", TAGS, [22], role="build")
    try:
        session = containers.open_session(instance, timeout=120, log=lambda line: None)
        yield instance, session
    finally:
        containers.terminate(instance)


def kiln_traces(directory: Path) -> dict[str, list[str]]:
    """What of a container is still on this host: loop devices, mounts, processes, its network namespace."""
    layout = container.Layout(directory)
    return {
        "loops": disk.loops_of(layout.disk),
        "mounts": disk.mounts_under(directory),
        "processes": [str(pid) for pid in container.processes(layout)],
        "netns": [layout.netns] if layout.netns_path.exists() else [],
    }


def test_a_command_streams_its_lines_and_reports_its_exit_code(running) -> None:
    _instance, session = running
    lines: list[str] = []
    result = session.run("echo one; echo two >&2; exit 0", log=lines.append)
    assert result.exit_code == 0 and result.stdout == "one\n" and result.stderr == "two\n"
    assert sorted(lines) == ["one", "two"]
    with pytest.raises(CommandFailed) as failure:
        session.run("echo before; exit 7", label="seven")
    assert failure.value.exit_code == 7 and "before" in failure.value.tail and failure.value.hint == ""
    assert session.run("exit 4", check=False).exit_code == 4
    assert session.run("id -u; echo $HOME; printenv GREETING", env={"GREETING": "hi"}).stdout.split() == [
        "0", "/root", "hi"]


def test_a_kernel_bound_failure_suggests_building_in_a_vm(running) -> None:
    _instance, session = running
    with pytest.raises(CommandFailed) as failure:
        session.run("modprobe dummy")
    assert "build_in: vm" in failure.value.hint and "build_in: vm" in str(failure.value)


def test_put_installs_a_file_with_mode_and_owner(running) -> None:
    _instance, session = running
    session.put(b"secret bytes\n", "/etc/kiln-test/deep/file.txt", mode="0640", owner="root:adm")
    listing = session.run("stat -c '%a %U %G %s' /etc/kiln-test/deep/file.txt; cat /etc/kiln-test/deep/file.txt")
    assert listing.stdout.splitlines() == ["640 root adm 13", "secret bytes"]
    assert session.run("ls /tmp | grep -c kiln-put", check=False).stdout.strip() == "0"


def test_facts_and_manifest_come_from_the_image(running) -> None:
    _instance, session = running
    facts = session.facts()
    assert (facts.os_id, facts.os_version, facts.package_manager) == ("debian", "12", "apt")
    names = {name for name, _version, _arch in session.package_manifest()}
    assert {"systemd", "cloud-init", "openssh-server"} <= names


def test_the_image_systemd_runs_services_in_a_network_of_the_containers_own(running) -> None:
    instance, session = running
    server = "import http.server as h; h.HTTPServer(('0.0.0.0', 8080), h.SimpleHTTPRequestHandler).serve_forever()"
    session.run(f"systemd-run --unit=kiln-test-http --working-directory=/etc python3 -c \"{server}\"")
    answer = session.run(
        "for i in $(seq 50); do python3 -c \"import urllib.request as u; "
        "print(u.urlopen('http://127.0.0.1:8080/hostname').status)\" 2>/dev/null && break; sleep 0.1; done"
    )
    assert answer.stdout.strip() == "200"
    with pytest.raises(OSError):  # the service listens in the container's namespace, not on the host
        socket.create_connection(("127.0.0.1", 8080), timeout=2).close()
    assert session.run("ip -4 -o addr show tap0 | grep -c 10.0.2.100").stdout.strip() == "1"
    assert "No such" not in session.run("getent hosts deb.debian.org", check=False).stdout
    assert session.run("test -e /home/* -o -e /root/.bash_history; ls /root", check=False).stdout.strip() == ""
    assert str(Path.home()) not in session.run("cat /proc/self/mountinfo").stdout or Path.home() == Path("/root")


def test_stop_trims_unmounts_and_snapshot_writes_a_qcow2_then_nothing_is_left(containers, running) -> None:
    instance, session = running
    session.run("echo built-in-a-container > /etc/kiln-marker")
    directory = Path(instance.details["dir"])
    stopped = containers.stop(instance, timeout=60)
    assert "trimmed" in stopped.detail and not stopped.forced
    assert kiln_traces(directory) == {"loops": [], "mounts": [], "processes": [], "netns": []}
    image = containers.snapshot(instance, "container-test", TAGS, ["qcow2"])
    try:
        with disk.mounted_read_only(Path(image.files[0].path)) as root:
            assert (root / "etc/kiln-marker").read_text() == "built-in-a-container\n"
            assert not (root / "etc/resolv.conf").is_file() or (root / "etc/resolv.conf").is_symlink()
    finally:
        containers.delete_image(image)
    containers.terminate(instance)
    assert not directory.exists()


def test_a_container_whose_nspawn_was_killed_is_found_and_released_whole(containers, base) -> None:
    instance = containers.launch(base, KeyPair.generate("t"), "", TAGS, [22], role="build")
    directory = Path(instance.details["dir"])
    try:
        containers.open_session(instance, timeout=120, log=lambda line: None)
        os.kill(int(instance.details["pid"]), signal.SIGKILL)  # what a crash of the host side leaves
        kinds = {r.kind for r in containers.owned(TAGS) if r.resource_id != instance.instance_id}
        assert {"process", "mount", "loop", "netns"} <= kinds
        for resource in sorted(containers.owned(TAGS), key=lambda r: r.kind != "instance"):
            containers.release(resource)
    finally:
        if directory.exists():
            containers.terminate(instance)
    assert kiln_traces(directory) == {"loops": [], "mounts": [], "processes": [], "netns": []}
    assert containers.owned(TAGS) == []
    assert str(directory) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout


def test_a_base_that_does_not_boot_fails_launch_and_leaves_nothing(containers, tmp_path) -> None:
    empty = tmp_path / "empty.raw"
    subprocess.run(["truncate", "-s", "64M", str(empty)], check=True)
    subprocess.run(["mkfs.ext4", "-q", str(empty)], check=True)
    broken = BaseImage(cloud="local", image_id=str(empty), digest="0" * 64, ssh_user="debian",
                       details={"path": str(empty), "format": "raw"})  # fmt: skip
    instance = containers.launch(broken, KeyPair.generate("t"), "", TAGS, [22], role="build")
    try:
        with pytest.raises(CloudError, match="exited while booting|did not finish booting"):
            containers.open_session(instance, timeout=30, log=lambda line: None)
    finally:
        containers.terminate(instance)
    assert not Path(instance.details["dir"]).exists() and containers.owned(TAGS) == []
