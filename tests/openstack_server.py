"""A real Keystone and Glance from PyPI for tests: installed once into their own cached venv, configured with
sqlite under a temporary directory, served by uwsgi on 127.0.0.1, and stopped by PID.

`python -m tests.openstack_server install` creates the venv (the Makefile's `make test` runs it first);
the session fixture installs it too when it is missing, so a bare `pytest` works on a clean machine."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REQUIREMENTS = Path(__file__).resolve().parent / "openstack" / "requirements.txt"
ADMIN_PASSWORD = "kiln-test-admin"  # a throwaway server's bootstrap password, never a real credential
REGION = "RegionOne"


def venv_dir() -> Path:
    """The cached venv, named after the pinned requirements so a new pin gets a fresh venv."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]
    return cache / "kiln-test" / f"openstack-venv-{digest}"


def ensure_venv() -> Path:
    """Install Keystone, Glance and uwsgi (pinned) into the cached venv unless already there; returns it."""
    venv = venv_dir()
    done = venv / ".installed"
    if done.exists():
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions installing at once wait for each other
        if done.exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
        done.write_text(f"installed in {time.monotonic() - started:.0f}s\n")
    return venv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class OpenStackServers:
    """Where the test cloud answers, and the clouds.yaml entries that reach it."""

    keystone_url: str
    glance_url: str
    clouds_yaml: Path
    admin_cloud: str  # clouds.yaml entry: admin in the admin project
    partner_cloud: str  # clouds.yaml entry: a member of the partner project (for image sharing)
    partner_project_id: str
    workdir: Path
    pids: tuple[int, ...]
    seconds_to_start: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "clouds_yaml", Path(self.clouds_yaml))
        object.__setattr__(self, "workdir", Path(self.workdir))
        object.__setattr__(self, "pids", tuple(self.pids))

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "clouds_yaml": str(self.clouds_yaml), "workdir": str(self.workdir)})


KEYSTONE_CONF = """\
[DEFAULT]
log_file = {work}/keystone.log
[database]
connection = sqlite:///{work}/keystone.db
[token]
provider = fernet
[fernet_tokens]
key_repository = {work}/fernet-keys
[fernet_receipts]
key_repository = {work}/fernet-receipts
[credential]
key_repository = {work}/credential-keys
"""

GLANCE_CONF = """\
[DEFAULT]
log_file = {work}/glance.log
enabled_backends = fs:file
enabled_import_methods = [glance-direct]
show_multiple_locations = false
[database]
connection = sqlite:///{work}/glance.db
[glance_store]
default_backend = fs
[fs]
filesystem_store_datadir = {work}/images
[os_glance_staging_store]
filesystem_store_datadir = {work}/staging
[os_glance_tasks_store]
filesystem_store_datadir = {work}/tasks
[paste_deploy]
flavor = keystone
[keystone_authtoken]
www_authenticate_uri = {keystone}
auth_url = {keystone}
auth_type = password
project_domain_name = Default
user_domain_name = Default
project_name = admin
username = admin
password = {password}
[oslo_policy]
enforce_new_defaults = true
enforce_scope = true
[oslo_concurrency]
lock_path = {work}/locks
"""


def _uwsgi(venv: Path, port: int, module: str, env: dict[str, str], log: Path, pidfile: Path) -> int:
    args = [
        str(venv / "bin" / "uwsgi"),
        "--http-socket", f"127.0.0.1:{port}",
        "--module", module,
        "--master", "--processes", "1", "--threads", "4", "--enable-threads", "--lazy-apps",
        "--add-header", "Connection: close",  # keystoneauth reuses connections uwsgi's http-socket closes
        "--http-chunked-input", "--http-raw-body", "--buffer-size", "65535",
        "--die-on-term", "--need-app", "--pidfile", str(pidfile),
        "--home", str(venv),
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def _wait_http(url: str, pid: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise RuntimeError(f"{url}: server exited; log:\n{log.read_text()[-3000:]}") from None
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: no answer within {timeout:.0f}s; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def _stop(pid: int) -> None:
    """SIGTERM the uwsgi master's process group, SIGKILL after 15 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done == pid:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _run(venv: Path, tool: str, *args: str, env: dict[str, str]) -> None:
    result = subprocess.run([str(venv / "bin" / tool), *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args[:3])} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def _write_clouds_yaml(path: Path, keystone: str, partner_password: str) -> None:
    def entry(user: str, password: str, project: str) -> str:
        return (
            f"    auth:\n      auth_url: {keystone}\n      username: {user}\n      password: {password}\n"
            f"      project_name: {project}\n      user_domain_name: Default\n      project_domain_name: Default\n"
            f"    region_name: {REGION}\n    identity_api_version: 3\n    image_api_version: 2\n"
        )

    path.write_text(
        "clouds:\n"
        f"  kiln-test:\n{entry('admin', ADMIN_PASSWORD, 'admin')}"
        f"  kiln-test-partner:\n{entry('partner', partner_password, 'partner')}"
    )


@contextlib.contextmanager
def openstack_servers(work: Path, timeout: float = 180) -> Iterator[OpenStackServers]:
    """Keystone and Glance, bootstrapped and registered in the catalog; both stopped by PID afterwards."""
    venv = ensure_venv()
    started = time.monotonic()
    for sub in ("fernet-keys", "fernet-receipts", "credential-keys", "images", "staging", "tasks", "locks", "glance"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    keystone_port, glance_port = free_port(), free_port()
    keystone, glance = f"http://127.0.0.1:{keystone_port}/v3", f"http://127.0.0.1:{glance_port}"
    keystone_conf = work / "keystone.conf"
    keystone_conf.write_text(KEYSTONE_CONF.format(work=work))
    (work / "glance" / "glance-api.conf").write_text(
        GLANCE_CONF.format(work=work, keystone=f"http://127.0.0.1:{keystone_port}", password=ADMIN_PASSWORD)
    )
    shutil.copy(venv / "etc" / "glance" / "glance-api-paste.ini", work / "glance" / "glance-api-paste.ini")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OS_")},
        "OS_KEYSTONE_CONFIG_FILES": str(keystone_conf),
        "OS_GLANCE_CONFIG_DIR": str(work / "glance"),
        "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    }
    kconf = ["--config-file", str(keystone_conf)]
    user = [f"--keystone-user={os.getuid()}", f"--keystone-group={os.getgid()}"]
    _run(venv, "keystone-manage", *kconf, "db_sync", env=env)
    _run(venv, "keystone-manage", *kconf, "fernet_setup", *user, env=env)
    _run(venv, "keystone-manage", *kconf, "credential_setup", *user, env=env)
    _run(venv, "keystone-manage", *kconf, "bootstrap", "--bootstrap-password", ADMIN_PASSWORD,
         "--bootstrap-admin-url", keystone, "--bootstrap-public-url", keystone,
         "--bootstrap-internal-url", keystone, "--bootstrap-region-id", REGION, env=env)  # fmt: skip
    _run(venv, "glance-manage", "--config-dir", str(work / "glance"), "db_sync", env=env)
    pids: list[int] = []
    try:
        pids.append(_uwsgi(venv, keystone_port, "keystone.wsgi.api:application", env, work / "keystone-uwsgi.log",
                           work / "keystone.pid"))
        _wait_http(keystone, pids[0], work / "keystone-uwsgi.log", timeout)
        pids.append(_uwsgi(venv, glance_port, "glance.wsgi.api:application", env, work / "glance-uwsgi.log",
                           work / "glance.pid"))
        _wait_http(f"{glance}/versions", pids[1], work / "glance-uwsgi.log", timeout)
        partner_password = "kiln-test-partner"
        clouds_yaml = work / "clouds.yaml"
        _write_clouds_yaml(clouds_yaml, keystone, partner_password)
        partner_project = _register_catalog(clouds_yaml, glance, partner_password)
        yield OpenStackServers(
            keystone_url=keystone,
            glance_url=glance,
            clouds_yaml=clouds_yaml,
            admin_cloud="kiln-test",
            partner_cloud="kiln-test-partner",
            partner_project_id=partner_project,
            workdir=work,
            pids=tuple(pids),
            seconds_to_start=time.monotonic() - started,
        )
    finally:
        for pid in reversed(pids):
            _stop(pid)


def _register_catalog(clouds_yaml: Path, glance: str, partner_password: str) -> str:
    """The image service in Keystone's catalog, and a partner project with a member user; returns its id."""
    import openstack.config
    import openstack.connection

    config = openstack.config.OpenStackConfig(config_files=[str(clouds_yaml)])
    conn = openstack.connection.Connection(config=config.get_one("kiln-test"))
    try:
        service = conn.identity.create_service(name="glance", type="image", description="Image")
        for interface in ("public", "internal", "admin"):
            conn.identity.create_endpoint(service_id=service.id, interface=interface, url=glance, region_id=REGION)
        project = conn.identity.create_project(name="partner", domain_id="default")
        partner = conn.identity.create_user(name="partner", password=partner_password, domain_id="default",
                                            default_project_id=project.id)
        member = conn.identity.find_role("member", ignore_missing=False)
        conn.identity.assign_project_role_to_user(project, partner, member)
        return project.id
    finally:
        conn.close()


def admin_connection(servers: OpenStackServers) -> Any:
    """An openstacksdk Connection as the test cloud's admin."""
    import openstack.config
    import openstack.connection

    config = openstack.config.OpenStackConfig(config_files=[str(servers.clouds_yaml)], load_envvars=False)
    return openstack.connection.Connection(config=config.get_one(servers.admin_cloud))


@contextlib.contextmanager
def in_catalog(servers: OpenStackServers, endpoints: dict[str, str]) -> Iterator[OpenStackServers]:
    """Services (type -> public URL, e.g. the fake Nova and Neutron) in the real Keystone's catalog for the body;
    removed afterwards, so later tests see a Glance-only cloud again."""
    conn = admin_connection(servers)
    services = []
    try:
        for kind, url in endpoints.items():
            service = conn.identity.create_service(name=f"fake-{kind}", type=kind)
            services.append(service)
            conn.identity.create_endpoint(service_id=service.id, interface="public", url=url, region_id=REGION)
        yield servers
    finally:
        for service in services:
            for endpoint in conn.identity.endpoints(service_id=service.id):
                conn.identity.delete_endpoint(endpoint)
            conn.identity.delete_service(service)
        conn.close()


def serve(state: Path) -> None:
    """Run the servers until interrupted, describing them in `state` (JSON) for KILN_TEST_OPENSTACK_SERVERS."""
    import tempfile

    with openstack_servers(Path(tempfile.mkdtemp(prefix="kiln-openstack-"))) as servers:
        state.write_text(servers.to_json())
        print(f"serving: KILN_TEST_OPENSTACK_SERVERS={state} (Ctrl-C stops)", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
        finally:
            state.unlink(missing_ok=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["install"]:
        print(ensure_venv())
    elif len(sys.argv) == 3 and sys.argv[1] == "serve":
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        serve(Path(sys.argv[2]))
    else:
        sys.exit("usage: python -m tests.openstack_server install | serve STATE.json")
