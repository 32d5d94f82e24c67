"""Cloud backends behind one protocol (clouds/base.py), one module each, registered in clouds/registry.py."""

from __future__ import annotations

from clouds.registry import open_cloud

__all__ = ["open_cloud"]
