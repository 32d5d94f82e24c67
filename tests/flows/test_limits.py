"""Per-cloud VM limits: names, `kiln limits set|list`, strict slots on a real Prefect server."""

from __future__ import annotations

import contextvars
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clouds import open_cloud
from core.recipe import EC2Target, LocalTarget, OpenStackTarget
from flows.limits import (
    LimitMissing,
    default_limit,
    ensure_default,
    limit_name,
    limit_name_for,
    list_limits,
    normalize,
    on_ephemeral_server,
    vm_slot,
)
from tests.prefect_server import prefect_server, server_env

KILN = Path(sys.executable).with_name("kiln")


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A Prefect server with no kiln limit at all, used by this process through temporary settings."""
    home = tmp_path_factory.mktemp("limits-prefect")
    with prefect_server(home, limits={}) as api_url:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api_url}):
            yield api_url, home


def kiln(home: Path, api_url: str, *args: str) -> subprocess.CompletedProcess:
    env = server_env(home, api_url) | {"KILN_HOME": os.environ["KILN_HOME"]}
    return subprocess.run([str(KILN), "limits", *args], env=env, capture_output=True, text=True, timeout=120)


def test_limit_names_follow_cloud_region_and_clouds_yaml_entry():
    base = {"base": {"image": "x"}, "ssh_user": "debian"}
    def limit_of(target, name):  # noqa: ANN001, ANN202 - the limit of the cloud the target opens
        return limit_name_for(open_cloud(target, target_name=name))

    assert limit_of(LocalTarget(**base), "local") == "kiln-vms-local"
    assert limit_of(EC2Target(region="us-east-1", ssh_cidr="auto", **base), "aws") == "kiln-vms-ec2-us-east-1"
    assert limit_of(OpenStackTarget(flavor="m1", os_cloud="Lab_2", **base), "os") == "kiln-vms-openstack-lab-2"
    assert limit_of(OpenStackTarget(flavor="m1", **base), "sierra") == "kiln-vms-openstack-sierra"
    assert normalize("ec2-eu-west-1") == normalize("kiln-vms-ec2-eu-west-1") == limit_name("ec2", "eu-west-1")
    with pytest.raises(ValueError, match="lowercase"):
        normalize("EC2 us")
    assert default_limit("kiln-vms-local") == max(1, (os.cpu_count() or 2) // 2)


def test_kiln_limits_set_creates_then_updates_and_list_shows_them(bare_server):
    api_url, home = bare_server
    first = kiln(home, api_url, "set", "local", "3")
    assert first.returncode == 0, first.stderr
    assert "kiln-vms-local: 3 VMs at once" in first.stdout
    again = kiln(home, api_url, "set", "ec2-us-east-1", "5")
    assert again.returncode == 0, again.stderr
    updated = kiln(home, api_url, "set", "local", "1")
    assert "kiln-vms-local: 1 VM at once" in updated.stdout
    shown = kiln(home, api_url, "list")
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line.split()[1] for line in shown.stdout.splitlines()[1:] if line.strip()}
    assert rows == {"kiln-vms-ec2-us-east-1": "5", "kiln-vms-local": "1"}
    assert {each.name: each.limit for each in list_limits()} == {"kiln-vms-ec2-us-east-1": 5, "kiln-vms-local": 1}
    bad = kiln(home, api_url, "set", "ec2 us", "2")
    assert bad.returncode == 2 and "lowercase" in bad.stderr


def test_a_missing_limit_is_an_error_that_says_how_to_set_it(bare_server):
    assert not on_ephemeral_server()
    with pytest.raises(LimitMissing, match=r"kiln limits set ec2-ap-south-1 N"), vm_slot("kiln-vms-ec2-ap-south-1"):
        pytest.fail("the body must not run without a limit")


def test_ensure_default_creates_a_missing_limit_once(bare_server):
    assert ensure_default("kiln-vms-openstack-newcomer") is True
    assert ensure_default("kiln-vms-openstack-newcomer") is False
    made = {each.name: each.limit for each in list_limits()}
    assert made["kiln-vms-openstack-newcomer"] == default_limit("kiln-vms-openstack-newcomer") == 4


def test_a_limit_of_one_never_lets_two_holders_in_at_once(bare_server):
    api_url, home = bare_server
    assert kiln(home, api_url, "set", "openstack-serial", "1").returncode == 0
    intervals: list[tuple[float, float]] = []
    lock = threading.Lock()

    def hold() -> None:
        with vm_slot("kiln-vms-openstack-serial"):
            started = time.monotonic()
            time.sleep(1.0)
            with lock:
                intervals.append((started, time.monotonic()))

    threads = [threading.Thread(target=contextvars.copy_context().run, args=(hold,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(intervals) == 3
    ordered = sorted(intervals)
    assert all(later[0] >= earlier[1] for earlier, later in zip(ordered, ordered[1:], strict=False)), ordered


def test_a_killed_holder_frees_its_slot_within_minutes(bare_server):
    api_url, home = bare_server
    assert kiln(home, api_url, "set", "openstack-crash", "1").returncode == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", "from flows.limits import vm_slot\nimport time\n"
         "with vm_slot('kiln-vms-openstack-crash'):\n    print('held', flush=True)\n    time.sleep(600)\n"],
        env=server_env(home, api_url), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.kill()  # SIGKILL: no release, as when a worker host dies
        holder.wait()
    started = time.monotonic()
    with vm_slot("kiln-vms-openstack-crash"):
        waited = time.monotonic() - started
    assert waited < 180, f"the dead holder's slot was released only after {waited:.0f} s"


EPHEMERAL_HOLDERS = """
import json, threading, time
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from flows.limits import vm_slot, ensure_default
ensure_default("kiln-vms-local")
with get_client(sync_client=True) as client:  # a crashed earlier process left its slot taken in the shared file
    client.update_global_concurrency_limit("kiln-vms-local", GlobalConcurrencyLimitUpdate(limit=1, active_slots=1))
intervals, lock = [], threading.Lock()
def hold():
    with vm_slot("kiln-vms-local"):
        started = time.monotonic(); time.sleep(1.0)
        with lock:
            intervals.append((started, time.monotonic()))
threads = [threading.Thread(target=hold) for _ in range(3)]
[t.start() for t in threads]; [t.join(120) for t in threads]
print(json.dumps(sorted(intervals)))
"""


def test_on_the_ephemeral_server_a_slot_left_by_a_dead_process_does_not_block_and_the_cap_holds_in_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    ran = subprocess.run([sys.executable, "-c", EPHEMERAL_HOLDERS], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip

    assert ran.returncode == 0, ran.stderr[-3000:]
    intervals = json.loads(ran.stdout.strip().splitlines()[-1])
    assert len(intervals) == 3
    assert all(later[0] >= earlier[1] for earlier, later in zip(intervals, intervals[1:], strict=False)), intervals
