"""How a cloud call fails: the errors every backend and the machinery under them (sessions, layers, downloads) raise,
each message naming the resource and what to do."""

from __future__ import annotations


class CloudError(RuntimeError):
    """A cloud call failed; the message names the resource and what to do."""


class BootTimeout(CloudError):
    """The guest did not become reachable in time; the message carries the console tail."""


class HostKeyMismatch(CloudError):
    """The guest's SSH host key differs from the one its console announced."""
