"""OpenStack through openstacksdk: build on Nova (servers, key pairs, security groups, floating IPs, server
images) and publish to Glance (upload or interoperable import, properties, members, deactivation).

Tags: Nova server metadata carries kiln's tags under their own names (kiln:build-id…). Glance properties
cannot comfortably hold ':' (the CLI and several dashboards read it as a namespace separator), so images
carry them as kiln_build_id, kiln_recipe, kiln_recipe_version, kiln_commit and kiln_role (see
GLANCE_PROPERTIES) plus the Glance tag "kiln". Neutron objects (security groups, floating IPs) carry the
tags as strings "kiln:build-id=<id>". Key pairs hold no tags in Nova: theirs is the name, kiln-<build>-<role>.

Credentials come only from clouds.yaml / OS_* variables (openstacksdk's own loader); kiln never stores
or logs them. A clouds.yaml entry without a password makes kiln prompt for it when a terminal exists.
"""

from __future__ import annotations

import base64
import datetime as dt
import fnmatch
import getpass
import logging
import re
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import openstack
import openstack.config
from openstack import exceptions as os_exc

from clouds.base import (
    TAG_BUILD,
    TAG_COMMIT,
    TAG_RECIPE,
    TAG_RECIPE_VERSION,
    TAG_ROLE,
    TAG_VALID_UNTIL,
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
from core.recipe import BaseSpec, OpenStackTarget, Timeouts

log = logging.getLogger("kiln.openstack")

KILN_IMAGE_TAG = "kiln"  # Glance tag on every image kiln made or published (listing without properties)
# kiln's tag names → Glance property names (no ':' and no '-').
GLANCE_PROPERTIES = {
    TAG_BUILD: "kiln_build_id",
    TAG_RECIPE: "kiln_recipe",
    TAG_RECIPE_VERSION: "kiln_recipe_version",
    TAG_COMMIT: "kiln_commit",
    TAG_ROLE: "kiln_role",
    TAG_VALID_UNTIL: "kiln_valid_until",
}
SHA256_PROPERTY = "kiln_sha256"  # the sha256 of the bits kiln uploaded (publish), as provenance records it
UUID = re.compile(r"^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$", re.IGNORECASE)
IMAGE_FAILED = ["killed", "deleted", "deactivated"]


def glance_properties(tags: dict[str, str]) -> dict[str, str]:
    """kiln tags as Glance properties: kiln:build-id → kiln_build_id; other names get ':' and '-' as '_'."""
    return {GLANCE_PROPERTIES.get(key) or re.sub(r"[:\-]", "_", key): value for key, value in tags.items()}


def tags_from_properties(properties: dict[str, Any]) -> dict[str, str]:
    """The kiln tags an image's Glance properties carry (the inverse of glance_properties)."""
    by_property = {prop: tag for tag, prop in GLANCE_PROPERTIES.items()}
    return {by_property[key]: str(value) for key, value in properties.items() if key in by_property}


def neutron_tags(tags: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in sorted(tags.items())]


def tags_from_neutron(tags: list[str] | None) -> dict[str, str]:
    return dict(tag.split("=", 1) for tag in (tags or []) if "=" in tag and tag.startswith("kiln:"))


def _matches(have: dict[str, str], wanted: dict[str, str]) -> bool:
    return all(have.get(key) == value for key, value in wanted.items())


def _prompt_password(prompt: str) -> str:
    """openstacksdk asks for a missing secret through this; only ever called with a terminal attached."""
    return getpass.getpass(prompt if prompt.endswith(": ") else f"{prompt}: ")


def connect(os_cloud: str, *, config_files: list[str] | None = None, interactive: bool | None = None) -> Any:
    """An openstacksdk Connection for a clouds.yaml entry (or OS_* variables), authenticated now.

    A missing password is asked for on the terminal when one exists; without a terminal the cloud's own
    authentication error says what is missing. Nothing of the configuration is logged.
    """
    if interactive is None:
        interactive = sys.stdin.isatty()
    loader = openstack.config.OpenStackConfig(
        config_files=config_files, pw_func=_prompt_password if interactive else None
    )
    try:
        region = loader.get_one(cloud=os_cloud)
        conn = openstack.connection.Connection(config=region)
        conn.authorize()
    except os_exc.ConfigException as exc:
        raise CloudError(f"OpenStack cloud {os_cloud!r}: {exc} (name an entry of clouds.yaml in os_cloud)") from exc
    except Exception as exc:  # keystoneauth raises its own classes besides openstacksdk's
        raise CloudError(f"OpenStack cloud {os_cloud!r}: authentication failed: {_short(exc)}") from exc
    return conn


def _short(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0][:300]


class OpenStackCloud:
    """One OpenStack cloud (a clouds.yaml entry) with a recipe target's flavor, network and firewall."""

    name = "openstack"
    console_poll_seconds = CONSOLE_POLL_SECONDS  # an API call each time

    def __init__(
        self,
        os_cloud: str,
        *,
        flavor: str | None = None,
        network: str | None = None,
        floating_ip: bool = False,
        ssh_cidr: str | None = None,
        share_with: list[str] | None = None,
        boot_timeout: float = 900,
        image_timeout: float = 1800,
        connection: Any = None,
        config_files: list[str] | None = None,
    ) -> None:
        self.os_cloud = os_cloud
        self.region = os_cloud  # provenance's region: the clouds.yaml entry, which is what a user names
        self.flavor = flavor
        self.network = network
        self.floating_ip = floating_ip
        self.ssh_cidr = ssh_cidr
        self.share_with = list(share_with or [])
        self.boot_timeout = boot_timeout
        self.image_timeout = image_timeout
        self._config_files = config_files
        self._conn = connection

    @classmethod
    def from_target(cls, target: OpenStackTarget, target_name: str, timeouts: Timeouts | None = None) -> OpenStackCloud:
        """The cloud a recipe's OpenStackTarget names (os_cloud, else the target's name)."""
        if not (target.os_cloud or target_name):
            raise ValueError("an openstack target needs os_cloud, or its target name as the clouds.yaml entry")
        return cls(
            target.effective_os_cloud(target_name),
            flavor=target.flavor,
            network=target.network,
            floating_ip=target.floating_ip,
            ssh_cidr=target.ssh_cidr,
            share_with=list(target.share_with),
            boot_timeout=getattr(timeouts, "boot", 900),
            image_timeout=getattr(timeouts, "image", 1800),
        )

    @property
    def conn(self) -> Any:
        """The connection, opened (and authenticated) on first use."""
        if self._conn is None:
            self._conn = connect(self.os_cloud, config_files=self._config_files)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- bases ---------------------------------------------------------------------------------------

    def resolve_base(self, spec: BaseSpec, ssh_user: str) -> BaseImage:
        """A Glance image by id, or by name (exact, or a shell pattern): the newest active one wins."""
        image_ref = getattr(spec, "image", None)
        pattern = getattr(spec, "name", None)
        if image_ref:
            image = self._image_by_id(str(image_ref)) if UUID.match(str(image_ref)) else None
            image = image or self._newest_named(str(image_ref), field="base.image")
        elif pattern:
            image = self._newest_named(str(pattern), field="base.name")
        else:
            raise CloudError(
                "base: an OpenStack target starts from a Glance image: set base.image (id or name) or base.name"
            )
        if image.status != "active":
            raise CloudError(f"base.image: Glance image {image.id} ({image.name}) is {image.status}, not active")
        return BaseImage(
            cloud=self.name,
            image_id=image.id,
            digest=image_digest(image),
            ssh_user=ssh_user,
            name=image.name or "",
            region=self.region,
            details=_image_details(image),
        )

    def _image_by_id(self, image_id: str) -> Any:
        try:
            return self.conn.image.get_image(image_id)
        except os_exc.NotFoundException:
            return None

    def _newest_named(self, pattern: str, *, field: str) -> Any:
        if any(char in pattern for char in "*?["):
            candidates = [
                i for i in self.conn.image.images(status="active") if fnmatch.fnmatchcase(i.name or "", pattern)
            ]
        else:
            candidates = list(self.conn.image.images(name=pattern, status="active"))
        if not candidates:
            raise CloudError(f"{field}: no active Glance image on {self.os_cloud} is named {pattern!r}")
        return max(candidates, key=lambda image: (image.created_at or "", image.id))

    # -- key pairs and firewall ------------------------------------------------------------------------

    def import_key(self, key: KeyPair, tags: dict[str, str]) -> str | None:
        """Import the public half as a Nova key pair named key.name (Nova keeps no tags: the name is kiln's)."""
        try:
            self.conn.compute.create_keypair(name=key.name, public_key=key.public_key)
        except os_exc.SDKException as exc:
            raise CloudError(f"OpenStack {self.os_cloud}: importing key pair {key.name}: {_short(exc)}") from exc
        return key.name

    def delete_keypair(self, key: KeyPair) -> None:
        self.conn.compute.delete_keypair(key.name, ignore_missing=True)

    def open_ports(self, name: str, ports: list[int], tags: dict[str, str]) -> str | None:
        """A security group opening each TCP port to the builder's CIDR; returns its id."""
        cidr = self.builder_cidr()
        network = self.conn.network
        group = network.create_security_group(name=name, description=f"kiln {name}: ports {ports} from {cidr}")
        try:
            network.set_tags(group, neutron_tags(tags))
            for port in sorted(set(ports)):
                network.create_security_group_rule(
                    security_group_id=group.id, direction="ingress", ethertype="IPv6" if ":" in cidr else "IPv4",
                    protocol="tcp", port_range_min=port, port_range_max=port, remote_ip_prefix=cidr,
                )  # fmt: skip
        except BaseException:
            network.delete_security_group(group, ignore_missing=True)
            raise
        log.info("security group %s (%s) opens %s to %s", name, group.id, ports, cidr)
        return group.id

    def builder_cidr(self) -> str:
        """ssh_cidr from the target, else this machine's address on the route to the cloud, as /32.

        Behind NAT the cloud sees another address: set ssh_cidr then.
        """
        if self.ssh_cidr:
            return self.ssh_cidr
        endpoint = self.conn.compute.get_endpoint() or self.conn.config.get_auth_args().get("auth_url", "")
        host = urlparse(endpoint).hostname or "127.0.0.1"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((host, 9))  # UDP connect sends nothing: it only picks the route's source address
                address = probe.getsockname()[0]
        except OSError as exc:
            raise CloudError(f"cannot tell this machine's address toward {host} ({exc}): set ssh_cidr in the "
                             "target to the CIDR the cloud sees kiln connect from") from exc
        return f"{address}/128" if family == socket.AF_INET6 else f"{address}/32"

    # -- servers ---------------------------------------------------------------------------------------

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
        """Boot a server from the base with the key pair, security group, flavor, network and user-data;
        wait until ACTIVE, then attach a floating IP when the target asks. On failure nothing is left."""
        if not self.flavor:
            raise CloudError(f"OpenStack {self.os_cloud}: no flavor given for the {role} server")
        compute = self.conn.compute
        flavor = compute.find_flavor(self.flavor, ignore_missing=True)
        if flavor is None:
            raise CloudError(f"flavor: {self.flavor!r} is not a flavor of {self.os_cloud}")
        networks: Any = "auto"
        if self.network:
            network = self.conn.network.find_network(self.network, ignore_missing=True)
            if network is None:
                raise CloudError(f"network: {self.network!r} is not a network of {self.os_cloud}")
            networks = [{"uuid": network.id}]
        name = key.name  # kiln-<build>-<role>, like the key pair and the security group
        attrs: dict[str, Any] = {
            "name": name,
            "image_id": base.image_id,
            "flavor_id": flavor.id,
            "networks": networks,
            "key_name": key.name,
            "user_data": base64.b64encode(user_data.encode()).decode(),
            "metadata": {k: v[:255] for k, v in tags.items()},
        }
        if firewall:
            attrs["security_groups"] = [{"name": firewall}]
        server = compute.create_server(**attrs)
        floating: Any = None
        try:
            server = compute.wait_for_server(
                server, status="ACTIVE", failures=["ERROR"], interval=2, wait=self.boot_timeout
            )
            if self.floating_ip:
                floating = self._attach_floating_ip(server, tags)
        except BaseException as exc:
            self._delete_server(server.id)
            if isinstance(exc, os_exc.SDKException):
                raise CloudError(f"OpenStack {self.os_cloud}: server {name} did not start: {_short(exc)}") from exc
            raise
        address = floating.floating_ip_address if floating is not None else _fixed_address(server)
        log.info("server %s (%s) active at %s", name, server.id, address)
        return Instance(
            cloud=self.name,
            instance_id=server.id,
            name=name,
            ssh_user=base.ssh_user,
            tags=dict(tags),
            details={
                "address": address,
                "floating_ip_id": floating.id if floating is not None else None,
                "security_group": firewall,
                "key_name": key.name,
                "ports": sorted(set(ports)),
                "region": self.region,
            },
        )

    def _attach_floating_ip(self, server: Any, tags: dict[str, str]) -> Any:
        network = self.conn.network
        external = next(iter(network.networks(is_router_external=True)), None)
        if external is None:
            raise CloudError(f"floating_ip: {self.os_cloud} has no external network to take a floating IP from")
        port = next(iter(network.ports(device_id=server.id)), None)
        if port is None:
            raise CloudError(f"server {server.id} has no port to attach a floating IP to")
        floating = network.create_ip(floating_network_id=external.id, description=f"kiln {server.name}")
        try:
            network.set_tags(floating, neutron_tags(tags))
            floating = network.update_ip(floating, port_id=port.id)
        except BaseException:
            network.delete_ip(floating, ignore_missing=True)
            raise
        return floating

    def endpoint(self, instance: Instance, port: int) -> tuple[str, int]:
        """The server's floating IP when it has one, else its first fixed address; the port as asked."""
        address = instance.details.get("address")
        if not address:
            raise CloudError(f"server {instance.instance_id} has no address kiln can reach")
        return str(address), port

    def console(self, instance: Instance) -> str:
        """Nova's console log (cloud-init prints the host key fingerprints there)."""
        try:
            output = self.conn.compute.get_server_console_output(instance.instance_id)
        except os_exc.SDKException as exc:
            log.debug("console of %s: %s", instance.instance_id, exc)
            return ""
        return str(output.get("output") or "")

    def stop(self, instance: Instance, timeout: float = 120) -> StopResult:
        """Ask Nova for a clean stop (ACPI, then Nova's own power-off after its shutdown timeout) and wait SHUTOFF."""
        compute = self.conn.compute
        started = time.monotonic()
        server = compute.get_server(instance.instance_id)
        if server.status == "SHUTOFF":
            return StopResult(forced=False, seconds=0.0, detail="already stopped")
        compute.stop_server(server)
        try:
            compute.wait_for_server(server, status="SHUTOFF", failures=["ERROR"], interval=2, wait=timeout)
        except os_exc.SDKException as exc:
            raise CloudError(
                f"server {instance.instance_id} did not stop within {timeout:.0f}s: {_short(exc)}"
            ) from exc
        return StopResult(forced=False, seconds=time.monotonic() - started, detail="Nova stop")

    def terminate(self, instance: Instance) -> None:
        self._delete_server(instance.instance_id)

    def _delete_server(self, server_id: str) -> None:
        """Release the server's floating IPs, delete it and wait until it is gone (its ports free the
        security group only then). Gone already is success."""
        network, compute = self.conn.network, self.conn.compute
        for port in network.ports(device_id=server_id):
            for floating in network.ips(port_id=port.id):
                network.delete_ip(floating, ignore_missing=True)
        server = compute.find_server(server_id, ignore_missing=True)
        if server is None:
            return
        compute.delete_server(server, ignore_missing=True)
        try:
            compute.wait_for_delete(server, interval=2, wait=self.boot_timeout)
        except os_exc.ResourceTimeout as exc:
            raise CloudError(f"server {server_id} was not deleted within {self.boot_timeout:.0f}s") from exc

    # -- images ----------------------------------------------------------------------------------------

    def snapshot(self, instance: Instance, name: str, tags: dict[str, str], formats: list[str]) -> ImageRef:
        """Stop the server if it runs, create a Glance image from it with kiln's properties, wait active.

        The image is in the cloud's own disk format; `formats` applies to local files only."""
        compute = self.conn.compute
        if compute.get_server(instance.instance_id).status != "SHUTOFF":
            self.stop(instance, timeout=self.boot_timeout)
        properties = glance_properties({**tags, TAG_ROLE: "image"})
        image_id = self._server_image(instance, name, properties)
        try:
            image = self.wait_image_active(image_id)
            self.conn.image.add_tag(image, KILN_IMAGE_TAG)
        except BaseException:
            self.conn.image.delete_image(image_id, ignore_missing=True)
            raise
        log.info("image %s (%s) active from server %s", name, image.id, instance.instance_id)
        return ImageRef(
            cloud=self.name, image_id=image.id, name=name, region=self.region, details=_image_details(image)
        )

    def _server_image(self, instance: Instance, name: str, properties: dict[str, str]) -> str:
        """Nova's createImage for the server; returns the new image's id (not yet active)."""
        image = self.conn.compute.create_server_image(instance.instance_id, name, metadata=properties)
        return image.id

    def wait_image_active(self, image_id: str, timeout: float | None = None) -> Any:
        image = self.conn.image.get_image(image_id)
        try:
            return self.conn.image.wait_for_status(
                image, "active", failures=IMAGE_FAILED, interval=2, wait=int(timeout or self.image_timeout)
            )
        except os_exc.SDKException as exc:
            raise CloudError(f"Glance image {image_id} did not become active: {_short(exc)}") from exc

    def tag_image(self, image: ImageRef, tags: dict[str, str]) -> None:
        """kiln's tags as Glance properties (see GLANCE_PROPERTIES) and the Glance tag "kiln"."""
        self.conn.image.update_image(image.image_id, **glance_properties(tags))
        self.conn.image.add_tag(image.image_id, KILN_IMAGE_TAG)

    def delete_image(self, image: ImageRef) -> None:
        """Delete the Glance image; gone already is success."""
        self.conn.image.delete_image(image.image_id, ignore_missing=True)

    def revoke_image(self, image: ImageRef, reason: str) -> None:
        """Deactivate it: Glance keeps its record (kiln's provenance keeps the reason) but serves no data."""
        self.deactivate_image(image.image_id)

    def deactivate_image(self, image_id: str) -> None:
        """Revocation: Glance refuses the image's data (no new servers boot from it) but keeps its record."""
        self._set_activation(image_id, "deactivate", "deactivated")

    def reactivate_image(self, image_id: str) -> None:
        """Undo a revocation: the image serves its data again."""
        self._set_activation(image_id, "reactivate", "active")

    def _set_activation(self, image_id: str, action: str, status: str) -> None:
        # openstacksdk's deactivate/reactivate do not check Glance's answer: ask, then look.
        try:
            image = self.conn.image.get_image(image_id)
        except os_exc.NotFoundException as exc:
            raise CloudError(f"Glance image {image_id} does not exist on {self.os_cloud}") from exc
        response = self.conn.image.post(f"/images/{image.id}/actions/{action}")
        now = self.conn.image.get_image(image.id).status
        if response.status_code >= 400 or now != status:
            raise CloudError(f"Glance image {image_id}: {action} answered HTTP {response.status_code}; "
                             f"the image is {now}, not {status}")

    def share_image(self, image: ImageRef | str, projects: list[str]) -> None:
        """Make the image (an ImageRef or a Glance id) shared and add each project as a member (idempotent)."""
        if not projects:
            return
        image_api = self.conn.image
        image = image_api.get_image(image.image_id if isinstance(image, ImageRef) else image)
        if image.visibility not in ("shared", "public"):
            image_api.update_image(image, visibility="shared")
        present = {member.member_id for member in image_api.members(image)}
        for project in projects:
            if project not in present:
                image_api.add_member(image, member=project)

    def publish(
        self,
        path: Path | str,
        name: str,
        *,
        tags: dict[str, str] | None = None,
        properties: dict[str, str] | None = None,
        disk_format: str = "qcow2",
        progress: Callable[[str], None] = log.info,
        bucket: str | None = None,
        ledger: PublishLedger | None = None,
    ) -> tuple[ImageRef, FileDigests]:
        """Upload a local image file to Glance (interoperable import when offered), wait active, check that
        Glance holds exactly these bits (its checksum and multihash against ours), share with share_with. The image
        is in `ledger` from before the upload until it is active and checked (a killed publication's half-made
        image is kiln gc's)."""
        if problem := self.publish_problem(bucket=bucket):
            raise CloudError(problem)
        ledger = ledger or NoLedger()
        path = Path(path)
        if not path.is_file():
            raise CloudError(f"{path} does not exist")
        digests = FileDigests.of(path)
        image_api = self.conn.image
        use_import = self.offers_import()
        props = {**glance_properties(tags or {}), SHA256_PROPERTY: digests.sha256, **(properties or {})}
        progress(
            f"uploading {path.name} ({digests.size} bytes, sha256 {digests.sha256}) to {self.os_cloud} "
            f"by {'interoperable import (glance-direct)' if use_import else 'direct upload'}"
        )
        row = ledger.intent("image", name)
        try:
            image = image_api.create_image(
                name, filename=str(path), disk_format=disk_format, container_format="bare", md5=digests.md5,
                sha256=digests.sha256, allow_duplicates=True, validate_checksum=False, use_import=use_import,
                tags=[KILN_IMAGE_TAG], wait=False, **props,
            )  # fmt: skip
        except BaseException:
            ledger.released(row)
            raise
        ledger.created(row, image.id)
        try:
            image = self.wait_image_active(image.id)
            check_same_bits(image, digests)
            self.share_image(image.id, self.share_with)
        except BaseException:
            image_api.delete_image(image.id, ignore_missing=True)
            raise
        finally:
            ledger.released(row)
        progress(f"Glance image {image.id} active; checksum and {image.hash_algo} match the file")
        ref = ImageRef(cloud=self.name, image_id=image.id, name=name, region=self.region, details=_image_details(image))
        return ref, digests

    def publish_problem(self, *, bucket: str | None) -> str | None:
        return "--bucket only applies to a cloud that stages the disk in a bucket (ec2)" if bucket else None

    def offers_import(self) -> bool:
        """Whether the cloud's Glance offers interoperable import by glance-direct."""
        try:
            info = self.conn.image.get_import_info()
        except os_exc.SDKException:
            return False
        methods = (getattr(info, "import_methods", None) or {}).get("value") or []
        return "glance-direct" in methods

    # -- garbage collection ----------------------------------------------------------------------------

    @property
    def scope(self) -> tuple[str, ...]:
        return ("openstack", self.os_cloud)

    def reaches(self, region: str) -> bool:
        """Only its own clouds.yaml entry (provenance's region of an OpenStack image)."""
        return region == self.os_cloud

    def owned(self, tags: dict[str, str] | None = None) -> list[Resource]:
        """kiln's servers (metadata), key pairs (named kiln-…), security groups and floating IPs (Neutron
        tags) and images (Glance tag and properties) whose tags match all of `tags`."""
        wanted = dict(tags or {})
        found: list[Resource] = []
        if self.conn.has_service("compute"):
            found += self._owned_compute(wanted)
        if self.conn.has_service("network"):
            found += self._owned_network(wanted)
        for image in self.images_with(wanted):
            found.append(Resource(self.name, "image", image["id"], tags_from_properties(image), region=self.region,
                                  created=_parse_time(image.get("created_at"))))
        return found

    def _owned_compute(self, wanted: dict[str, str]) -> list[Resource]:
        found: list[Resource] = []
        for server in self.conn.compute.servers(details=True):
            metadata = {k: v for k, v in (server.metadata or {}).items() if k.startswith("kiln:")}
            if metadata and _matches(metadata, wanted):
                found.append(Resource(self.name, "instance", server.id, metadata, region=self.region))
        prefix = f"kiln-{wanted[TAG_BUILD][:8]}-" if TAG_BUILD in wanted else "kiln-"
        only_build = set(wanted) <= {TAG_BUILD}  # key pairs carry nothing else to match
        for keypair in self.conn.compute.keypairs():
            if keypair.name.startswith(prefix) and only_build:
                found.append(Resource(self.name, "keypair", keypair.name, region=self.region))
        return found

    def _owned_network(self, wanted: dict[str, str]) -> list[Resource]:
        found: list[Resource] = []
        query = {"tags": ",".join(neutron_tags(wanted))} if wanted else {}
        for group in self.conn.network.security_groups(**query):
            group_tags = tags_from_neutron(group.tags)
            if group_tags and _matches(group_tags, wanted):
                found.append(Resource(self.name, "security-group", group.id, group_tags, region=self.region))
        for floating in self.conn.network.ips(**query):
            ip_tags = tags_from_neutron(floating.tags)
            if ip_tags and _matches(ip_tags, wanted):
                found.append(Resource(self.name, "floating-ip", floating.id, ip_tags, region=self.region))
        return found

    def images_with(self, tags: dict[str, str]) -> list[dict[str, Any]]:
        """Glance images tagged "kiln" whose properties match `tags`, filtered by Glance itself."""
        params = {"tag": KILN_IMAGE_TAG, "limit": 100, **glance_properties(tags)}
        images: list[dict[str, Any]] = []
        url: str | None = "/images"
        while url:
            response = self.conn.image.get(url, params=params if url == "/images" else None)
            if response.status_code >= 400:
                raise CloudError(f"listing Glance images on {self.os_cloud}: HTTP {response.status_code}")
            body = response.json()
            images += body.get("images", [])
            url = body.get("next", "").removeprefix("/v2") or None
        return images

    def release(self, resource: Resource) -> None:
        """Undo what owned() or the ledger names; releasing what is gone already succeeds."""
        kind, rid = resource.kind, resource.resource_id
        if kind == "instance":
            self._delete_server(rid)
        elif kind == "keypair":
            self.conn.compute.delete_keypair(rid, ignore_missing=True)
        elif kind == "security-group":
            self._delete_security_group(rid)
        elif kind == "floating-ip":
            self.conn.network.delete_ip(rid, ignore_missing=True)
        elif kind == "image":
            self.conn.image.delete_image(rid, ignore_missing=True)
        else:
            raise CloudError(f"OpenStack has no {kind!r} resources kiln makes")

    def _delete_security_group(self, group_id: str, attempts: int = 10) -> None:
        """Neutron refuses (409) while a deleted server's port still holds the group: retry briefly."""
        for attempt in range(attempts):
            try:
                self.conn.network.delete_security_group(group_id, ignore_missing=True)
                return
            except os_exc.ConflictException:
                if attempt == attempts - 1:
                    raise
                time.sleep(2)


def _open_target(target: OpenStackTarget, timeouts: Timeouts | None, target_name: str) -> OpenStackCloud:
    return OpenStackCloud.from_target(target, target_name, timeouts)


def _open_destination(name: str, **_options: str | None) -> OpenStackCloud:
    """`kiln publish --to ENTRY`: the clouds.yaml entry (region, endpoint and profile are EC2's options)."""
    return OpenStackCloud(name)


BACKEND = Backend(
    kind="openstack",
    target_model=OpenStackTarget,
    open_target=_open_target,
    default_vm_limit=lambda: 4,  # a quota is the team's to set (kiln limits set); four is a modest start
    open_place=OpenStackCloud,  # provenance's region of an OpenStack image is its clouds.yaml entry
    open_destination=_open_destination,
    names_places=True,
    errors=(os_exc.SDKException,),
)


def image_digest(image: Any) -> str:
    """The image's digest as Glance reports it: algo:multihash, else md5:checksum, else the id (no data)."""
    if getattr(image, "hash_algo", None) and getattr(image, "hash_value", None):
        return f"{image.hash_algo}:{image.hash_value}"
    if getattr(image, "checksum", None):
        return f"md5:{image.checksum}"
    return f"glance-id:{image.id}"


def check_same_bits(image: Any, digests: FileDigests) -> None:
    """Glance's checksum (md5) and multihash must be those of the file kiln uploaded."""
    if image.checksum and image.checksum != digests.md5:
        raise CloudError(f"Glance image {image.id}: checksum {image.checksum} is not the file's md5 {digests.md5}")
    algo, value = getattr(image, "hash_algo", None), getattr(image, "hash_value", None)
    if not (algo and value) and not image.checksum:
        raise CloudError(f"Glance image {image.id} reports no checksum: cannot prove it holds the uploaded bits")
    if algo and value:
        ours = digests.by_algorithm(algo)
        if ours is None:
            raise CloudError(f"Glance image {image.id}: unknown hash algorithm {algo}")
        if ours != value:
            raise CloudError(f"Glance image {image.id}: {algo} {value} is not the file's {ours}")


def _fixed_address(server: Any) -> str | None:
    for addresses in (server.addresses or {}).values():
        for entry in addresses:
            if entry.get("OS-EXT-IPS:type", "fixed") == "fixed" and entry.get("version", 4) == 4:
                return entry.get("addr")
    for addresses in (server.addresses or {}).values():
        for entry in addresses:
            return entry.get("addr")
    return None


def _parse_time(value: Any) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


def _image_details(image: Any) -> dict[str, Any]:
    return {
        "status": image.status,
        "checksum": image.checksum,
        "os_hash_algo": getattr(image, "hash_algo", None),
        "os_hash_value": getattr(image, "hash_value", None),
        "size": image.size,
        "disk_format": image.disk_format,
        "visibility": image.visibility,
        "sha256": (image.properties or {}).get(SHA256_PROPERTY)
        or (image.properties or {}).get("owner_specified.openstack.sha256"),
    }
