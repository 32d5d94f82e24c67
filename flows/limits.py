"""Per-cloud caps on running VMs, as Prefect global concurrency limits named kiln-vms-<cloud>[-<region>].

Every build holds one slot of its cloud's limit while it has a VM (launch → snapshot → verify's boot), so
however many workers run builds, a cloud never runs more kiln VMs than its limit. The limit must exist: on a
Prefect server a missing one is an error telling the user to run `kiln limits set`; only on the ephemeral
server that a lone `kiln build` starts does kiln create a missing limit with its documented default.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from clouds import registry
from clouds.base import Cloud

PREFIX = "kiln-vms-"
# The slot is leased and renewed in the background while held: a killed worker's slot frees itself within a
# minute (Prefect's shortest lease), not the five minutes of its default.
LEASE_SECONDS = 60
# On the ephemeral server the slots are counted in this process: that server keeps its leases in memory and
# dies with the process, while the slot count sits in the SQLite file every ephemeral server on the host
# shares — a killed `kiln build` would hold its slot there for ever and every later build would wait.
_PROCESS_SLOTS: dict[str, threading.BoundedSemaphore] = {}
_PROCESS_SLOTS_LOCK = threading.Lock()


class LimitMissing(RuntimeError):
    """The cloud has no kiln-vms-* limit on this Prefect server."""


@dataclass(frozen=True)
class Limit:
    name: str
    limit: int
    active_slots: int
    active: bool


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def limit_name(cloud: str, region: str = "") -> str:
    """kiln-vms-local, kiln-vms-ec2-us-east-1, kiln-vms-openstack-<clouds.yaml entry>."""
    return PREFIX + "-".join(_slug(part) for part in (cloud, region) if part)


def limit_name_for(cloud: Cloud) -> str:
    """The limit a cloud's VMs count against: its kind and where it runs them (region, clouds.yaml entry)."""
    return limit_name(cloud.name, cloud.region)


def normalize(cloud: str) -> str:
    """`kiln limits set` takes 'local', 'ec2-us-east-1' or the full 'kiln-vms-…' name."""
    cloud = cloud.strip()
    name = cloud if cloud.startswith(PREFIX) else PREFIX + cloud
    if name == PREFIX or _slug(name) != name:
        raise ValueError(f"{cloud!r}: a limit name is local, ec2-<region> or openstack-<clouds.yaml entry> "
                         "(lowercase letters, digits and dashes)")
    return name


def default_limit(name: str) -> int:
    """The limit kiln sets where none is (the ephemeral server): what the cloud's backend declares, else 1."""
    kind = name.removeprefix(PREFIX).split("-", 1)[0]
    return registry.backend(kind).default_vm_limit() if kind in registry.BACKENDS else 1


def on_ephemeral_server() -> bool:
    """True when no Prefect API is configured: this process talks to a temporary server of its own."""
    from prefect.settings import get_current_settings

    return not get_current_settings().api.url


def set_limit(name: str, limit: int) -> Limit:
    """Create or update one limit; returns it as the server now has it."""
    if limit < 0:
        raise ValueError(f"{name}: the limit must be 0 or more, not {limit}")
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit)
        return _as_limit(client.read_global_concurrency_limit_by_name(name))


def list_limits() -> list[Limit]:
    """kiln's limits on the server, by name."""
    found, offset = [], 0
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_global_concurrency_limits(limit=200, offset=offset)
            found += [_as_limit(each) for each in page if each.name.startswith(PREFIX)]
            if len(page) < 200:
                return sorted(found, key=lambda each: each.name)
            offset += 200


def paused_slots() -> dict[str, int]:
    """Per limit, the slots held by builds paused for hands on their build machine (they hold theirs until resumed
    or timed out)."""
    from provenance import lineage

    held: dict[str, int] = {}
    for summary in lineage.list_builds(status="running", limit=10_000):
        if summary.build.paused_before:
            name = limit_name(summary.build.cloud, summary.build.region)
            held[name] = held.get(name, 0) + 1
    return held


def ensure_default(name: str) -> bool:
    """Create `name` with its default unless it exists; True when created."""
    if _exists(name):
        return False
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=default_limit(name)))
        except ObjectAlreadyExists:  # another build created it meanwhile
            return False
        return True


@contextmanager
def vm_slot(name: str) -> Iterator[None]:
    """Hold one slot of `name` (waiting for a free one); a missing limit is an error, except on the ephemeral
    server, where the default is created first and the slots are counted in this process."""
    if on_ephemeral_server():
        ensure_default(name)
        with _process_slot(name):
            yield
        return
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError

    try:
        # A renewal that fails on a busy server must not kill a build half-way (its VM would be left to gc).
        with concurrency(name, occupy=1, strict=True, lease_duration=LEASE_SECONDS,
                         raise_on_lease_renewal_failure=False):
            yield
    except ConcurrencySlotAcquisitionError:
        if not _exists(name):
            raise LimitMissing(
                f"no concurrency limit {name!r} on the Prefect server: set how many VMs this cloud may run at "
                f"once with `kiln limits set {name.removeprefix(PREFIX)} N` (default {default_limit(name)})"
            ) from None
        raise


@contextmanager
def _process_slot(name: str) -> Iterator[None]:
    """One of the limit's slots among this process's builds (the limit's value as set, else its default)."""
    with _PROCESS_SLOTS_LOCK:
        if name not in _PROCESS_SLOTS:
            with get_client(sync_client=True) as client:
                size = client.read_global_concurrency_limit_by_name(name).limit
            _PROCESS_SLOTS[name] = threading.BoundedSemaphore(max(1, size))
        slots = _PROCESS_SLOTS[name]
    with slots:
        yield


def _exists(name: str) -> bool:
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
    return True


def _as_limit(response) -> Limit:  # noqa: ANN001 - prefect's GlobalConcurrencyLimitResponse
    return Limit(response.name, response.limit, response.active_slots, response.active)
