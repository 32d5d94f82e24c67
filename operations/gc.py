"""`kiln gc`: find what builds that are no longer running left behind (open ledger rows, kiln-tagged cloud
resources) and release it, instances first, never touching a running build's resources."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from clouds import registry
from clouds.base import RELEASE_ORDER, TAG_BUILD, Collectable, Resource
from core import settings
from provenance import lineage, store
from provenance.redact import describe

FINISHED = ("succeeded", "failed", "cancelled", "interrupted")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, what: str = "--older-than") -> dt.timedelta:
    """'90s', '30m', '2h', '7d', '1w' (a bare number is seconds); `what` names the option in the error."""
    match = _DURATION.match(text or "")
    if not match:
        raise ValueError(f"{what}: {text!r} is not a duration such as 90s, 30m, 2h, 7d or 1w")
    return dt.timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])


@dataclass
class Leftover:
    """One thing to release: found in the ledger, by its tags, or both."""

    cloud: str
    kind: str
    resource_id: str
    region: str = ""
    build_id: str = ""
    build_status: str = ""  # of the build that made it; "" when the database does not know the build
    created: dt.datetime | None = None
    ledger_rows: list[int] = field(default_factory=list)
    by_tag: bool = False
    action: str = ""  # released | would release | failed: … | skipped: …
    backend: Collectable | None = field(default=None, repr=False)  # the cloud to release it through

    @property
    def source(self) -> str:
        return "+".join(s for s, on in (("ledger", bool(self.ledger_rows)), ("tags", self.by_tag)) if on)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.cloud, self.region, self.kind, self.resource_id


@dataclass
class GcReport:
    leftovers: list[Leftover]
    interrupted: list[str]  # builds marked interrupted by this run
    unreachable: list[str]  # clouds that could not be listed, with why

    @property
    def failed(self) -> list[Leftover]:
        return [item for item in self.leftovers if item.action.startswith("failed")]

    @property
    def nothing_to_do(self) -> bool:
        return not self.leftovers and not self.interrupted and not self.unreachable


class Clouds:
    """The clouds gc looks through, each scope opened once: this host's always, and every recorded target's."""

    def __init__(self, opener: Callable[..., Collectable | None] = registry.reopen) -> None:
        self.opener = opener
        self.by_scope: dict[tuple[str, ...], Collectable] = {}

    def add(self, target_name: str, spec: dict[str, Any]) -> Collectable | None:
        """The cloud of a recorded target (spec: the target as its build recorded it)."""
        cloud = self.opener(str(spec.get("cloud", "")), target=spec, target_name=target_name)
        return self._keep(cloud) if isinstance(cloud, Collectable) else None

    def add_always_collected(self) -> None:
        for cloud in registry.collected_always():
            if isinstance(cloud, Collectable):
                self._keep(cloud)

    def _keep(self, cloud: Collectable) -> Collectable:
        return self.by_scope.setdefault(cloud.scope, cloud)

    def selected(self, only: str | None) -> list[Collectable]:
        """All, or those of one kind (`--cloud ec2`) or one place (`--cloud ENTRY`)."""
        return [c for c in self.by_scope.values() if only is None or only in (c.name, c.region)]


def _running(status: str) -> bool:
    return status not in FINISHED


def find_leftovers(
    *, older_than: dt.timedelta | None = None, cloud: str | None = None, clouds: Clouds | None = None,
    dry_run: bool = False,
) -> GcReport:
    """Mark dead builds interrupted (dry: only find them, writing nothing), then collect what non-running
    builds still hold (nothing is released)."""
    interrupted = store.dead_builds() if dry_run else store.mark_interrupted_builds()
    dead = set(interrupted)
    clouds = clouds or Clouds()
    clouds.add_always_collected()
    for target_name, spec in lineage.recorded_targets():
        try:
            clouds.add(target_name, spec)
        except Exception:  # noqa: S112 - a target this kiln cannot open any more is reported by the ledger pass
            continue
    cutoff = dt.datetime.now(dt.UTC) - older_than if older_than else None
    items: dict[tuple, Leftover] = {}
    _ledger_leftovers(items, clouds, cutoff, cloud, dead)
    unreachable = _tagged_leftovers(items, clouds.selected(cloud), cutoff)
    _attach_builds(items.values(), dead)
    leftovers = []
    for item in items.values():
        if not item.build_status:
            item.action = "skipped: its build is not in this database"
        elif _running(item.build_status):
            continue  # a running build's resources are its own to release
        elif item.kind == "image" and item.build_status == "succeeded" and not item.ledger_rows:
            continue  # the product of a successful build
        leftovers.append(item)
    leftovers.sort(key=lambda i: (RELEASE_ORDER.index(i.kind) if i.kind in RELEASE_ORDER else 99, i.key))
    return GcReport(leftovers, interrupted, unreachable)


def _status(summary: Any, dead: set[str]) -> str:
    """The build's status, "interrupted" for a dead build a dry run did not mark."""
    return "interrupted" if summary.build.id in dead else summary.build.status


def _ledger_leftovers(
    items: dict[tuple, Leftover], clouds: Clouds, cutoff: dt.datetime | None, only: str | None, dead: set[str]
) -> None:
    """Open ledger rows of builds that are not running (a row with no cloud id: the call never returned)."""
    rows = store.open_resources()
    builds = lineage.builds_by_id([row.build_id for row in rows])
    backends: dict[str, Collectable | None] = {}
    for row in rows:
        summary = builds.get(row.build_id)
        if summary is None or _running(_status(summary, dead)):
            continue
        if cutoff is not None and row.created > cutoff:
            continue
        if only is not None and only != row.cloud:
            continue
        if not row.cloud_id:
            items.setdefault(("ledger-intent", row.id), Leftover(row.cloud, row.kind, "", row.region or "",
                                                                row.build_id, _status(summary, dead), row.created,
                                                                [row.id]))  # fmt: skip
            continue
        backend = backends.get(row.build_id)
        if backend is None:
            backend = _backend_for_build(summary, clouds)
            backends[row.build_id] = backend
        # A row without a region is in the backend's own: keyed so, it meets the same resource found by its tags
        region = row.region or (backend.region if backend is not None else "")
        item = items.setdefault(
            (row.cloud, region, row.kind, row.cloud_id),
            Leftover(row.cloud, row.kind, row.cloud_id, region, row.build_id, created=row.created),
        )
        item.ledger_rows.append(row.id)
        item.backend = item.backend or backend


def _backend_for_build(summary: Any, clouds: Clouds) -> Collectable | None:
    spec = _json(summary.recipe.recipe_json).get("targets", {}).get(summary.build.target)
    if spec is None:
        return None
    try:
        return clouds.add(summary.build.target, spec)
    except Exception:  # reported as a failed release naming the target
        return None


def _tagged_leftovers(
    items: dict[tuple, Leftover], backends: Iterable[Collectable], cutoff: dt.datetime | None
) -> list[str]:
    unreachable = []
    for backend in backends:
        try:
            found = backend.owned()
        except Exception as exc:
            unreachable.append(f"{backend.name}: {describe(exc)}")
            continue
        for resource in found:
            build_id = resource.tags.get(TAG_BUILD, "")
            if not build_id:
                continue
            if cutoff is not None and resource.created is not None and resource.created > cutoff:
                continue
            item = items.setdefault(
                (resource.cloud, resource.region, resource.kind, resource.resource_id),
                Leftover(resource.cloud, resource.kind, resource.resource_id, resource.region, build_id,
                         created=resource.created),
            )  # fmt: skip
            item.by_tag = True
            item.build_id = item.build_id or build_id
            item.backend = item.backend or backend
    return unreachable


def _attach_builds(items: Iterable[Leftover], dead: set[str]) -> None:
    items = list(items)
    builds = lineage.builds_by_id([i.build_id for i in items if i.build_id])
    for item in items:
        summary = builds.get(item.build_id)
        item.build_status = _status(summary, dead) if summary else ""


def release_leftovers(report: GcReport, *, dry_run: bool = False) -> GcReport:
    """Release every leftover in order (or say what would be); ledger rows are closed as each goes."""
    for item in report.leftovers:
        if item.action.startswith("skipped"):
            continue
        if dry_run:
            item.action = "would release"
            continue
        item.action = _release(item)
    if not dry_run:
        _remove_debug_dirs(report.leftovers)
    return report


def _release(item: Leftover) -> str:
    if item.resource_id:
        if item.backend is None:
            return f"failed: no backend can reach {item.cloud} for build {item.build_id}"
        region = item.region
        try:
            item.backend.release(Resource(item.cloud, item.kind, item.resource_id, region=region))
        except Exception as exc:
            error = describe(exc)
            for row in item.ledger_rows:
                store.ledger_released(row, error=error)
            return f"failed: {error}"
        if item.kind == "image":
            _mark_image_deleted(item)
    for row in item.ledger_rows:
        store.ledger_released(row)
    return "released" if item.resource_id else "closed (never created)"


def _mark_image_deleted(item: Leftover) -> None:
    row = lineage.find_image_row(item.cloud, item.resource_id, item.region)
    if row is not None:
        store.set_image_status(row, "deleted", reason=f"kiln gc: build {item.build_id} {item.build_status}")


def _remove_debug_dirs(items: list[Leftover]) -> None:
    """Keys written for --on-error abort, and for `kiln shell` while a build was paused, go with the guests they
    opened."""
    for build_id in {i.build_id for i in items if i.action == "released" and i.kind == "instance"}:
        shutil.rmtree(settings.data_dir() / "debug" / build_id, ignore_errors=True)
        shutil.rmtree(settings.data_dir() / "shell" / build_id, ignore_errors=True)


def _json(text: str | None) -> dict[str, Any]:
    return json.loads(text or "{}")
