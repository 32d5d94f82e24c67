"""A real Prefect server on 127.0.0.1 for benches and tests: started in its own PREFECT_HOME, stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PREFECT = Path(sys.executable).with_name("prefect")
# The per-cloud VM limits the benches' and tests' targets count against, set as a team would with `kiln limits set`.
VM_LIMITS = {"kiln-vms-local": 1, "kiln-vms-ec2-us-east-1": 2, "kiln-vms-openstack-kiln-test": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@contextmanager
def prefect_server(
    home: Path, timeout: float = 120, limits: dict[str, int] | None = None, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Yield the API URL of a fresh server with kiln's VM limits (VM_LIMITS unless given); its process group
    is killed afterwards whatever happened. `env` adds settings (e.g. a PostgreSQL database for the server)."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    log = (home / "server.log").open("w")
    proc = subprocess.Popen(
        [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**server_env(home), **(env or {})}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        for name, limit in (VM_LIMITS if limits is None else limits).items():
            create_limit(api_url, name, limit)
        yield api_url
    finally:
        stop_group(proc, grace=20)
        log.close()


def stop_group(proc: subprocess.Popen, *, grace: float) -> None:
    """Stop a process started with start_new_session and everything it started: TERM, then KILL after `grace` s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def create_limit(api_url: str, name: str, limit: int) -> None:
    """A global concurrency limit, straight through the REST API (no Prefect settings needed)."""
    body = json.dumps({"name": name, "limit": limit}).encode()
    request = urllib.request.Request(f"{api_url}/v2/concurrency_limits/", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status in (200, 201), response.read()
