"""Fault injection on the clouds: EC2 on moto, and OpenStack (real Keystone and Glance; Nova and Neutron the fake of
tests/clouds/openstack_fake.py served over HTTP, in the real Keystone's catalog). A `kiln build` is SIGKILLed at
each of the eight stages, one is SIGINTed after launch, then `kiln gc`.

Every instance is played by one pre-booted QEMU guest (tests/shared_guest.py, routed in the killed process by the
fault plugin), so customize, sanitize and verify run for real over SSH without a boot per build: one boot for the
whole module. The Nova double lives in this process, outside the killed one, so the leftovers survive the kill
and `kiln gc` (another process) finds and releases them through the same HTTP API; its createImage uploads a few
bytes to the real Glance, which is where the server images live.

Per backend, one campaign (a module fixture) runs the nine builds one after another, then ONE `kiln gc` that
reaps every dead build at once; each test then judges one build: killed at its stage, left holding kiln
resources, interrupted at that stage after gc, every ledger row closed, nothing of it left in the cloud. A dead
build is marked interrupted by the next `kiln build` that starts (or by gc, for the last one).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clouds.base import TAG_BUILD, BaseImage
from clouds.ec2 import EC2Cloud
from clouds.local import LocalCloud
from clouds.openstack import OpenStackCloud
from flows import limits
from flows.stages import STAGE_NAMES as STAGES
from provenance import lineage, store
from tests.clouds.conftest import bootstrap_base, cloud  # noqa: F401 - fixtures
from tests.clouds.moto_ec2 import SSM_AL2023
from tests.clouds.openstack_fake import FakeOpenStack, served
from tests.faults.test_faults import KILL_POINT, KILLED, RESULTS, assert_reaped, kiln_build_with_fault, kiln_gc
from tests.flows.conftest import committed_recipe
from tests.openstack_server import OpenStackServers, admin_connection, in_catalog
from tests.shared_guest import ENV, booted

pytest_plugins = ["tests.clouds.openstack_fixtures"]
pytestmark = pytest.mark.vm  # the shared guest

REGION = "us-east-1"
SIGINT = "SIGINT at launch"
# Keep the shared guest reachable by the next build: its host keys and cloud-init state stay (the image audit
# then does not check them; it still checks the build key, machine-id and shell history).
SANITIZE = "sanitize: {disable: [zero-free-space, ssh-hostkeys, cloud-init-state]}"
WITH_INSTANCE = {"launch", "wait_boot", "customize", "sanitize", "snapshot"}  # snapshot: killed once it returned
WITH_IMAGE = {"snapshot", "verify", "register"}
BUILD_GUEST_KINDS = {"ec2": {"instance", "keypair", "security-group"},
                     "openstack": {"instance", "keypair", "security-group", "floating-ip"}}  # fmt: skip


@dataclass
class Outcome:
    """One faulted build: how its process ended, what it held then, and what gc left of it."""

    label: str  # the stage, or SIGINT
    returncode: int
    output: str
    build_id: str = ""
    status_after_kill: str = ""
    held: list[str] = field(default_factory=list)  # its kiln resources in the cloud when the process ended
    left: list[str] = field(default_factory=list)  # … after gc


@dataclass
class Campaign:
    backend: str
    outcomes: dict[str, Outcome]
    gc_output: str
    cloud_after: dict[str, list[str]] = field(default_factory=dict)  # what the fake Nova/Neutron still hold


def newest_build_of(recipe_name: str) -> str:
    found = lineage.list_builds(recipe=recipe_name, limit=1)
    return found[0].build.id if found else ""


def run_campaign(backend: str, recipe: Path, recipe_name: str, target: str, left: Callable[[str], list[str]],
                 env: dict[str, str]) -> Campaign:  # fmt: skip
    """SIGINT after launch, then SIGKILL at each stage in turn; one `kiln gc` at the end."""
    faults = [(SIGINT, "SIGINT:launch:after-launch")]
    faults += [(stage, f"SIGKILL:{stage}:{KILL_POINT.get(stage, 'start')}") for stage in STAGES]
    outcomes: dict[str, Outcome] = {}
    for label, fault in faults:
        before = newest_build_of(recipe_name)
        result = kiln_build_with_fault(recipe, target, fault, timeout=600, env=env)
        outcome = Outcome(label, result.returncode, result.stdout[-3000:] + result.stderr[-5000:])
        outcomes[label] = outcome
        build_id = newest_build_of(recipe_name)
        if build_id == before:
            continue  # no build started: the test says so
        outcome.build_id, outcome.held = build_id, left(build_id)
        outcome.status_after_kill = lineage.get_build(build_id).build.status
        KILLED[build_id] = outcome.held
    gc_output = kiln_gc().stdout
    for outcome in outcomes.values():
        if outcome.build_id:
            outcome.left = left(outcome.build_id)
    return Campaign(backend, outcomes, gc_output)


def judge_sigkill(campaign: Campaign, stage: str) -> None:
    outcome = campaign.outcomes[stage]
    assert outcome.returncode == -9, f"the build was not killed at {stage}:\n{outcome.output}"
    assert outcome.status_after_kill == "running", "killed, nobody has noticed yet"
    RESULTS[(stage, campaign.backend)] = str(len(outcome.left))
    assert_reaped(outcome.build_id, stage, outcome.left)
    kinds = {held.split()[0] for held in outcome.held}
    cloud_kind = "ec2" if campaign.backend == "moto" else campaign.backend
    if stage in WITH_INSTANCE:
        assert BUILD_GUEST_KINDS[cloud_kind] <= kinds, f"the kill left the build guest's resources: {outcome.held}"
    if stage in WITH_IMAGE:
        assert "image" in kinds, f"the kill left the image to reap: {outcome.held}"
    if stage == "fetch_base":
        assert outcome.held == [], "nothing is made before launch"
    else:
        rows = gc_rows(campaign.gc_output, outcome.build_id)
        assert rows and all(row[-1] in ("released", "closed (never created)") for row in rows), campaign.gc_output
        released = [(row[2], row[3]) for row in rows if row[3] != "-"]
        assert len(released) == len(set(released)), f"gc lists each resource once: {campaign.gc_output}"


def gc_rows(gc_output: str, build_id: str) -> list[list[str]]:
    """`kiln gc`'s table rows of one build: cloud, region, kind, id, build, build status, found in, action."""
    rows = [[cell.strip() for cell in line.strip("│ ").split("│")] for line in gc_output.splitlines() if "│" in line]
    return [row for row in rows if len(row) == 8 and row[4] == build_id[:8]]


def judge_sigint(campaign: Campaign) -> None:
    outcome = campaign.outcomes[SIGINT]
    assert outcome.returncode == 130, outcome.output
    build = lineage.get_build(outcome.build_id).build
    assert build.status == "cancelled"
    assert STAGES.index(build.stage) < STAGES.index("snapshot"), f"Ctrl-C stopped the build at {build.stage}"
    assert store.open_resources(outcome.build_id) == []
    assert outcome.held == [], "Ctrl-C released everything in-process, before any gc"
    assert outcome.build_id[:8] not in campaign.gc_output, "gc found nothing of it"
    RESULTS[(SIGINT, campaign.backend)] = str(len(outcome.left))
    assert outcome.left == []


@contextmanager
def vm_slots(name: str, slots: int) -> Iterator[None]:
    """The played instances are no VMs, and a killed build's slot stays taken until its lease runs out (a
    minute): give the campaign enough slots not to wait for those leases, then put the limit back."""
    [previous] = [each.limit for each in limits.list_limits() if each.name == name]
    limits.set_limit(name, slots)
    try:
        yield
    finally:
        limits.set_limit(name, previous)


@pytest.fixture(scope="module")
def shared_guest(cloud: LocalCloud, bootstrap_base: BaseImage, tmp_path_factory: pytest.TempPathFactory,  # noqa: F811
                 ) -> Iterator[dict[str, str]]:  # fmt: skip
    """The one guest every EC2 and OpenStack instance of this module is; the environment that routes to it."""
    with booted(cloud, bootstrap_base, tmp_path_factory.mktemp("shared-guest")) as description:
        yield {ENV: str(description)}


# ---------------------------------------------------------------------------------------------------- moto


def ec2_left(endpoint: str) -> Callable[[str], list[str]]:
    ec2 = EC2Cloud(REGION, endpoint_url=endpoint)
    return lambda build_id: [f"{r.kind} {r.resource_id}" for r in ec2.owned({TAG_BUILD: build_id})]


@pytest.fixture(scope="module")
def moto_campaign(moto_server: str, prefect_api: str, shared_guest: dict[str, str],  # noqa: F811
                  tmp_path_factory: pytest.TempPathFactory) -> Campaign:  # fmt: skip
    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST"), timeout=30)
    recipe = committed_recipe(tmp_path_factory.mktemp("moto-faults"), f"""name: faults-ec2
version: 1.0.0
targets:
  ec2:
    region: {REGION}
    endpoint_url: {moto_server}
    base: {{ssm_parameter: {SSM_AL2023}}}
    ssh_user: debian
    ssh_cidr: 127.0.0.0/8
scripts: [{{inline: 'true', name: nothing}}]
{SANITIZE}
verify: [{{port: {{port: 22}}}}]
""")
    with vm_slots(limits.limit_name("ec2", REGION), 20):
        return run_campaign("moto", recipe, "faults-ec2", "ec2", ec2_left(moto_server), shared_guest)


def test_sigint_on_moto_cleans_up_in_process_and_gc_finds_nothing(moto_campaign: Campaign) -> None:
    judge_sigint(moto_campaign)


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_on_moto_then_gc_leaves_nothing_and_the_build_interrupted(stage: str, moto_campaign: Campaign,
                                                                          ) -> None:  # fmt: skip
    judge_sigkill(moto_campaign, stage)


# ----------------------------------------------------------------------------------------------- OpenStack


class GlanceBackedNova:
    """The fake Nova's createImage makes a real Glance image (a few bytes: nothing boots it) with the properties
    kiln asked for, as Nova's snapshot does."""

    def __init__(self, servers: OpenStackServers, work: Path) -> None:
        self.glance = admin_connection(servers)
        self.bits = work / "disk.raw"
        self.bits.write_bytes(b"kiln fault-injection test image\n" * 64)

    def create_image(self, name: str, properties: dict[str, str], wait: bool = False) -> str:
        image = self.glance.image.create_image(
            name, filename=str(self.bits), disk_format="raw", container_format="bare", allow_duplicates=True,
            validate_checksum=False, wait=wait, **properties,
        )  # fmt: skip
        return image.id

    def delete_images(self, name: str = "", recipe: str = "") -> None:
        for image in list(self.glance.image.images()):
            if (name and image.name == name) or (recipe and (image.properties or {}).get("kiln_recipe") == recipe):
                self.glance.image.delete_image(image, ignore_missing=True)


def openstack_left(servers: OpenStackServers) -> Callable[[str], list[str]]:
    openstack = OpenStackCloud(servers.admin_cloud, config_files=[str(servers.clouds_yaml)])
    return lambda build_id: [f"{r.kind} {r.resource_id}" for r in openstack.owned({TAG_BUILD: build_id})]


@pytest.fixture(scope="module")
def openstack_campaign(openstack_test_servers: OpenStackServers, prefect_api: str,  # noqa: F811
                       shared_guest: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Campaign:  # fmt: skip
    work = tmp_path_factory.mktemp("openstack-faults")
    nova = GlanceBackedNova(openstack_test_servers, work)
    fake = FakeOpenStack(compute_url="", network_url="")  # served() says where
    fake.on_create_image = lambda server, name, metadata: nova.create_image(name, metadata)
    base = nova.create_image("faults-openstack-base", {}, wait=True)
    recipe = committed_recipe(work, f"""name: faults-openstack
version: 1.0.0
targets:
  sierra:
    cloud: openstack
    os_cloud: {openstack_test_servers.admin_cloud}
    base: {{image: {base}}}
    ssh_user: debian
    flavor: m1.small
    network: private
    floating_ip: true
    ssh_cidr: 127.0.0.1/32
scripts: [{{inline: 'true', name: nothing}}]
{SANITIZE}
verify: [{{port: {{port: 22}}}}]
""")
    env = {**shared_guest, "OS_CLIENT_CONFIG_FILE": str(openstack_test_servers.clouds_yaml)}
    with ExitStack() as stack:
        stack.enter_context(served(fake))
        stack.enter_context(in_catalog(openstack_test_servers, {"compute": fake.compute_url,
                                                                "network": fake.network_url}))  # fmt: skip
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        patch.setenv("OS_CLIENT_CONFIG_FILE", env["OS_CLIENT_CONFIG_FILE"])  # kiln gc's too
        stack.enter_context(vm_slots(limits.limit_name("openstack", openstack_test_servers.admin_cloud), 20))
        stack.callback(nova.glance.close)
        stack.callback(nova.delete_images, name="faults-openstack-base")
        stack.callback(nova.delete_images, recipe="faults-openstack")  # after a failure: no stray for others
        campaign = run_campaign("openstack", recipe, "faults-openstack", "sierra",
                                openstack_left(openstack_test_servers), env)  # fmt: skip
        campaign.cloud_after = fake.leftovers()
        return campaign


def test_sigint_on_openstack_cleans_up_in_process_and_gc_finds_nothing(openstack_campaign: Campaign) -> None:
    judge_sigint(openstack_campaign)


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_on_openstack_then_gc_leaves_nothing_and_the_build_interrupted(stage: str,
                                                                               openstack_campaign: Campaign,
                                                                               ) -> None:  # fmt: skip
    judge_sigkill(openstack_campaign, stage)


def test_after_gc_the_openstack_compute_and_network_hold_nothing_of_kiln(openstack_campaign: Campaign) -> None:
    assert openstack_campaign.cloud_after == {}, "no server, key pair, security group or floating IP is left"
