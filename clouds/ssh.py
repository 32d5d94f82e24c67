"""SSH into guests with fabric: run (streamed, timed, checked), put (mode, owner), facts, package manifest,
the boot wait with host-key pinning from the console, and the small TCP/HTTP probes verify uses."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import io
import json
import logging
import math
import re
import secrets
import shlex
import socket
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path

import fabric
import invoke
import paramiko

from clouds.base import BootTimeout, CloudError, HostKeyMismatch, KeyPair
from clouds.session import (  # noqa: F401 - CommandFailed, RunResult, GuestFacts: part of this module's API
    TAIL_LINES,
    CommandFailed,
    CommandTimeout,
    GuestFacts,
    LineSink,
    RunResult,
    ShellSession,
    env_assignments,
    install_command,
    label_of,
)

log = logging.getLogger(__name__)

CONSOLE_TAIL_LINES = 30
# When the console has no host key fingerprints yet although SSH answers, wait_for_ssh keeps waiting:
# cloud-init prints them near the end of its final stage, which under TCG on a busy host comes a minute
# or two after sshd starts (and `cloud-init status --wait` would wait for that stage anyway). It gives up,
# failing rather than trusting an unpinned key, FINISHED_GRACE seconds after the console shows cloud-init
# finished without them, or HOST_KEY_GRACE seconds after SSH first answered if cloud-init never says so.
HOST_KEY_GRACE = 240.0
FINISHED_GRACE = 20.0
# How often the boot wait reads the console for the fingerprints by default (a cloud API call; a cloud whose
# console is a local file passes a shorter console_poll_seconds: the guest pays nothing for it), and how often
# it retries a refused login (each try costs the guest an SSH handshake, seconds of CPU under TCG).
CONSOLE_POLL_SECONDS = 2.0
LOGIN_RETRY_SECONDS = 2.0
_CLOUD_INIT_FINISHED = re.compile(r"Cloud-init v\. \S+ finished at")


def fingerprint(key: paramiko.PKey) -> str:
    """SHA256 fingerprint as ssh-keygen -l and cloud-init print it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def _private_key(key: KeyPair) -> paramiko.PKey:
    """The KeyPair's private half as a paramiko key, read from memory (it is never written to disk)."""
    for kind in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return kind.from_private_key(io.StringIO(key.private_key))
        except (paramiko.SSHException, ValueError):
            continue
    raise CloudError(f"key pair {key.name}: the private key is not an ed25519, ECDSA or RSA key")


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Check the server's key against the expected fingerprints before authenticating; None accepts any."""

    def __init__(self, expected: list[str] | None) -> None:
        self.expected = expected
        self.seen = ""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.seen = fingerprint(key)
        if self.expected is not None and self.seen not in self.expected:
            raise HostKeyMismatch(
                f"{hostname}: the SSH host key is {self.seen}, but the console announced "
                f"{', '.join(self.expected) or 'none'}: refusing to log in"
            )


class GuestSession(ShellSession):
    """An authenticated SSH session to a guest. Use as a context manager or call close()."""

    def __init__(self, connection: fabric.Connection, host_key_fingerprint: str) -> None:
        self.connection = connection
        self.host = connection.host
        self.port = connection.port
        self.user = connection.user
        self.host_key_fingerprint = host_key_fingerprint

    def __enter__(self) -> GuestSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.connection.close()

    def host_key_line(self) -> str:
        """The guest's host key as this session pinned it, `type base64` (a known_hosts line's end)."""
        transport = self.connection.client.get_transport()
        if transport is None:
            raise CloudError("the SSH session is closed: no host key to pin")
        key = transport.get_remote_server_key()
        return f"{key.get_name()} {key.get_base64()}"

    def run(
        self,
        command: str,
        *,
        sudo: bool = True,
        timeout: float = 600,
        log: Callable[[str], None] | None = None,
        check: bool = True,
        env: dict[str, str] | None = None,
        label: str | None = None,
    ) -> RunResult:
        """Run command with sh -c (as root unless sudo=False), streaming each output line to log.

        The guest's own `timeout` kills the command (and its process group) after timeout seconds, and a
        local watchdog a little later covers a guest that stopped answering; either raises CommandTimeout.
        With check, a non-zero exit raises CommandFailed with the last 20 lines of output.
        """
        label = label or label_of(command)
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        out, err = LineSink(log, tail), LineSink(log, tail)
        wrapped = self._wrap(command, sudo=sudo, env=env, timeout=timeout)
        started = time.monotonic()
        try:
            result = self.connection.run(
                wrapped,
                hide=False,
                echo=False,
                warn=True,
                pty=False,
                in_stream=False,
                out_stream=out,
                err_stream=err,
                timeout=math.ceil(timeout) + 15,
            )
        except invoke.exceptions.CommandTimedOut as exc:
            raise CommandTimeout(label, timeout, "\n".join(tail)) from exc
        finally:
            out.close()
            err.close()
        duration = time.monotonic() - started
        if result.exited == 124 and duration >= timeout - 1:  # coreutils timeout's status
            raise CommandTimeout(label, timeout, "\n".join(tail))
        if check and result.exited != 0:
            raise CommandFailed(label, result.exited, "\n".join(tail))
        return RunResult(result.exited, result.stdout, result.stderr, duration)

    def _wrap(self, command: str, *, sudo: bool, env: dict[str, str] | None, timeout: float) -> str:
        assignments = env_assignments(env)
        as_root = "sudo -n -H -- " if sudo and self.user != "root" else ""
        env_prefix = f"env {' '.join(assignments)} " if assignments else ""
        return f"{as_root}{env_prefix}timeout -k 10 {math.ceil(timeout)} sh -c {shlex.quote(command)}"

    def put(
        self,
        source: str | Path | bytes,
        remote_path: str,
        *,
        mode: str = "0644",
        owner: str = "root:root",
    ) -> None:
        """Upload a file (or bytes) to remote_path with mode and owner: to a private temp file as the user,
        then `sudo install` into place (parent directories are created)."""
        temp = f"/tmp/kiln-put-{secrets.token_hex(8)}"
        install = install_command(temp, remote_path, mode=mode, owner=owner)
        sftp = self.connection.sftp()
        try:
            with sftp.open(temp, "wb") as remote:
                remote.chmod(0o600)
                remote.set_pipelined(True)
                if isinstance(source, bytes):
                    remote.write(source)
                else:
                    with open(source, "rb") as local:
                        for chunk in iter(lambda: local.read(1024 * 1024), b""):
                            remote.write(chunk)
            self.run(
                install,
                timeout=120,
                label=f"install {remote_path}",
            )
        finally:
            with contextlib.suppress(OSError):
                sftp.remove(temp)

    def wait_cloud_init(self, timeout: float) -> str:
        """Block until cloud-init is done (if the guest has it); its errors fail, recoverable ones warn.

        When /run/cloud-init/result.json exists cloud-init has finished (its final stage writes it last),
        and reading it spares a `cloud-init status` run, several seconds of Python under TCG. While cloud-init
        runs (status.json is there, result.json not yet: the login often lands between the fingerprints and
        the end of the final stage) a shell loop waits for result.json, for up to RESULT_WAIT_SECONDS;
        otherwise (no cloud-init state at all, or a stage that never ends) `cloud-init status --wait --long`
        decides.
        """
        polls = int(RESULT_WAIT_SECONDS / 0.2)
        result = self.run(
            f"n=0; while [ ! -e {CLOUD_INIT_RESULT} ] && [ -e {CLOUD_INIT_STATUS} ] && [ $n -lt {polls} ]; "
            "do sleep 0.2; n=$((n+1)); done; "
            f"if [ -e {CLOUD_INIT_RESULT} ]; then echo {_RESULT_MARKER}; cat {CLOUD_INIT_RESULT}; "
            "elif command -v cloud-init >/dev/null 2>&1; then cloud-init status --wait --long; "
            "else echo 'status: no cloud-init'; fi",
            sudo=False,
            timeout=timeout,
            check=False,
            label="cloud-init status --wait",
        )
        output = result.stdout.strip()
        exit_code = result.exit_code
        if output.startswith(_RESULT_MARKER):
            exit_code, output = _cloud_init_result(output.removeprefix(_RESULT_MARKER).strip())
        output = output.lstrip(".").strip()  # --wait prints a dot per poll
        if exit_code == 2:
            log.warning("cloud-init finished with recoverable errors on %s:%s:\n%s", self.host, self.port, output)
        elif exit_code != 0:
            raise CloudError(f"cloud-init failed on the guest (exit {exit_code}):\n{output}")
        return output


CLOUD_INIT_RESULT = "/run/cloud-init/result.json"
CLOUD_INIT_STATUS = "/run/cloud-init/status.json"  # written as each stage starts and ends
RESULT_WAIT_SECONDS = 120.0
_RESULT_MARKER = "KILN-CLOUD-INIT-RESULT"


def _cloud_init_result(text: str) -> tuple[int, str]:
    """result.json → the exit code `cloud-init status` would give (0 done, 1 errors, 2 recoverable) and a summary."""
    try:
        v1 = json.loads(text)["v1"]
    except (ValueError, KeyError, TypeError):
        return 1, f"unreadable {CLOUD_INIT_RESULT}: {text[:500]}"
    errors = v1.get("errors") or []
    recoverable = v1.get("recoverable_errors") or {}
    summary = f"status: {'error' if errors else 'done'}\ndatasource: {v1.get('datasource')}"
    if errors:
        return 1, summary + "\nerrors:\n" + "\n".join(f"  {e}" for e in errors)
    if recoverable:
        return 2, summary + f"\nrecoverable errors: {json.dumps(recoverable)[:2000]}"
    return 0, summary


def connect(
    host: str,
    port: int,
    user: str,
    key: KeyPair,
    *,
    expected_host_keys: list[str] | None,
    timeout: float = 30,
) -> GuestSession:
    """Open an SSH session with key. expected_host_keys (SHA256 fingerprints) pins the server's key
    before authenticating; None accepts whatever key the server shows and records it on the session."""
    policy = _HostKeyPolicy(expected_host_keys)
    # No ~/.ssh/config, no known_hosts, no agent, no key files: only this key, only this host key check.
    config = fabric.Config(lazy=True, ssh_config=paramiko.SSHConfig())
    connection = fabric.Connection(
        host,
        user=user,
        port=port,
        config=config,
        connect_timeout=max(1, math.ceil(timeout)),
        connect_kwargs={
            "pkey": _private_key(key),
            "look_for_keys": False,
            "allow_agent": False,
            "banner_timeout": timeout,
            "auth_timeout": timeout,
        },
    )
    connection.client.set_missing_host_key_policy(policy)
    try:
        connection.open()
    except BaseException:
        connection.close()
        raise
    return GuestSession(connection, policy.seen)


def ssh_answers(host: str, port: int, timeout: float = 5) -> bool:
    """Whether an SSH server sends its banner there (a bare TCP accept proves nothing behind a NAT forward)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def wait_for_ssh(
    host: str,
    port: int,
    user: str,
    key: KeyPair,
    *,
    expected_host_keys_from: Callable[[], list[str]] | None,
    console: Callable[[], str],
    timeout: float,
    host_key_grace: float = HOST_KEY_GRACE,
    finished_grace: float = FINISHED_GRACE,
    console_poll_seconds: float = CONSOLE_POLL_SECONDS,
) -> GuestSession:
    """Retry until SSH authenticates with key, then wait for cloud-init, all within timeout.

    With expected_host_keys_from, the host key is pinned to what it returns (the console's fingerprints),
    and no login is attempted while it returns nothing. Pinning never silently degrades to trusting the
    first key seen: once SSH answers, the fingerprints may take until cloud-init's final stage to appear,
    so the wait goes on, but finished_grace seconds after the console says cloud-init finished without
    them (or host_key_grace seconds after SSH first answered, for a guest that never says so) the boot
    fails with HostKeyMismatch("no host key fingerprints on the console …").
    Without expected_host_keys_from, any host key is accepted and recorded on the session.
    A timeout raises BootTimeout with the last console lines.
    """
    deadline = time.monotonic() + timeout
    answered_at: float | None = None
    finished_at: float | None = None
    last_error = "no answer yet"
    session: GuestSession | None = None
    while session is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BootTimeout(_boot_timeout_message(host, port, user, timeout, last_error, console))
        expected: list[str] | None = None
        if expected_host_keys_from is not None:
            expected = expected_host_keys_from()
            if not expected:
                if answered_at is None and ssh_answers(host, port, timeout=min(5, remaining)):
                    answered_at = time.monotonic()
                if finished_at is None and _CLOUD_INIT_FINISHED.search(_safe_console(console)):
                    finished_at = time.monotonic()
                now = time.monotonic()
                if (answered_at is not None and now - answered_at > host_key_grace) or (
                    finished_at is not None and now - finished_at > finished_grace
                ):
                    raise HostKeyMismatch(
                        f"no host key fingerprints on the console of {host}:{port} "
                        + (
                            f"{finished_grace:.0f}s after cloud-init finished"
                            if finished_at is not None
                            else f"within {host_key_grace:.0f}s of SSH answering"
                        )
                        + ": cannot pin the host key, so no login was attempted"
                    )
                if answered_at is not None:
                    last_error = "SSH answers; waiting for the host key fingerprints on the console"
                time.sleep(min(console_poll_seconds, max(0, deadline - time.monotonic())))
                continue
        try:
            session = connect(host, port, user, key, expected_host_keys=expected, timeout=min(30, remaining))
        except HostKeyMismatch:
            raise
        except (OSError, EOFError, paramiko.SSHException) as exc:
            # refused or reset while booting, no banner yet, or the user not created yet by cloud-init
            last_error = f"{type(exc).__name__}: {exc}".strip()
            time.sleep(min(LOGIN_RETRY_SECONDS, max(0, deadline - time.monotonic())))
    try:
        session.wait_cloud_init(max(1.0, deadline - time.monotonic()))
    except CommandTimeout as exc:
        session.close()
        raise BootTimeout(
            _boot_timeout_message(host, port, user, timeout, "cloud-init still running", console)
        ) from exc
    except BaseException:
        session.close()
        raise
    return session


def _safe_console(console: Callable[[], str]) -> str:
    try:
        return console()
    except Exception as exc:  # the console is a diagnostic: its failure must not hide the real error
        return f"(console unavailable: {exc})"


def _boot_timeout_message(
    host: str, port: int, user: str, timeout: float, last_error: str, console: Callable[[], str]
) -> str:
    lines = _safe_console(console).splitlines()[-CONSOLE_TAIL_LINES:]
    return (
        f"{user}@{host}:{port}: the guest was not ready within {timeout:.0f}s ({last_error}).\n"
        f"Last {len(lines)} console lines:\n" + "\n".join(lines)
    )


_FINGERPRINT_BLOCK = re.compile(
    r"-----BEGIN SSH HOST KEY FINGERPRINTS-----(.*?)-----END SSH HOST KEY FINGERPRINTS-----", re.S
)
_KEYS_BLOCK = re.compile(r"-----BEGIN SSH HOST KEY KEYS-----(.*?)-----END SSH HOST KEY KEYS-----", re.S)
_SHA256 = re.compile(r"\bSHA256:([A-Za-z0-9+/]{43})")
_PUBLIC_KEY = re.compile(r"\b(?:ssh-(?:ed25519|rsa|dss)|ecdsa-sha2-nistp\d+)\s+(AAAA[A-Za-z0-9+/]+=*)")


def host_key_fingerprints_from_console(text: str) -> list[str]:
    """The SHA256 host key fingerprints cloud-init printed on the console (last complete blocks).

    Reads the "-----BEGIN SSH HOST KEY FINGERPRINTS-----" block (lines like
    "256 SHA256:… root@host (ED25519)", plain, "ec2: "-prefixed or syslog-prefixed) and also fingerprints
    the keys of the "-----BEGIN SSH HOST KEY KEYS-----" block. Empty when neither block is complete yet.
    """
    found: list[str] = []
    blocks = _FINGERPRINT_BLOCK.findall(text)
    if blocks:
        found += [f"SHA256:{digest}" for digest in _SHA256.findall(blocks[-1])]
    keys = _KEYS_BLOCK.findall(text)
    if keys:
        for blob in _PUBLIC_KEY.findall(keys[-1]):
            try:
                raw = base64.b64decode(blob, validate=True)
            except ValueError:
                continue
            found.append("SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("="))
    return list(dict.fromkeys(found))


def key_rejected(host: str, port: int, user: str, key: KeyPair, *, timeout: float = 30) -> bool:
    """True when the SSH server answers but refuses key for user (how verify proves the build key is gone)."""
    try:
        session = connect(host, port, user, key, expected_host_keys=None, timeout=timeout)
    except paramiko.AuthenticationException:
        return True
    except (OSError, EOFError, paramiko.SSHException) as exc:
        raise CloudError(f"{host}:{port}: cannot tell whether the key is refused: {exc}") from exc
    session.close()
    return False


def probe_port(host: str, port: int, timeout: float) -> bool:
    """Whether something accepts TCP connections on host:port within timeout (retried until then).

    A NAT forward (QEMU user networking) accepts every connection and closes it at once when the guest
    port is closed, so a connection that ends immediately counts as closed.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5, max(0.5, timeout))) as sock:
                sock.settimeout(1.0)
                try:
                    if sock.recv(1):
                        return True
                except TimeoutError:
                    return True  # still open and silent: a server waiting for us to speak
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(1)


def probe_http(url: str, timeout: float) -> tuple[int, str]:
    """GET url, retried until an HTTP answer arrives or timeout passes; (status, body), any status.

    Raises TimeoutError (an OSError) naming the URL and the last error when nothing answered."""
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while True:
        remaining = deadline - time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=max(1.0, min(10.0, remaining))) as response:  # noqa: S310
                return response.status, response.read(1024 * 1024).decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(1024 * 1024).decode(errors="replace")
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, half an answer: not up yet
            last_error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        if time.monotonic() >= deadline:
            raise TimeoutError(f"GET {url}: no HTTP answer within {timeout:.0f}s ({last_error})")
        time.sleep(1)
