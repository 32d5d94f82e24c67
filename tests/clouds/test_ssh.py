"""clouds/ssh.py against a real OpenSSH server on 127.0.0.1: run, put, facts, host-key pinning, boot waits,
console fingerprint parsing and the TCP/HTTP probes."""

from __future__ import annotations

import base64
import hashlib
import http.server
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from clouds import qemu, ssh
from clouds.base import BootTimeout, HostKeyMismatch, KeyPair
from tests.clouds.conftest import SshServer

WRONG_FINGERPRINT = "SHA256:" + "A" * 43


def open_session(server: SshServer, expected: list[str] | None = None) -> ssh.GuestSession:
    return ssh.connect(server.host, server.port, server.user, server.key, expected_host_keys=expected, timeout=10)


# -- run ------------------------------------------------------------------------------------------------


def test_run_returns_exit_code_output_and_duration(sshd: SshServer) -> None:
    with open_session(sshd) as session:
        result = session.run("echo out; echo err >&2; sleep 0.5", timeout=30)
    assert result.exit_code == 0
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert 0.5 <= result.duration < 10


def test_run_streams_each_line_to_the_log_as_it_arrives(sshd: SshServer) -> None:
    arrivals: list[tuple[str, float]] = []
    with open_session(sshd) as session:
        started = time.monotonic()
        session.run(
            "echo first; sleep 2; printf 'second\\nthird'",
            timeout=30,
            log=lambda line: arrivals.append((line, time.monotonic())),
        )
    assert [line for line, _ in arrivals] == ["first", "second", "third"]
    first_at = arrivals[0][1] - started
    second_at = arrivals[1][1] - started
    assert first_at < 1.5, "the first line must reach the log while the command still runs"
    assert second_at >= 2


def test_non_zero_exit_raises_command_failed_with_the_last_20_lines(sshd: SshServer) -> None:
    with open_session(sshd) as session, pytest.raises(ssh.CommandFailed) as failure:
        # stdout and stderr arrive on separate streams: the pause fixes their order in the tail
        session.run("seq 1 50; sleep 0.5; echo oops >&2; exit 3", timeout=30)
    error = failure.value
    assert error.exit_code == 3
    assert error.command_label == "seq 1 50; sleep 0.5; echo oops >&2; exit 3"
    lines = error.tail.splitlines()
    assert len(lines) == 20
    assert lines[-1] == "oops"
    assert lines[0] == "32"
    assert "exited with 3" in str(error)


def test_check_false_returns_a_failed_result(sshd: SshServer) -> None:
    with open_session(sshd) as session:
        result = session.run("exit 7", timeout=30, check=False)
    assert result.exit_code == 7


def test_timeout_kills_the_command_and_raises(sshd: SshServer) -> None:
    pause = f"59.{uuid.uuid4().int % 10**6:06d}"  # a sleep nobody else runs, to find it afterwards
    with open_session(sshd) as session:
        started = time.monotonic()
        with pytest.raises(ssh.CommandTimeout) as timeout:
            session.run(f"echo started; sleep {pause}; echo done", timeout=2)
        assert time.monotonic() - started < 20
        assert "did not finish within 2s" in str(timeout.value)
        assert "started" in timeout.value.tail
        left = session.run(f"pgrep -af '[s]leep {pause}' || true", timeout=10).stdout
    assert left.strip() == "", "the timed-out command (and its children) must be killed on the guest"


def test_env_reaches_the_command_quoted(sshd: SshServer) -> None:
    with open_session(sshd) as session:
        result = session.run('printf %s "$KILN_VALUE"', env={"KILN_VALUE": "a b'c $HOME"}, timeout=30)
        assert result.stdout == "a b'c $HOME"
        with pytest.raises(ssh.CloudError):
            session.run("true", env={"BAD NAME": "x"})


# -- put, facts, packages ---------------------------------------------------------------------------------


def test_put_installs_bytes_with_mode_and_owner_creating_parents(sshd: SshServer, tmp_path: Path) -> None:
    target = tmp_path / "etc" / "kiln" / "settings.conf"
    with open_session(sshd) as session:
        session.put(b"answer = 42\n", str(target), mode="0640", owner="nobody:nogroup")
    info = target.stat()
    assert target.read_bytes() == b"answer = 42\n"
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert (info.st_uid, info.st_gid) == (_uid("nobody"), _gid("nogroup"))
    assert not list(Path("/tmp").glob("kiln-put-*")), "the upload's temp file must be removed"


def test_put_uploads_a_local_file(sshd: SshServer, tmp_path: Path) -> None:
    source = tmp_path / "script.sh"
    source.write_bytes(os.urandom(3 * 1024 * 1024))  # more than one chunk
    target = tmp_path / "remote" / "script.sh"
    with open_session(sshd) as session:
        session.put(source, str(target), mode="0755")
    assert target.read_bytes() == source.read_bytes()
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


def test_put_rejects_a_bad_mode_before_uploading(sshd: SshServer, tmp_path: Path) -> None:
    with open_session(sshd) as session, pytest.raises(ssh.CloudError, match="octal"):
        session.put(b"x", str(tmp_path / "x"), mode="rwx")
    assert not (tmp_path / "x").exists()


def test_facts_read_os_release_and_find_the_package_manager(sshd: SshServer) -> None:
    release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    with open_session(sshd) as session:
        facts = session.facts()
    assert facts.os_id == release["ID"].strip('"')
    assert facts.os_version == release.get("VERSION_ID", "").strip('"')
    assert facts.package_manager == "apt"


def test_package_manifest_lists_installed_packages_with_versions(sshd: SshServer) -> None:
    with open_session(sshd) as session:
        manifest = session.package_manifest()
    versions = {name: (version, arch) for name, version, arch in manifest}
    expected = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version} ${Architecture}", "openssh-server"], capture_output=True, text=True
    ).stdout.split()
    assert versions["openssh-server"] == tuple(expected)
    assert len(manifest) > 50
    assert manifest == sorted(manifest)


# -- host keys ------------------------------------------------------------------------------------------


def test_pinned_connect_rejects_a_host_key_the_console_did_not_announce(sshd: SshServer) -> None:
    with pytest.raises(HostKeyMismatch) as mismatch:
        open_session(sshd, expected=[WRONG_FINGERPRINT])
    assert sshd.host_fingerprint in str(mismatch.value)
    assert WRONG_FINGERPRINT in str(mismatch.value)


def test_pinned_connect_accepts_the_announced_host_key(sshd: SshServer) -> None:
    with open_session(sshd, expected=[WRONG_FINGERPRINT, sshd.host_fingerprint]) as session:
        assert session.host_key_fingerprint == sshd.host_fingerprint
        assert session.run("echo ok", timeout=30).stdout == "ok\n"


def test_unpinned_connect_records_the_host_key(sshd: SshServer) -> None:
    with open_session(sshd) as session:
        assert session.host_key_fingerprint == sshd.host_fingerprint


def test_key_rejected_tells_a_refused_key_from_an_accepted_one(sshd: SshServer) -> None:
    stranger = KeyPair.generate("stranger")
    assert ssh.key_rejected(sshd.host, sshd.port, sshd.user, stranger, timeout=10) is True
    assert ssh.key_rejected(sshd.host, sshd.port, sshd.user, sshd.key, timeout=10) is False


# -- wait_for_ssh -----------------------------------------------------------------------------------------


def console_block(fingerprint: str, prefix: str = "") -> str:
    return (
        f"{prefix}#############################################################\n"
        f"{prefix}-----BEGIN SSH HOST KEY FINGERPRINTS-----\n"
        f"{prefix}256 {fingerprint} root@guest (ED25519)\n"
        f"{prefix}-----END SSH HOST KEY FINGERPRINTS-----\n"
        f"{prefix}#############################################################\n"
    )


def test_wait_for_ssh_pins_the_host_key_from_the_console(sshd: SshServer) -> None:
    console = "booting\n" + console_block(sshd.host_fingerprint, prefix="ec2: ")
    session = ssh.wait_for_ssh(
        sshd.host,
        sshd.port,
        sshd.user,
        sshd.key,
        expected_host_keys_from=lambda: ssh.host_key_fingerprints_from_console(console),
        console=lambda: console,
        timeout=60,
    )
    with session:
        assert session.host_key_fingerprint == sshd.host_fingerprint


def test_wait_for_ssh_fails_when_the_console_announces_another_key(sshd: SshServer) -> None:
    console = console_block(WRONG_FINGERPRINT)
    with pytest.raises(HostKeyMismatch):
        ssh.wait_for_ssh(
            sshd.host,
            sshd.port,
            sshd.user,
            sshd.key,
            expected_host_keys_from=lambda: ssh.host_key_fingerprints_from_console(console),
            console=lambda: console,
            timeout=60,
        )


def test_wait_for_ssh_refuses_to_trust_a_key_when_the_console_never_shows_one(sshd: SshServer) -> None:
    started = time.monotonic()
    with pytest.raises(HostKeyMismatch, match="no host key fingerprints on the console"):
        ssh.wait_for_ssh(
            sshd.host,
            sshd.port,
            sshd.user,
            sshd.key,
            expected_host_keys_from=lambda: [],
            console=lambda: "no fingerprints here\n",
            timeout=60,
            host_key_grace=2,
        )
    assert time.monotonic() - started < 30


def test_wait_for_ssh_gives_up_on_pinning_soon_after_cloud_init_finished_without_fingerprints(
    sshd: SshServer,
) -> None:
    console = "Cloud-init v. 22.4.2 finished at Sun, 22 Nov 2026 02:41:00 +0000. Up 162.86 seconds\n"
    started = time.monotonic()
    with pytest.raises(HostKeyMismatch, match="after cloud-init finished"):
        ssh.wait_for_ssh(
            sshd.host,
            sshd.port,
            sshd.user,
            sshd.key,
            expected_host_keys_from=lambda: ssh.host_key_fingerprints_from_console(console),
            console=lambda: console,
            timeout=120,
            host_key_grace=100,
            finished_grace=1,
        )
    assert time.monotonic() - started < 20


def test_wait_for_ssh_times_out_with_the_console_tail() -> None:
    port = qemu.free_port()  # nobody listens here
    console = "".join(f"console line {n}\n" for n in range(1, 41))
    started = time.monotonic()
    with pytest.raises(BootTimeout) as timeout:
        ssh.wait_for_ssh(
            "127.0.0.1",
            port,
            "debian",
            KeyPair.generate("k"),
            expected_host_keys_from=None,
            console=lambda: console,
            timeout=3,
        )
    assert time.monotonic() - started < 15
    message = str(timeout.value)
    assert "console line 40" in message and "console line 11" in message
    assert "console line 10\n" not in message, "only the last 30 console lines belong in the message"


# -- console fingerprints ---------------------------------------------------------------------------------


def test_fingerprints_parse_plain_ec2_and_syslog_prefixed_blocks() -> None:
    fingerprint = "SHA256:h5t63H8hH1xTk4GiNXhPGjMGTVz5qNrL/vW7P/h7hxk"
    for prefix in ("", "ec2: ", "<14>Nov 22 02:40:59 cloud-init: "):
        text = "[   12.0] kernel noise\n" + console_block(fingerprint, prefix) + "login:\n"
        assert ssh.host_key_fingerprints_from_console(text) == [fingerprint], prefix


def test_fingerprints_of_an_unfinished_block_are_not_trusted() -> None:
    text = "-----BEGIN SSH HOST KEY FINGERPRINTS-----\n256 SHA256:" + "b" * 43 + " root@h (ED25519)\n"
    assert ssh.host_key_fingerprints_from_console(text) == []
    assert ssh.host_key_fingerprints_from_console("") == []


def test_the_last_block_wins_after_a_reboot() -> None:
    old, new = "SHA256:" + "o" * 43, "SHA256:" + "n" * 43
    assert ssh.host_key_fingerprints_from_console(console_block(old) + console_block(new)) == [new]


def test_fingerprints_are_also_computed_from_the_host_keys_block() -> None:
    key = KeyPair.generate("host")
    blob = key.public_key.split()[1]
    text = f"-----BEGIN SSH HOST KEY KEYS-----\nssh-ed25519 {blob} root@guest\n-----END SSH HOST KEY KEYS-----\n"
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(base64.b64decode(blob)).digest()).decode().rstrip("=")
    assert ssh.host_key_fingerprints_from_console(text) == [expected] == [key.fingerprint]


# -- cloud-init's result ----------------------------------------------------------------------------------


def test_cloud_init_result_json_maps_to_status_exit_codes() -> None:
    done = '{"v1": {"datasource": "DataSourceNoCloud [seed=/dev/vdb]", "errors": []}}'
    assert ssh._cloud_init_result(done) == (0, "status: done\ndatasource: DataSourceNoCloud [seed=/dev/vdb]")
    failed_code, failed = ssh._cloud_init_result('{"v1": {"datasource": null, "errors": ["cc_users: boom"]}}')
    assert failed_code == 1 and "cc_users: boom" in failed
    recoverable = '{"v1": {"datasource": "x", "errors": [], "recoverable_errors": {"WARNING": ["w"]}}}'
    assert ssh._cloud_init_result(recoverable)[0] == 2
    assert ssh._cloud_init_result("{not json")[0] == 1


def test_wait_cloud_init_on_a_host_without_cloud_init_says_so(sshd: SshServer) -> None:
    if Path(ssh.CLOUD_INIT_RESULT).exists() or shutil.which("cloud-init"):
        pytest.skip("this host runs cloud-init itself")
    with open_session(sshd) as session:
        assert session.wait_cloud_init(timeout=60) == "status: no cloud-init"


# -- probes -------------------------------------------------------------------------------------------------


def test_probe_port_sees_a_listening_port_and_a_closed_one(sshd: SshServer) -> None:
    assert ssh.probe_port(sshd.host, sshd.port, timeout=5) is True
    started = time.monotonic()
    assert ssh.probe_port("127.0.0.1", qemu.free_port(), timeout=2) is False
    assert time.monotonic() - started < 10


def test_probe_port_counts_a_connection_closed_at_once_as_closed() -> None:
    """What QEMU's user-network forward does when the guest port is closed: accept, then close."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        stop = threading.Event()

        def accept_and_close() -> None:
            listener.settimeout(0.2)
            while not stop.is_set():
                try:
                    connection, _ = listener.accept()
                    connection.close()
                except OSError:
                    continue

        thread = threading.Thread(target=accept_and_close, daemon=True)
        thread.start()
        try:
            assert ssh.probe_port("127.0.0.1", port, timeout=2) is False
        finally:
            stop.set()
            thread.join()


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "index.html").write_text("SUCCESSFUL TEST\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_probe_http_returns_status_and_body(http_server: str) -> None:
    assert ssh.probe_http(f"{http_server}/index.html", timeout=5) == (200, "SUCCESSFUL TEST\n")
    status, _ = ssh.probe_http(f"{http_server}/missing", timeout=5)
    assert status == 404


def test_probe_http_raises_an_os_error_when_nothing_answers() -> None:
    with pytest.raises(TimeoutError, match="no HTTP answer within 2s"):
        ssh.probe_http(f"http://127.0.0.1:{qemu.free_port()}/", timeout=2)


def _uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    import grp

    return grp.getgrnam(name).gr_gid
