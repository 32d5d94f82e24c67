"""Tell people a build finished: one message per build to every apprise URL of KILN_NOTIFY and the recipe's
`notify`, success or failure. A message that cannot be delivered is logged; it never fails the build."""

from __future__ import annotations

import logging

import apprise

from core import settings
from core.recipe import masked_notify_url, notify_url_problem
from provenance import lineage
from provenance.lineage import BuildDetail
from provenance.redact import describe, redact

log = logging.getLogger("kiln.notify")


def notify_settings_problem() -> str | None:
    """Why a KILN_NOTIFY URL cannot be used (checked before a build starts), or None."""
    for url in settings.notify_urls():
        if problem := notify_url_problem(url):
            scheme = url.split("://", 1)[0] if "://" in url else "(no scheme)"
            return f"{settings.NOTIFY_ENV}: {scheme}://… {problem}"  # the rest of the URL may be a secret
    return None


def notification_urls(recipe_urls: list[str]) -> list[str]:
    """The host's URLs (KILN_NOTIFY) and the recipe's, each once."""
    return list(dict.fromkeys([*settings.notify_urls(), *recipe_urls]))


def notify_finished_build(build_id: str, recipe_urls: list[str]) -> None:
    """Send the finished build's message to every URL (the host's and the recipe's `notify`); log, never raise,
    what could not be sent."""
    urls = notification_urls(recipe_urls)
    if not urls:
        return
    short_id = build_id[:8]
    try:
        detail = lineage.get_build(build_id)
        if detail is None:
            return
        title, body = build_message(detail)
        kind = apprise.NotifyType.SUCCESS if detail.build.status == "succeeded" else apprise.NotifyType.FAILURE
    except Exception as exc:  # reading provenance failed: say so, the build's own outcome stands
        _warn(f"build {short_id}: no notification sent: {describe(exc)}")
        return
    for url in urls:
        _send(url, title, body, kind, short_id)


def _send(url: str, title: str, body: str, kind: apprise.NotifyType, build: str) -> None:
    shown = masked_notify_url(url)
    try:
        sender = apprise.Apprise()
        if not sender.add(url):
            raise ValueError("apprise cannot send to this URL")
        delivered = sender.notify(title=title, body=body, notify_type=kind, body_format=apprise.NotifyFormat.TEXT)
    except Exception as exc:
        _warn(f"build {build}: could not notify {shown}: {describe(exc)}")
        return
    if not delivered:
        _warn(f"build {build}: could not notify {shown} (the service refused it or did not answer)")


def _warn(message: str) -> None:
    from prefect import get_run_logger  # here: kiln build checks KILN_NOTIFY before Prefect is imported
    from prefect.exceptions import MissingContextError

    try:
        get_run_logger().warning("%s", message)
    except MissingContextError:
        log.warning("%s", message)


def build_message(detail: BuildDetail) -> tuple[str, str]:
    """Title and text of a finished build's message: what was built and where, or where and why it failed."""
    build, recipe = detail.build, detail.recipe
    what = f"{recipe.name} {recipe.version}"
    commit = f"{recipe.commit[:12] if recipe.commit else 'none (not in git)'}{' (dirty)' if recipe.dirty else ''}"
    lines = [f"recipe: {what} ({recipe.path}), commit {commit}",
             f"target: {build.target} on {build.cloud}{' ' + build.region if build.region else ''}",
             f"build: {build.id}"]  # fmt: skip
    if build.status == "succeeded":
        built = [i.image for i in detail.images]
        title = f"kiln: {what} built for {build.target}: {', '.join(i.image_id for i in built if i.kind == 'built')}"
        lines.append("images:")
        lines += [f"  {i.image_id} ({i.kind}) at {_location(i)}" for i in built]
        if built and built[0].valid_until is not None:
            lines.append(f"valid until: {built[0].valid_until.isoformat(timespec='seconds')}")
        lines.append("probes:")
        lines += [f"  {'passed' if p.passed else 'FAILED'}  {p.name}" for p in detail.probes] or ["  (none)"]
    else:
        title = f"kiln: {what} {build.status.upper()} for {build.target} at {build.stage or 'start'}"
        lines.append(f"failed stage: {build.stage or '(before the first stage)'}")
        lines.append(f"reason: {redact(build.error or build.status)}")
    lines.append(f"details: kiln show {build.id}{'' if build.status == 'succeeded' else ' --logs'}")
    return title, "\n".join(lines)


def _location(image) -> str:  # noqa: ANN001 - a provenance Image row
    if image.path:
        return image.path
    return f"{image.cloud} {image.region}".strip()
