"""Scale-out: a Prefect server on PostgreSQL, two process workers, four builds (EC2 on moto and local QEMU) with
provenance on PostgreSQL shared by both workers. Every build succeeds, runs spread over both workers, no cloud
ever runs more kiln VMs than its limit (from the recorded step times), every provenance row is there, and
`kiln status` shows a running build's worker, host and stage.

VM budget: the local build boots two guests (build, verify); the five EC2 builds run on one pre-booted guest
(tests/shared_guest.py), taking turns under kiln-vms-ec2-us-east-1=1, in parallel with the local one.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from clouds.base import BaseImage
from clouds.local import LocalCloud
from flows.status import builds_of_run
from provenance import lineage, store
from tests.clouds.conftest import bootstrap_base, cloud, our_qemu_processes  # noqa: F401 - fixtures
from tests.clouds.moto_ec2 import SSM_AL2023
from tests.conftest import REPO
from tests.flows.conftest import KILN, committed_recipe
from tests.prefect_server import PREFECT, prefect_server, server_env, stop_group
from tests.provenance.conftest import _create_database, postgres_server  # noqa: F401 - fixture
from tests.shared_guest import ENV, booted

pytestmark = [pytest.mark.vm, pytest.mark.postgres]

STAGES = ["fetch_base", "launch", "wait_boot", "customize", "sanitize", "snapshot", "verify", "register"]
LIMITS = {"kiln-vms-local": 1, "kiln-vms-ec2-us-east-1": 1}
WORKERS = ("worker-a", "worker-b")
LOCAL_BUILDS, EC2_BUILDS = 1, 3  # CI's VM budget: a local build boots two guests, ~3 min under TCG
HELLO = (REPO / "recipes/scripts/hello.sh").read_text()
VERIFY = """verify:
  - command: {run: cat /etc/kiln-hello, expect: hello from kiln}
  - port: {port: 22}
"""


def local_recipe(name: str) -> str:
    return f"""name: {name}
version: 1.0.0
targets:
  local: {{base: {{bootstrap: debian-bookworm}}, ssh_user: debian, memory_mb: 1024}}
scripts: [scripts/hello.sh]
sanitize: {{disable: [zero-free-space]}}
{VERIFY}"""


def ec2_recipe(name: str, endpoint: str) -> str:
    # The shared guest must stay reachable by the next build: keep its host keys and cloud-init state.
    return f"""name: {name}
version: 1.0.0
targets:
  ec2:
    region: us-east-1
    endpoint_url: {endpoint}
    base: {{ssm_parameter: {SSM_AL2023}}}
    ssh_user: debian
    ssh_cidr: 127.0.0.0/8
scripts: [scripts/hello.sh]
sanitize: {{disable: [zero-free-space, ssh-hostkeys, cloud-init-state]}}
{VERIFY}"""


def recipes(tmp_path: Path, endpoint: str) -> list[tuple[Path, str]]:
    """All the recipes committed in one repository; returns (path, target) per build."""
    first = committed_recipe(tmp_path, local_recipe("scale-local-0"), {"scripts/hello.sh": HELLO})
    repo, builds = first.parent, [(first, "local")]
    for index in range(1, LOCAL_BUILDS):
        (repo / f"local-{index}.yaml").write_text(local_recipe(f"scale-local-{index}"))
        builds.append((repo / f"local-{index}.yaml", "local"))
    for index in range(EC2_BUILDS):
        (repo / f"ec2-{index}.yaml").write_text(ec2_recipe(f"scale-ec2-{index}", endpoint))
        builds.append((repo / f"ec2-{index}.yaml", "ec2"))
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "scale recipes"], cwd=repo, check=True)
    return builds


@pytest.fixture
def shared_guest(cloud: LocalCloud, bootstrap_base: BaseImage, tmp_path: Path) -> Iterator[Path]:  # noqa: F811
    """One booted guest playing every EC2 instance, described in a JSON file for the workers."""
    with booted(cloud, bootstrap_base, tmp_path) as description:
        yield description


@contextmanager
def worker(name: str, env: dict[str, str], logs: Path) -> Iterator[subprocess.Popen]:
    """`prefect worker start --pool kiln` at most three runs at a time, stopped (with its runs) by process group."""
    log = (logs / f"{name}.log").open("w")
    proc = subprocess.Popen(
        [str(PREFECT), "worker", "start", "--pool", "kiln", "--name", name, "--limit", "3"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        stop_group(proc, grace=60)
        log.close()


def deploy(api_url: str) -> None:
    """The kiln work pool and build-image, entrypoint tests.scale.entry:build_recipe (kiln's flow behind the seam)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="kiln", type="process"))
        flow_id = client.create_flow_from_name("build-recipe")
        client.create_deployment(flow_id=flow_id, name="build-image", entrypoint="tests.scale.entry:build_recipe",
                                 work_pool_name="kiln", tags=["kiln"], job_variables={"working_dir": str(REPO)})


def peak_concurrency(intervals: list[tuple[dt.datetime, dt.datetime]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = current = 0
    for _, delta in events:  # at a tie, -1 sorts first: a slot handed over is not an overlap
        current += delta
        peak = max(peak, current)
    return peak


def vm_intervals(detail) -> list[tuple[dt.datetime, dt.datetime]]:  # noqa: ANN001 - lineage.BuildDetail
    """When a build had a VM: launch started → snapshot finished, and verify (its own boot)."""
    steps = {s.stage: s for s in detail.steps if s.status == "succeeded"}
    return [(steps["launch"].started, steps["snapshot"].finished), (steps["verify"].started, steps["verify"].finished)]


def test_four_builds_spread_over_two_workers_within_per_cloud_limits(
    tmp_path, moto, shared_guest, postgres_server, monkeypatch, capsys  # noqa: F811
):
    kiln_db = _create_database(postgres_server, "kiln_scale")
    prefect_db = _create_database(postgres_server, "prefect_scale").replace("postgresql+psycopg2", "postgresql+asyncpg")
    builds = recipes(tmp_path, moto)
    home = tmp_path / "prefect"
    home.mkdir()
    db_env = {"PREFECT_API_DATABASE_CONNECTION_URL": prefect_db}
    with ExitStack() as stack:
        api_url = stack.enter_context(prefect_server(home, limits=LIMITS, env=db_env, timeout=240))
        from prefect.settings import PREFECT_API_URL, temporary_settings

        stack.enter_context(temporary_settings({PREFECT_API_URL: api_url}))
        deploy(api_url)
        base_env = server_env(home, api_url) | {"KILN_DATABASE_URL": kiln_db, ENV: str(shared_guest),
                                                "PREFECT_WORKER_QUERY_SECONDS": "2"}  # fmt: skip
        homes = {name: tmp_path / f"kiln-{name}" for name in WORKERS}  # a KILN_HOME each, as on two hosts
        for name in WORKERS:
            stack.enter_context(worker(name, base_env | {"KILN_HOME": str(homes[name])}, tmp_path))
        run_ids = submit(builds)
        states, status_rows = wait(run_ids, base_env | {"KILN_HOME": str(tmp_path / "kiln-cli")}, timeout=1500)

    monkeypatch.setenv("KILN_DATABASE_URL", kiln_db)
    assert all(state == "COMPLETED" for state in states.values()), (states, worker_tails(tmp_path))
    summaries = lineage.list_builds(limit=100)
    assert len(summaries) == len(builds)
    details = [lineage.get_build(s.build.id) for s in summaries]
    per_worker = Counter(json.loads(d.build.parameters_json)["worker"] for d in details)
    per_cloud: dict[str, list] = {}
    for detail in details:
        assert detail.build.status == "succeeded", (detail.build.id, detail.build.error)
        assert [(s.stage, s.status) for s in detail.steps] == [(s, "succeeded") for s in STAGES]
        assert {p.name for p in detail.probes} == {"command cat /etc/kiln-hello", "port :22", "build key rejected"}
        assert all(p.passed for p in detail.probes)
        assert [i.image.kind for i in detail.images] == ["built"]
        assert store.open_resources(detail.build.id) == []
        name = "kiln-vms-" + detail.build.cloud + (f"-{detail.build.region}" if detail.build.region else "")
        per_cloud.setdefault(name, []).extend(vm_intervals(detail))
    peaks = {name: peak_concurrency(intervals) for name, intervals in per_cloud.items()}
    with capsys.disabled():
        print(f"\nscale-out: {len(details)} builds; runs per worker: {dict(sorted(per_worker.items()))}; "
              f"peak concurrent VMs per cloud: {peaks} (limits {LIMITS})")
    assert set(per_worker) == set(WORKERS), "both workers ran builds"
    assert set(peaks) == set(LIMITS)
    assert all(peaks[name] <= LIMITS[name] for name in peaks), peaks
    assert status_rows, "kiln status showed the running builds"
    assert {row["worker"] for row in status_rows} <= set(WORKERS)
    assert all(row["deployment"] == "build-image" and row["stage"] in STAGES and row["host"] for row in status_rows), (
        status_rows)
    assert [len(builds_of_run(run_id, running_only=False)) for run_id in run_ids] == [1] * len(builds), (
        "each worker run is linked to its build, as nightly-rebuild reads it")
    for name in WORKERS:
        assert our_qemu_processes(homes[name]) == {}, "no guest left running"


def submit(builds: list[tuple[Path, str]]) -> list[str]:
    from prefect.deployments import run_deployment

    return [
        str(run_deployment("build-recipe/build-image", timeout=0, as_subflow=False,
                           parameters={"request": {"recipe": str(path), "targets": [target]}}).id)
        for path, target in builds
    ]  # fmt: skip


def wait(run_ids: list[str], cli_env: dict[str, str], timeout: float) -> tuple[dict[str, str], list[dict]]:
    """Poll until every run is final; once two builds run at once, ask `kiln status` what runs where."""
    from prefect.client.orchestration import get_client

    deadline, status_rows = time.monotonic() + timeout, []
    with get_client(sync_client=True) as client:
        while True:
            runs = {rid: client.read_flow_run(rid) for rid in run_ids}
            if all(r.state and r.state.is_final() for r in runs.values()) or time.monotonic() > deadline:
                return {rid: r.state.type.value if r.state else "NONE" for rid, r in runs.items()}, status_rows
            if not status_rows and sum(bool(r.state and r.state.is_running()) for r in runs.values()) >= 2:
                shown = subprocess.run([str(KILN), "status", "--json"], env=cli_env,
                                       capture_output=True, text=True, timeout=120)  # fmt: skip
                assert shown.returncode == 0, shown.stderr
                status_rows = [row for row in json.loads(shown.stdout) if row["build_id"]]
            time.sleep(3)


def worker_tails(logs: Path) -> str:
    return "\n".join(f"--- {name}\n" + (logs / f"{name}.log").read_text()[-3000:] for name in WORKERS)
