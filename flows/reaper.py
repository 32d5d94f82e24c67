"""The reaper: `kiln gc` as a function for the CLI and as a scheduled Prefect flow (deployment `reaper`)."""

from __future__ import annotations

import datetime as dt

from prefect import flow, get_run_logger

from operations.gc import GcReport, find_leftovers, parse_duration, release_leftovers


def collect_garbage(
    *, dry_run: bool = False, older_than: dt.timedelta | None = None, cloud: str | None = None
) -> GcReport:
    """Mark dead builds interrupted, then release what non-running builds left behind (dry: write nothing,
    say what would be done)."""
    return release_leftovers(find_leftovers(older_than=older_than, cloud=cloud, dry_run=dry_run), dry_run=dry_run)


@flow(name="reaper")
def reaper(older_than: str = "0s", cloud: str | None = None, dry_run: bool = False) -> list[dict]:
    """Release every kiln resource whose build is no longer running; returns one line per resource."""
    log = get_run_logger()
    report = collect_garbage(dry_run=dry_run, older_than=parse_duration(older_than) or None, cloud=cloud)
    for build_id in report.interrupted:
        log.info("build %s: its process is gone; %s", build_id,
                 "would be marked interrupted" if dry_run else "marked interrupted")
    for problem in report.unreachable:
        log.warning("could not list %s", problem)
    lines = [
        {"cloud": i.cloud, "region": i.region, "kind": i.kind, "id": i.resource_id, "build": i.build_id,
         "found_in": i.source, "action": i.action}
        for i in report.leftovers
    ]  # fmt: skip
    for line in lines:
        log.info("%(cloud)s %(kind)s %(id)s of build %(build)s (%(found_in)s): %(action)s", line)
    if report.failed:
        raise RuntimeError(f"{len(report.failed)} resources could not be released: "
                           + "; ".join(f"{i.kind} {i.resource_id}: {i.action}" for i in report.failed))  # fmt: skip
    return lines
