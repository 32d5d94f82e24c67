"""Cloud backends behind one protocol (clouds/base.py); open_cloud picks the backend a recipe target names."""

from __future__ import annotations

from typing import Any


def open_cloud(target: Any, timeouts: Any = None) -> Any:
    """The backend for a recipe target (kiln.recipe LocalTarget / EC2Target / OpenStackTarget); `timeouts`
    (the recipe's Timeouts) lets a cloud wait as long as the recipe allows."""
    kind = target.cloud
    if kind == "local":
        from clouds.local import LocalCloud

        return LocalCloud(accel=target.accel, memory_mb=target.memory_mb, cpus=target.cpus)
    if kind == "ec2":
        from clouds.ec2 import EC2Cloud

        return EC2Cloud.from_target(target, timeouts)
    raise ValueError(f"cloud kind {kind!r} has no backend in this kiln yet (known: local, ec2)")
