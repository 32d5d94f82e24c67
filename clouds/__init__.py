"""Cloud backends behind one protocol (clouds/base.py); open_cloud picks the backend a recipe target names."""

from __future__ import annotations

from typing import Any


def open_cloud(target: Any, timeouts: Any = None, *, target_name: str | None = None) -> Any:
    """The backend for a recipe target (spec.recipe LocalTarget / EC2Target / OpenStackTarget); `timeouts`
    (the recipe's Timeouts) lets a cloud wait as long as the recipe allows; `target_name` is the clouds.yaml
    entry of an OpenStack target that sets no os_cloud."""
    kind = target.cloud
    if kind == "local":
        from clouds.local import LocalCloud

        return LocalCloud(
            accel=target.accel, memory_mb=target.memory_mb, cpus=target.cpus, disk_size_gb=target.disk_size_gb,
            qcow2_compression=target.qcow2_compression, build_in=target.build_in,
        )
    if kind == "ec2":
        from clouds.ec2 import EC2Cloud

        return EC2Cloud.from_target(target, timeouts)
    if kind == "openstack":
        from clouds.openstack import OpenStackCloud

        if not (target.os_cloud or target_name):
            raise ValueError("an openstack target needs os_cloud, or its target name as the clouds.yaml entry")
        return OpenStackCloud.from_target(target, target.os_cloud or target_name, timeouts)
    raise ValueError(f"cloud kind {kind!r} has no backend in this kiln yet (known: local, ec2, openstack)")
