"""Which module is which cloud: the one place kiln maps a cloud kind to its backend, and the ways everyone else
opens a cloud — for a recipe target (a build), for what a recorded build made (kiln cleanup, gc, revocation), and
for a publication. A backend module is imported when its kind is first asked for (boto3 and openstacksdk take a
while to import)."""

from __future__ import annotations

import importlib
from typing import Any

from clouds.base import Backend, Cloud, Collectable
from core.recipe import CLOUD_KINDS, CloudTarget, Timeouts, recorded_target

# kind -> the module declaring BACKEND. Adding a cloud: its module, one line here, its target model in core/recipe.py.
BACKENDS: dict[str, str] = {
    "local": "clouds.local",
    "ec2": "clouds.ec2",
    "openstack": "clouds.openstack",
}


class UnknownCloud(ValueError):
    """A cloud kind no backend is registered for."""


def backend(kind: str) -> Backend:
    """The registration of the cloud `kind`."""
    if kind not in BACKENDS:
        raise UnknownCloud(f"cloud kind {kind!r} has no backend in this kiln (known: {', '.join(BACKENDS)})")
    declared: Backend = importlib.import_module(BACKENDS[kind]).BACKEND
    if declared.kind != kind:
        raise UnknownCloud(f"{BACKENDS[kind]} declares the {declared.kind!r} cloud, not {kind!r}")
    return declared


def backends() -> list[Backend]:
    """Every registered backend, in registration order."""
    return [backend(kind) for kind in BACKENDS]


def open_cloud(target: CloudTarget, timeouts: Timeouts | None = None, *, target_name: str = "") -> Cloud:
    """The cloud a recipe target builds on; `timeouts` (the recipe's) lets it wait as long as the recipe allows,
    `target_name` is the target's name in the recipe (an OpenStack target without os_cloud uses it)."""
    chosen = backend(target.cloud)
    if not isinstance(target, chosen.target_model):
        raise UnknownCloud(f"a {type(target).__name__} is not a target of the {chosen.kind} cloud")
    return chosen.open_target(target, timeouts, target_name)


def reopen(kind: str, *, target: dict[str, Any] | None = None, target_name: str = "", region: str = "") -> Cloud | None:
    """The cloud that holds what a recorded build made, opened the one way kiln does it (kiln cleanup, gc,
    revocation): the build's recipe target as it was recorded (rules added since for new builds do not stop the
    clean-up) when it is of this kind and reaches `region`; else the kind's cloud at `region` on its own; None
    when a place alone cannot reach it (an EC2 region names no account)."""
    chosen = backend(kind)
    if target is not None and target.get("cloud") == kind:
        cloud = chosen.open_target(recorded_target(target), None, target_name)
        if not region or (isinstance(cloud, Collectable) and cloud.reaches(region)):
            return cloud
    return chosen.open_place(region) if chosen.open_place is not None else None


def open_destination(
    to: str, *, region: str | None = None, endpoint_url: str | None = None, profile: str | None = None
) -> Cloud:
    """`kiln publish --to TO` without a recipe: the cloud kind TO, or the place TO of the cloud whose places users
    name (a clouds.yaml entry). ValueError when no cloud takes a publication that way."""
    if to in BACKENDS:
        chosen = backend(to)
    else:
        naming = [each for each in backends() if each.names_places]
        if not naming:
            raise ValueError(f"--to {to!r} is no cloud kind ({', '.join(BACKENDS)})")
        chosen = naming[0]
    if chosen.open_destination is None:
        raise ValueError(f"the {chosen.kind} cloud takes no published image")
    return chosen.open_destination(to, region=region, endpoint_url=endpoint_url, profile=profile)


def collected_always() -> list[Cloud]:
    """The clouds kiln gc looks through even when no recorded build names them (this host's)."""
    return [each.open_place("") for each in backends() if each.collected_always and each.open_place is not None]


def cloud_errors(kind: str) -> tuple[type[Exception], ...]:
    """What the cloud's SDK raises when the cloud refuses or fails a call."""
    return backend(kind).errors


if tuple(BACKENDS) != CLOUD_KINDS:
    raise ImportError(f"clouds/registry.py registers {', '.join(BACKENDS)} but core/recipe.py's targets are of "
                      f"{', '.join(CLOUD_KINDS)}: every target model needs its backend and every backend its model")
