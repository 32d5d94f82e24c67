"""The EC2 cloud (boto3): AMIs from an instance built over SSH, copied to other regions, shared, cleaned without leaks.

Credentials come from boto3's standard chain (the target's `profile`, the environment, an instance role);
kiln never reads, stores or logs them. `endpoint_url` points every client at an EC2/S3-compatible endpoint.

Who may reach the build instance (its security group's source CIDR), in order:
  1. the target's `ssh_cidr`: a CIDR (IPv4 goes in IpRanges, IPv6 in Ipv6Ranges), or `auto`: this machine's
     public address as the lookup URL answers it (checkip.amazonaws.com by default), as /32 or /128, the way
     Packer's temporary_security_group_source_public_ip does;
  2. with `ssh_interface: private`, the CIDR of the instance's VPC (the builder runs inside it);
  3. nothing else: a public build without ssh_cidr is refused (the recipe's validation refuses it first), never
     opened to the world.

Everything kiln creates carries the kiln:* tags at creation (TagSpecifications), so `kiln gc` finds it by tag
even when the ledger row was never completed. Two tags are applied right after creation instead, because the
API cannot set them earlier: the snapshots behind an AMI (create_image reports them once the image is
available) and copies in other regions (tags are copied explicitly after copy_image).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
import logging
import math
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from clouds import qemu
from clouds.base import (
    TAG_BUILD,
    Backend,
    BaseImage,
    CloudError,
    FileDigests,
    ImageRef,
    Instance,
    KeyPair,
    NoLedger,
    PublishLedger,
    Resource,
    StopResult,
)
from clouds.ssh import CONSOLE_POLL_SECONDS
from core import settings
from core.recipe import BaseSpec, EC2Target, Timeouts

log = logging.getLogger(__name__)

SSH_CIDR_AUTO = "auto"
PUBLIC_IP_TIMEOUT_SECONDS = 10
TAG_STATUS = "kiln:status"
TAG_REVOKED_REASON = "kiln:revoked-reason"
MAX_TAG_VALUE = 256  # EC2's limit on a tag value's length
GONE = {  # error codes meaning "it is not there": a delete of it has nothing left to do
    "InvalidInstanceID.NotFound",
    "InvalidKeyPair.NotFound",
    "InvalidGroup.NotFound",
    "InvalidAMIID.NotFound",
    "InvalidAMIID.Unavailable",
    "InvalidSnapshot.NotFound",
}
IMPORT_DONE = "completed"
IMPORT_FAILED = ("deleted", "deleting", "error")


def error_code(exc: BaseException) -> str:
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, botocore.exceptions.ClientError) else ""


def tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def tag_dict(tags: Iterable[dict[str, str]] | None) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in tags or ()}


def tag_filters(tags: dict[str, str] | None) -> list[dict[str, Any]]:
    """Filters for resources kiln made: carrying the build tag, and every given tag."""
    filters: list[dict[str, Any]] = [{"Name": "tag-key", "Values": [TAG_BUILD]}]
    filters += [{"Name": f"tag:{key}", "Values": [value]} for key, value in (tags or {}).items()]
    return filters


def decode_console(output: str | bytes | None) -> str:
    """EC2 documents console output as base64; some endpoints (and SDK layers) hand back text. Accept both."""
    if not output:
        return ""
    raw = output.encode() if isinstance(output, str) else output
    compact = b"".join(raw.split())
    try:
        decoded = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return raw.decode(errors="replace")
    text = decoded.decode(errors="replace")
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return text if text and printable / len(text) > 0.9 else raw.decode(errors="replace")


def public_address(
    url: str, timeout: float = PUBLIC_IP_TIMEOUT_SECONDS
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """This machine's public address as `url` answers it (plain text, like https://checkip.amazonaws.com): what
    Packer's temporary_security_group_source_public_ip does. The unspecified address is refused."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            answer = response.read(200).decode("ascii", errors="replace").strip()
    except (OSError, ValueError) as exc:
        raise CloudError(f"ssh_cidr auto: cannot look up this machine's public address at {url}: {exc}") from exc
    try:
        address = ipaddress.ip_address(answer)
    except ValueError:
        raise CloudError(f"ssh_cidr auto: {url} answered {answer[:60]!r}, not an IP address") from None
    if address.is_unspecified:
        raise CloudError(f"ssh_cidr auto: {url} answered {address}, the unspecified address")
    return address


def parse_time(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


class EC2Cloud:
    """AWS EC2 (or a compatible endpoint) through boto3: one home region, copies to `regions`."""

    name = "ec2"
    console_poll_seconds = CONSOLE_POLL_SECONDS  # an API call each time, and EC2's console lags minutes anyway

    def __init__(
        self,
        region: str,
        *,
        profile: str | None = None,
        endpoint_url: str | None = None,
        instance_type: str = "t3.small",
        subnet_id: str | None = None,
        vpc_id: str | None = None,
        ssh_interface: str = "public",
        ssh_cidr: str | None = None,
        public_ip_url: str | None = None,
        regions: Iterable[str] = (),
        share_with: Iterable[str] = (),
        disk_size_gb: int | None = None,
        boot_timeout: float = 900,
        image_timeout: float = 1800,
        poll_seconds: float = 15,
        group_delete_timeout: float = 600,
    ) -> None:
        if ssh_interface not in ("public", "private"):
            raise ValueError(f"ssh_interface must be public or private, not {ssh_interface!r}")
        self.region = region
        self.profile = profile
        self.endpoint_url = endpoint_url
        self.instance_type = instance_type
        self.subnet_id = subnet_id
        self.vpc_id = vpc_id
        self.ssh_interface = ssh_interface
        self.ssh_cidr = ssh_cidr
        self.public_ip_url = public_ip_url
        self._auto_cidr: str | None = None
        self.regions = [r for r in dict.fromkeys(regions) if r != region]
        self.share_with = list(dict.fromkeys(share_with))
        self.disk_size_gb = disk_size_gb
        self.boot_timeout = boot_timeout
        self.image_timeout = image_timeout
        self.poll_seconds = poll_seconds
        self.group_delete_timeout = group_delete_timeout
        self._session = boto3.session.Session(profile_name=profile, region_name=region)
        self._clients: dict[tuple[str, str, str], Any] = {}
        self._lock = threading.Lock()  # boto3 sessions may not create clients from several threads at once

    @classmethod
    def from_target(cls, target: EC2Target, timeouts: Timeouts | None = None) -> EC2Cloud:
        """The cloud for a recipe's EC2Target (and its Timeouts, when given)."""
        extra = {"boot_timeout": timeouts.boot, "image_timeout": timeouts.image} if timeouts is not None else {}
        return cls(
            target.region,
            profile=target.profile,
            endpoint_url=target.endpoint_url,
            instance_type=target.instance_type,
            subnet_id=target.subnet_id,
            vpc_id=target.vpc_id,
            ssh_interface=target.ssh_interface,
            ssh_cidr=target.ssh_cidr,
            public_ip_url=target.public_ip_url,
            regions=target.regions,
            share_with=target.share_with,
            disk_size_gb=target.disk_size_gb,
            **extra,
        )

    # -- clients -------------------------------------------------------------------------------------------

    def client(self, service: str, region: str | None = None, *, purpose: str = "") -> Any:
        """A cached boto3 client for a service in a region; `purpose` gives a separate client (VM Import)."""
        key = (service, region or self.region, purpose)
        with self._lock:
            if key not in self._clients:
                self._clients[key] = self._session.client(
                    service,
                    region_name=key[1],
                    endpoint_url=self.endpoint_url,
                    config=Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=10, read_timeout=60),
                )
            return self._clients[key]

    def ec2(self, region: str | None = None) -> Any:
        return self.client("ec2", region)

    def vm_import_client(self, region: str | None = None) -> Any:
        """The client that calls VM Import (import_snapshot): its own, as it needs the vmimport service role."""
        return self.client("ec2", region, purpose="vm-import")

    def _wait(self, waiter_name: str, timeout: float, region: str | None = None, **params: Any) -> None:
        delay = max(0.1, min(self.poll_seconds, timeout / 2))
        waiter = self.ec2(region).get_waiter(waiter_name)
        try:
            waiter.wait(**params, WaiterConfig={"Delay": delay, "MaxAttempts": max(1, math.ceil(timeout / delay))})
        except botocore.exceptions.WaiterError as exc:
            where = region or self.region
            raise CloudError(f"{waiter_name} not reached within {timeout:.0f}s in {where}: {exc}") from exc

    # -- base images ---------------------------------------------------------------------------------------

    def resolve_base(self, spec: BaseSpec, ssh_user: str) -> BaseImage:
        """An AMI by id, by name pattern and owners (the newest wins) or by SSM parameter; digest: id@creation date."""
        kind = getattr(spec, "kind", None)
        if kind == "image":
            image, origin = self._image_by_id(spec.image), {"image": spec.image}
        elif kind == "name":
            owners = [str(owner) for owner in spec.owners or ["self"]]
            image, origin = self._newest_image_named(spec.name, owners), {"name": spec.name, "owners": owners}
        elif kind == "ssm_parameter":
            image_id = self._ssm_value(spec.ssm_parameter)
            image, origin = self._image_by_id(image_id), {"ssm_parameter": spec.ssm_parameter}
        else:
            raise CloudError(f"base: {kind} bases are not available on ec2 (use image, name or ssm_parameter)")
        if image.get("State") != "available":
            raise CloudError(f"base {image['ImageId']} in {self.region} is {image.get('State')}, not available")
        created = str(image.get("CreationDate", ""))
        return BaseImage(
            cloud=self.name,
            image_id=image["ImageId"],
            digest=f"{image['ImageId']}@{created}",
            ssh_user=ssh_user,
            name=image.get("Name", ""),
            region=self.region,
            details={
                "creation_date": created,
                "owner": image.get("OwnerId", ""),
                "architecture": image.get("Architecture", ""),
                "root_device_name": image.get("RootDeviceName", ""),
                "boot_mode": image.get("BootMode", ""),
                "origin": origin,
            },
        )

    def _image_by_id(self, image_id: str, region: str | None = None) -> dict[str, Any]:
        try:
            images = self.ec2(region).describe_images(ImageIds=[image_id])["Images"]
        except botocore.exceptions.ClientError as exc:
            raise CloudError(f"AMI {image_id} in {region or self.region}: {exc}") from exc
        if not images:
            raise CloudError(f"AMI {image_id} does not exist in {region or self.region} (deregistered?)")
        return images[0]

    def _newest_image_named(self, pattern: str, owners: list[str]) -> dict[str, Any]:
        filters = [{"Name": "name", "Values": [pattern]}, {"Name": "state", "Values": ["available"]}]
        images = self.ec2().describe_images(Owners=owners, Filters=filters)["Images"]
        if not images:
            raise CloudError(f"no available AMI named {pattern!r} owned by {', '.join(owners)} in {self.region}")
        return max(images, key=lambda image: (str(image.get("CreationDate", "")), image["ImageId"]))

    def _ssm_value(self, path: str) -> str:
        try:
            value = self.client("ssm").get_parameter(Name=path)["Parameter"]["Value"]
        except botocore.exceptions.ClientError as exc:
            raise CloudError(f"SSM parameter {path} in {self.region}: {exc}") from exc
        if not value.startswith("ami-"):
            raise CloudError(f"SSM parameter {path} holds {value!r}, not an AMI id")
        return value

    # -- key pairs and security groups ---------------------------------------------------------------------

    def import_key(self, key: KeyPair, tags: dict[str, str]) -> str:
        """Import the public half; returns the key pair id (the private half never leaves this process)."""
        response = self.ec2().import_key_pair(
            KeyName=key.name,
            PublicKeyMaterial=key.public_key.encode(),
            TagSpecifications=[{"ResourceType": "key-pair", "Tags": tag_list({**tags, "Name": key.name})}],
        )
        return response["KeyPairId"]

    def delete_keypair(self, key: KeyPair) -> None:
        self.ec2().delete_key_pair(KeyName=key.name)

    def open_ports(self, name: str, ports: list[int], tags: dict[str, str]) -> str:
        """A security group letting the builder's CIDR reach `ports` over TCP; returns its id."""
        vpc = self._vpc()
        cidr = self._source_cidr(vpc)
        ec2 = self.ec2()
        group_id = ec2.create_security_group(
            GroupName=name,
            Description=f"kiln build {tags.get(TAG_BUILD, '')}: ports {', '.join(map(str, ports))} from {cidr}",
            VpcId=vpc["VpcId"],
            TagSpecifications=[{"ResourceType": "security-group", "Tags": tag_list({**tags, "Name": name})}],
        )["GroupId"]
        ranges = ({"Ipv6Ranges": [{"CidrIpv6": cidr, "Description": "kiln builder"}]} if ":" in cidr
                  else {"IpRanges": [{"CidrIp": cidr, "Description": "kiln builder"}]})
        try:
            ec2.authorize_security_group_ingress(
                GroupId=group_id,
                IpPermissions=[{"IpProtocol": "tcp", "FromPort": port, "ToPort": port, **ranges} for port in ports],
            )  # fmt: skip
        except BaseException:
            self._delete_group(group_id, self.region)  # the caller never learns the id: undo here
            raise
        return group_id

    def _vpc(self) -> dict[str, Any]:
        ec2 = self.ec2()
        vpc_id = self.vpc_id
        if vpc_id is None and self.subnet_id:
            vpc_id = ec2.describe_subnets(SubnetIds=[self.subnet_id])["Subnets"][0]["VpcId"]
        if vpc_id:
            return ec2.describe_vpcs(VpcIds=[vpc_id])["Vpcs"][0]
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise CloudError(f"{self.region} has no default VPC: set vpc_id or subnet_id in the target")
        return vpcs[0]

    def _source_cidr(self, vpc: dict[str, Any]) -> str:
        if self.ssh_cidr == SSH_CIDR_AUTO:
            if self._auto_cidr is None:
                address = public_address(self.public_ip_url or settings.public_ip_url())
                self._auto_cidr = f"{address}/{address.max_prefixlen}"
                log.info("ssh_cidr auto: this machine's public address is %s", address)
            return self._auto_cidr
        if self.ssh_cidr:
            return self.ssh_cidr
        if self.ssh_interface == "private":
            return vpc["CidrBlock"]
        raise CloudError(
            f"ec2 target in {self.region} has no ssh_cidr and connects over its public address: set ssh_cidr to "
            "the CIDR kiln connects from, or to auto (kiln never opens a build's ports to the whole internet)"
        )

    # -- instances -----------------------------------------------------------------------------------------

    def launch(
        self,
        base: BaseImage,
        key: KeyPair,
        user_data: str,
        tags: dict[str, str],
        ports: list[int],
        *,
        role: str = "build",
        firewall: str | None = None,
    ) -> Instance:
        """run_instances with the key, user-data and tags on instance and volumes; returns once it is running."""
        name = f"kiln-{role}-{tags.get(TAG_BUILD, '')[:8]}".rstrip("-")
        named = tag_list({**tags, "Name": name})
        params: dict[str, Any] = {
            "ImageId": base.image_id,
            "InstanceType": self.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "KeyName": key.name,
            "UserData": user_data,
            "ClientToken": uuid.uuid4().hex,
            "InstanceInitiatedShutdownBehavior": "stop",
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": named},
                {"ResourceType": "volume", "Tags": named},
            ],
        }
        groups = [firewall] if firewall else []
        if self.subnet_id:
            params["NetworkInterfaces"] = [
                {"DeviceIndex": 0, "SubnetId": self.subnet_id, "Groups": groups,
                 "AssociatePublicIpAddress": self.ssh_interface == "public"}
            ]  # fmt: skip
        elif groups:
            params["SecurityGroupIds"] = groups
        if self.disk_size_gb:
            root = base.details.get("root_device_name") or "/dev/xvda"
            params["BlockDeviceMappings"] = [
                {"DeviceName": root, "Ebs": {"VolumeSize": self.disk_size_gb, "DeleteOnTermination": True}}
            ]
        instance_id = self.ec2().run_instances(**params)["Instances"][0]["InstanceId"]
        try:
            self._wait("instance_running", self.boot_timeout, InstanceIds=[instance_id])
            described = self._describe_instance(instance_id)
            host = self._ssh_address(described)
        except BaseException:
            self._terminate(instance_id, self.region)  # the caller never learns the id: undo here
            raise
        log.info("launched %s (%s) from %s in %s; ssh at %s", instance_id, role, base.image_id, self.region, host)
        return Instance(
            cloud=self.name,
            instance_id=instance_id,
            name=name,
            ssh_user=base.ssh_user,
            tags=dict(tags),
            details={
                "region": self.region,
                "host": host,
                "public_ip": described.get("PublicIpAddress", ""),
                "private_ip": described.get("PrivateIpAddress", ""),
                "image_id": base.image_id,
                "key_name": key.name,
                "security_group": firewall or "",
                "role": role,
            },
        )

    def _describe_instance(self, instance_id: str, region: str | None = None) -> dict[str, Any]:
        reservations = self.ec2(region).describe_instances(InstanceIds=[instance_id])["Reservations"]
        return reservations[0]["Instances"][0]

    def _ssh_address(self, described: dict[str, Any]) -> str:
        if self.ssh_interface == "private":
            address = described.get("PrivateIpAddress")
        else:
            address = described.get("PublicIpAddress")
        if not address:
            raise CloudError(
                f"{described['InstanceId']} has no {self.ssh_interface} IP address: use a subnet that assigns "
                f"public addresses or set ssh_interface: private (and build from inside the VPC)"
            )
        return address

    def endpoint(self, instance: Instance, port: int) -> tuple[str, int]:
        """The instance's public or private address (ssh_interface) and the port itself: no forwarding on EC2."""
        return instance.details["host"], port

    def console(self, instance: Instance) -> str:
        """The serial console EC2 captured so far (may lag minutes behind the guest); '' before there is any."""
        region = instance.details.get("region") or self.region
        try:
            output = self.ec2(region).get_console_output(InstanceId=instance.instance_id).get("Output")
        except botocore.exceptions.ClientError as exc:
            log.debug("console of %s: %s", instance.instance_id, exc)
            return ""
        return decode_console(output)

    def stop(self, instance: Instance, timeout: float = 120) -> StopResult:
        """stop_instances (an ACPI shutdown) and wait; after `timeout` a forced stop, which the result reports."""
        region = instance.details.get("region") or self.region
        started = time.monotonic()
        ec2 = self.ec2(region)
        ec2.stop_instances(InstanceIds=[instance.instance_id])
        try:
            self._wait("instance_stopped", timeout, region, InstanceIds=[instance.instance_id])
            result = StopResult(forced=False, seconds=time.monotonic() - started, detail="clean shutdown")
        except CloudError:
            log.warning("%s did not stop within %.0fs: forcing it (the disk may be inconsistent)",
                        instance.instance_id, timeout)  # fmt: skip
            ec2.stop_instances(InstanceIds=[instance.instance_id], Force=True)
            self._wait("instance_stopped", max(timeout, 300), region, InstanceIds=[instance.instance_id])
            result = StopResult(forced=True, seconds=time.monotonic() - started,
                                detail=f"forced after ignoring the shutdown for {timeout:.0f}s")  # fmt: skip
        instance.details["stop"] = {"forced": result.forced, "seconds": round(result.seconds, 1)}
        return result

    def terminate(self, instance: Instance) -> None:
        self._terminate(instance.instance_id, instance.details.get("region") or self.region)

    def _terminate(self, instance_id: str, region: str) -> None:
        try:
            self.ec2(region).terminate_instances(InstanceIds=[instance_id])
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) not in GONE:
                raise
        log.info("terminated %s in %s", instance_id, region)

    # -- images --------------------------------------------------------------------------------------------

    def snapshot(self, instance: Instance, name: str, tags: dict[str, str], formats: list[str]) -> ImageRef:
        """create_image from the stopped instance, tagged; waits until available. (formats apply to local only.)"""
        region = instance.details.get("region") or self.region
        state = self._describe_instance(instance.instance_id, region)["State"]["Name"]
        if state != "stopped":
            raise CloudError(f"{instance.instance_id} is {state}: stop it before the snapshot")
        image_id = self.ec2(region).create_image(
            InstanceId=instance.instance_id,
            Name=name,
            Description=f"kiln build {tags.get(TAG_BUILD, '')}",
            NoReboot=True,
            TagSpecifications=[{"ResourceType": "image", "Tags": tag_list({**tags, "Name": name})}],
        )["ImageId"]
        return self._finish_image(image_id, name, region, {**tags, "Name": name}, self.image_timeout)

    def _finish_image(self, image_id: str, name: str, region: str, tags: dict[str, str], timeout: float) -> ImageRef:
        """Wait for a new AMI, tag its snapshots; on any failure the AMI and its snapshots are deleted."""
        try:
            self._wait("image_available", timeout, region, ImageIds=[image_id])
            described = self._image_by_id(image_id, region)
            snapshots = snapshot_ids(described)
            self.ec2(region).create_tags(Resources=[image_id, *snapshots], Tags=tag_list(tags))
        except BaseException:
            self.delete_image(ImageRef(cloud=self.name, image_id=image_id, name=name, region=region))
            raise
        log.info("image %s (%s) available in %s", image_id, name, region)
        return ImageRef(
            cloud=self.name,
            image_id=image_id,
            name=name,
            region=region,
            details={
                "snapshots": snapshots,
                "creation_date": str(described.get("CreationDate", "")),
                "architecture": described.get("Architecture", ""),
                "root_device_name": described.get("RootDeviceName", ""),
            },
        )

    def tag_image(self, image: ImageRef, tags: dict[str, str]) -> None:
        """Tag the AMI and the snapshots behind it."""
        region = image.region or self.region
        snapshots = snapshot_ids(self._image_by_id(image.image_id, region))
        self.ec2(region).create_tags(Resources=[image.image_id, *snapshots], Tags=tag_list(tags))

    def revoke_image(self, image: ImageRef, reason: str) -> None:
        """Tag the AMI revoked (with the reason) and deprecate it: EC2 then hides it from launch wizards and
        from DescribeImages of other accounts, while instances already running on it keep working."""
        region = image.region or self.region
        self.tag_image(image, {TAG_STATUS: "revoked", TAG_REVOKED_REASON: reason[:MAX_TAG_VALUE]})
        # EC2 refuses a deprecation time in the past and rounds seconds to the minute: the next whole minute.
        now = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
        self.ec2(region).enable_image_deprecation(ImageId=image.image_id, DeprecateAt=now + dt.timedelta(minutes=1))

    def set_expiry(self, image: ImageRef, valid_until: dt.datetime) -> dt.datetime:
        """The AMI's DeprecationTime at the end of its validity (EC2 keeps whole minutes: the next one); EC2 then
        hides it from launch wizards and from other accounts' listings. Returns the time set."""
        at = valid_until.astimezone(dt.UTC)
        if at.second or at.microsecond:
            at = at.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        self.ec2(image.region or self.region).enable_image_deprecation(ImageId=image.image_id, DeprecateAt=at)
        return at

    def delete_image(self, image: ImageRef) -> None:
        """Deregister the AMI, then delete its snapshots; what is gone already is success."""
        region = image.region or self.region
        ec2 = self.ec2(region)
        snapshots = list(image.details.get("snapshots", []))
        try:
            found = ec2.describe_images(ImageIds=[image.image_id])["Images"]
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) not in GONE:
                raise
            found = []
        for described in found:
            snapshots += [s for s in snapshot_ids(described) if s not in snapshots]
            try:
                ec2.deregister_image(ImageId=image.image_id)
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) not in GONE:
                    raise
        for snapshot_id in snapshots:
            self._delete_snapshot(snapshot_id, region)
        log.info("deleted image %s and snapshots %s in %s", image.image_id, snapshots, region)

    def _delete_snapshot(self, snapshot_id: str, region: str) -> None:
        try:
            self.ec2(region).delete_snapshot(SnapshotId=snapshot_id)
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) not in GONE:
                raise

    def copy_image(self, image: ImageRef, region: str, tags: dict[str, str]) -> ImageRef:
        """copy_image into `region`, the tags copied explicitly, waited until available."""
        source_region = image.region or self.region
        named = {**tags, "Name": image.name}
        copy_id = self.ec2(region).copy_image(
            SourceImageId=image.image_id,
            SourceRegion=source_region,
            Name=image.name,
            Description=f"kiln build {tags.get(TAG_BUILD, '')}: copy of {image.image_id} from {source_region}",
            ClientToken=f"kiln-{image.image_id}-{region}",  # a retried copy does not make a second AMI
            TagSpecifications=[{"ResourceType": "image", "Tags": tag_list(named)}],
        )["ImageId"]
        copy = self._finish_image(copy_id, image.name, region, named, self.image_timeout)
        log.info("copied %s from %s to %s as %s", image.image_id, source_region, region, copy_id)
        return copy

    def share_image(self, image: ImageRef, accounts: list[str]) -> None:
        """Give the AWS accounts launch permission on the AMI and createVolumePermission on its snapshots.

        Launch permission alone lets them run the AMI; without access to the snapshots they cannot copy it
        (to another region or to keep it should this account deregister it) or make volumes from it.
        """
        if not accounts:
            return
        region = image.region or self.region
        ec2 = self.ec2(region)
        ec2.modify_image_attribute(
            ImageId=image.image_id,
            LaunchPermission={"Add": [{"UserId": account} for account in accounts]},
        )
        for snapshot_id in snapshot_ids(self._image_by_id(image.image_id, region)):
            ec2.modify_snapshot_attribute(
                SnapshotId=snapshot_id, Attribute="createVolumePermission", OperationType="add", UserIds=accounts
            )

    def launch_permissions(self, image: ImageRef) -> list[str]:
        """The account ids that may launch the AMI."""
        attribute = self.ec2(image.region or self.region).describe_image_attribute(
            ImageId=image.image_id, Attribute="launchPermission"
        )
        return sorted(p["UserId"] for p in attribute.get("LaunchPermissions", []) if "UserId" in p)

    def volume_permissions(self, image: ImageRef) -> dict[str, list[str]]:
        """For each snapshot behind the AMI, the account ids that may create volumes from it (copy it)."""
        region = image.region or self.region
        ec2 = self.ec2(region)
        found: dict[str, list[str]] = {}
        for snapshot_id in snapshot_ids(self._image_by_id(image.image_id, region)):
            attribute = ec2.describe_snapshot_attribute(SnapshotId=snapshot_id, Attribute="createVolumePermission")
            permissions = attribute.get("CreateVolumePermissions", [])
            found[snapshot_id] = sorted(p["UserId"] for p in permissions if "UserId" in p)
        return found

    # -- publishing a local build ------------------------------------------------------------------------------

    def publish_problem(self, *, bucket: str | None) -> str | None:
        return None if bucket else "--bucket is required to publish to ec2 (VM Import reads the disk from S3)"

    def publish(
        self,
        path: Path,
        name: str,
        *,
        tags: dict[str, str] | None = None,
        properties: dict[str, str] | None = None,
        disk_format: str = "qcow2",
        progress: Callable[[str], None] = log.info,
        bucket: str | None = None,
        ledger: PublishLedger | None = None,
    ) -> tuple[ImageRef, FileDigests]:
        """A local disk as an AMI in this cloud's region (S3 upload, VM Import, register_image; see publish_disk),
        shared with share_with; the digests are of the file as converted, so bits changed meanwhile show. The AMI
        carries `tags`; EC2 keeps nothing beside tags, so `properties` (Glance's) have no place here."""
        if problem := self.publish_problem(bucket=bucket):
            raise CloudError(problem)
        path = Path(path)
        with tempfile.TemporaryDirectory(prefix="kiln-publish-", dir=settings.cache_dir()) as tmp:
            raw = path
            if disk_format != "raw":  # VM Import takes RAW, VMDK or VHD
                raw = Path(tmp) / f"{path.stem}.raw"
                progress(f"converting {path.name} ({disk_format}) to raw for VM Import")
                qemu.run([qemu.QEMU_IMG, "convert", "-O", "raw", str(path), str(raw)], what="qemu-img convert to raw",
                         timeout=3600)  # fmt: skip
            digests = FileDigests.of(path)
            image = publish_disk(self, raw, bucket=str(bucket), name=name, tags=tags or {}, progress=progress,
                                 ledger=ledger, timeout=self.image_timeout)  # fmt: skip
        try:
            self.share_image(image, self.share_with)
        except BaseException:
            self.delete_image(image)
            raise
        return image, digests

    # -- garbage collection ------------------------------------------------------------------------------------

    @property
    def scope(self) -> tuple[str, ...]:
        """The account (profile, endpoint) and the regions this cloud lists."""
        return ("ec2", self.region, *self.regions, self.endpoint_url or "", self.profile or "")

    def reaches(self, region: str) -> bool:
        """Every region: the same account reaches them all (a copy's region is on its ImageRef)."""
        return True

    def owned(self, tags: dict[str, str] | None = None) -> list[Resource]:
        """Every kiln-tagged instance (not terminated), key pair, security group, AMI and snapshot in our regions."""
        found: list[Resource] = []
        for region in [self.region, *self.regions]:
            found += self._owned_in(region, tags)
        return found

    def _owned_in(self, region: str, tags: dict[str, str] | None) -> list[Resource]:
        ec2, filters, found = self.ec2(region), tag_filters(tags), []
        alive = [{"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}]
        for page in ec2.get_paginator("describe_instances").paginate(Filters=filters + alive):
            for reservation in page["Reservations"]:
                for item in reservation["Instances"]:
                    found.append(self._resource("instance", item["InstanceId"], item, region, "LaunchTime"))
        for item in ec2.describe_key_pairs(Filters=filters)["KeyPairs"]:
            found.append(self._resource("keypair", item["KeyPairId"], item, region, "CreateTime"))
        for page in ec2.get_paginator("describe_security_groups").paginate(Filters=filters):
            for item in page["SecurityGroups"]:
                found.append(self._resource("security-group", item["GroupId"], item, region, ""))
        for item in ec2.describe_images(Owners=["self"], Filters=filters)["Images"]:
            found.append(self._resource("image", item["ImageId"], item, region, "CreationDate"))
        for page in ec2.get_paginator("describe_snapshots").paginate(OwnerIds=["self"], Filters=filters):
            for item in page["Snapshots"]:
                found.append(self._resource("snapshot", item["SnapshotId"], item, region, "StartTime"))
        return found

    def _resource(self, kind: str, resource_id: str, item: dict[str, Any], region: str, time_key: str) -> Resource:
        created = parse_time(item.get(time_key)) if time_key else None
        return Resource(self.name, kind, resource_id, tag_dict(item.get("Tags")), region=region, created=created)

    def release(self, resource: Resource) -> None:
        """Undo what owned() or the ledger names; releasing what is gone already succeeds."""
        region = resource.region or self.region
        if resource.kind == "instance":
            self._terminate(resource.resource_id, region)
        elif resource.kind == "keypair":
            self._delete_key_pair(resource.resource_id, region)
        elif resource.kind == "security-group":
            self._delete_group(resource.resource_id, region)
        elif resource.kind == "image":
            self.delete_image(ImageRef(cloud=self.name, image_id=resource.resource_id, name="", region=region))
        elif resource.kind == "snapshot":
            self._delete_snapshot(resource.resource_id, region)
        elif resource.kind == "import-task":
            self._release_import(resource.resource_id, region)
        elif resource.kind == "object":
            bucket, _, key = resource.resource_id.removeprefix("s3://").partition("/")
            self.client("s3", region).delete_object(Bucket=bucket, Key=key)
        else:
            raise CloudError(f"the ec2 cloud has no {resource.kind!r} resources to release")

    def _release_import(self, task_id: str, region: str) -> None:
        """Cancel a VM Import task still running; a finished one's snapshot is deleted."""
        importer = self.vm_import_client(region)
        detail = _import_detail(importer, task_id)
        status = detail.get("Status", "")
        if status not in (IMPORT_DONE, *IMPORT_FAILED, ""):
            importer.cancel_import_task(ImportTaskId=task_id)  # else it would still make a snapshot later
            log.info("cancelled import task %s in %s", task_id, region)
        if detail.get("SnapshotId"):
            self._delete_snapshot(detail["SnapshotId"], region)

    def _delete_key_pair(self, key_pair: str, region: str) -> None:
        """By id (key-…) or name; EC2 deletes by name, so an id is looked up first."""
        ec2 = self.ec2(region)
        if key_pair.startswith("key-"):
            pairs = ec2.describe_key_pairs(Filters=[{"Name": "key-pair-id", "Values": [key_pair]}])["KeyPairs"]
            names = [pair["KeyName"] for pair in pairs if pair.get("KeyPairId") == key_pair]
        else:
            names = [key_pair]
        for name in names:
            ec2.delete_key_pair(KeyName=name)  # succeeds when the key is gone already
        log.info("deleted key pair %s in %s", key_pair, region)

    def _delete_group(self, group_id: str, region: str) -> None:
        """Delete a security group, retrying while a terminating instance still holds it."""
        deadline = time.monotonic() + self.group_delete_timeout
        delay = min(self.poll_seconds, 5.0)
        while True:
            try:
                self.ec2(region).delete_security_group(GroupId=group_id)
                log.info("deleted security group %s in %s", group_id, region)
                return
            except botocore.exceptions.ClientError as exc:
                code = error_code(exc)
                if code in GONE:
                    return
                if code != "DependencyViolation" or time.monotonic() > deadline:
                    raise
                log.info("security group %s still in use (an instance is shutting down); retrying", group_id)
            time.sleep(delay)


def _open_target(target: EC2Target, timeouts: Timeouts | None, target_name: str) -> EC2Cloud:
    return EC2Cloud.from_target(target, timeouts)


def _open_destination(
    name: str, *, region: str | None = None, endpoint_url: str | None = None, profile: str | None = None
) -> EC2Cloud:
    """`kiln publish --to ec2`: the region asked, else boto3's (AWS_DEFAULT_REGION, the profile's)."""
    found = region or boto3.session.Session(profile_name=profile).region_name
    if not found:
        raise ValueError("--region is required to publish to ec2 (no default region in the environment or profile)")
    return EC2Cloud(found, profile=profile, endpoint_url=endpoint_url)


BACKEND = Backend(
    kind="ec2",
    target_model=EC2Target,
    open_target=_open_target,
    default_vm_limit=lambda: 4,  # a quota is the team's to set (kiln limits set); four is a modest start
    open_destination=_open_destination,
    errors=(botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError),
)


def snapshot_ids(image: dict[str, Any]) -> list[str]:
    """The EBS snapshots behind an AMI, from its block device mappings."""
    return [m["Ebs"]["SnapshotId"] for m in image.get("BlockDeviceMappings", []) if m.get("Ebs", {}).get("SnapshotId")]


# -- publishing a local build --------------------------------------------------------------------------------


ESP_TYPE_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"  # EFI System Partition


def boot_mode_of(raw_disk: Path | str) -> str:
    """legacy-bios for an MBR disk, uefi for a GPT disk with an EFI System Partition (read from the disk itself)."""
    with Path(raw_disk).open("rb") as disk:
        mbr = disk.read(512)
        if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa" or mbr[450] != 0xEE:  # no protective MBR: not GPT
            return "legacy-bios"
        header = disk.read(512)
        if header[:8] != b"EFI PART":
            return "legacy-bios"
        entries_lba = int.from_bytes(header[72:80], "little")
        count = int.from_bytes(header[80:84], "little")
        size = int.from_bytes(header[84:88], "little")
        disk.seek(entries_lba * 512)
        table = disk.read(min(count, 256) * size)
    for offset in range(0, len(table) - size + 1, size):
        if str(uuid.UUID(bytes_le=table[offset : offset + 16])).upper() == ESP_TYPE_GUID:
            return "uefi"
    return "uefi-preferred"  # GPT without an ESP: BIOS boot partition or a hybrid; let the instance type decide


def publish_disk(
    cloud: EC2Cloud,
    raw_disk: Path | str,
    *,
    bucket: str,
    name: str,
    tags: dict[str, str],
    boot_mode: str | None = None,
    architecture: str = "x86_64",
    timeout: float = 3600,
    progress: Callable[[str], None] = log.info,
    ledger: PublishLedger | None = None,
) -> ImageRef:
    """Publish a local raw disk as an AMI: upload to S3, import_snapshot, register_image (BootMode from the disk
    unless given). The S3 object is removed whatever happens; a failed or interrupted import is cancelled and its
    snapshot deleted. Each object is written to `ledger` before the call that creates it, so a killed publish
    leaves rows `kiln gc` can release (the import task also carries the kiln tags).

    The account needs the `vmimport` service role with read access to the bucket (AWS VM Import/Export).
    """
    raw_disk = Path(raw_disk)
    ledger = ledger or NoLedger()
    boot_mode = boot_mode or boot_mode_of(raw_disk)
    if boot_mode not in ("legacy-bios", "uefi", "uefi-preferred"):
        raise ValueError(f"boot_mode must be legacy-bios, uefi or uefi-preferred, not {boot_mode!r}")
    s3 = cloud.client("s3")
    key = f"kiln-import/{name}-{uuid.uuid4().hex[:8]}.raw"
    location = f"s3://{bucket}/{key}"
    upload = ledger.intent("object", location)
    try:
        progress(f"uploading {raw_disk} ({raw_disk.stat().st_size} bytes) to {location}")
        s3.upload_file(str(raw_disk), bucket, key, ExtraArgs={"Tagging": urllib.parse.urlencode(tags)})
        ledger.created(upload, location)
        snapshot_id = import_snapshot(cloud, bucket, key, name, tags, timeout, progress, ledger)
    finally:
        s3.delete_object(Bucket=bucket, Key=key)  # S3 deletes are idempotent: nothing uploaded is fine too
        ledger.released(upload)
    ec2 = cloud.ec2()
    try:
        ec2.create_tags(Resources=[snapshot_id], Tags=tag_list({**tags, "Name": name}))
        image_id = ec2.register_image(
            Name=name,
            Description=f"kiln build {tags.get(TAG_BUILD, '')}: imported from {raw_disk.name}",
            Architecture=architecture,
            RootDeviceName="/dev/xvda",
            VirtualizationType="hvm",
            EnaSupport=True,
            BootMode=boot_mode,
            BlockDeviceMappings=[
                {"DeviceName": "/dev/xvda",
                 "Ebs": {"SnapshotId": snapshot_id, "DeleteOnTermination": True, "VolumeType": "gp3"}}
            ],
            TagSpecifications=[{"ResourceType": "image", "Tags": tag_list({**tags, "Name": name})}],
        )["ImageId"]  # fmt: skip
    except BaseException:
        cloud._delete_snapshot(snapshot_id, cloud.region)
        raise
    image = cloud._finish_image(image_id, name, cloud.region, {**tags, "Name": name}, timeout)
    progress(f"registered {image_id} ({boot_mode}) from snapshot {snapshot_id}")
    return image


def import_snapshot(
    cloud: EC2Cloud, bucket: str, key: str, name: str, tags: dict[str, str], timeout: float,
    progress: Callable[[str], None], ledger: PublishLedger | None = None,
) -> str:  # fmt: skip
    """import_snapshot from S3 (the task tagged, ledgered before the call) and poll until it yields a snapshot.

    On failure, timeout or interruption the task is released: cancelled while active, its snapshot deleted.
    """
    ledger = ledger or NoLedger()
    importer = cloud.vm_import_client()
    row = ledger.intent("import-task", f"s3://{bucket}/{key}")
    task_id = ""
    try:
        task_id = importer.import_snapshot(
            Description=f"kiln {name}",
            DiskContainer={"Description": name, "Format": "RAW", "UserBucket": {"S3Bucket": bucket, "S3Key": key}},
            ClientToken=f"kiln-{key}",  # a retried call does not start a second import
            TagSpecifications=[{"ResourceType": "import-snapshot-task", "Tags": tag_list(tags)}],
        )["ImportTaskId"]
        ledger.created(row, task_id)
        snapshot_id = _await_import(cloud, importer, task_id, f"s3://{bucket}/{key}", timeout, progress)
    except BaseException:
        if task_id:
            cloud.release(Resource(cloud.name, "import-task", task_id, region=cloud.region))
        ledger.released(row)
        raise
    ledger.released(row)  # its snapshot is tagged and becomes the AMI's: the caller owns it now
    return snapshot_id


def _await_import(
    cloud: EC2Cloud, importer: Any, task_id: str, source: str, timeout: float, progress: Callable[[str], None]
) -> str:
    deadline = time.monotonic() + timeout
    while True:
        detail = _import_detail(importer, task_id)
        status = detail.get("Status", "")
        if status == IMPORT_DONE and detail.get("SnapshotId"):
            return detail["SnapshotId"]
        if status in IMPORT_FAILED:
            raise CloudError(f"import of {source} ({task_id}) {status}: {detail.get('StatusMessage', '')}")
        if time.monotonic() > deadline:
            raise CloudError(f"import of {source} ({task_id}) not done within {timeout:.0f}s ({status})")
        progress(f"import {task_id}: {status} {detail.get('Progress', '')}%")
        time.sleep(cloud.poll_seconds)


def _import_detail(importer: Any, task_id: str) -> dict[str, Any]:
    tasks = importer.describe_import_snapshot_tasks(ImportTaskIds=[task_id])["ImportSnapshotTasks"]
    return tasks[0].get("SnapshotTaskDetail", {}) if tasks else {}
