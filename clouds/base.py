"""The cloud protocol every backend implements, and the typed values the build stages pass between them."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

if TYPE_CHECKING:
    from clouds.layers import Layer
    from clouds.session import Session

# Tags every backend puts on what it creates, so `kiln gc` can find it without the database.
TAG_BUILD = "kiln:build-id"
TAG_RECIPE = "kiln:recipe"
TAG_RECIPE_VERSION = "kiln:recipe-version"
TAG_COMMIT = "kiln:commit"
TAG_ROLE = "kiln:role"  # build | verify | image
TAG_VALID_UNTIL = "kiln:valid-until"  # on images: the end of the recipe's valid_for (ISO 8601, UTC)


class CloudError(RuntimeError):
    """A cloud call failed; the message names the resource and what to do."""


class BootTimeout(CloudError):
    """The guest did not become reachable in time; the message carries the console tail."""


class HostKeyMismatch(CloudError):
    """The guest's SSH host key differs from the one its console announced."""


@dataclass(frozen=True)
class KeyPair:
    """An ephemeral ed25519 key pair. The private half never reaches a log, the database or an image."""

    name: str
    public_key: str  # OpenSSH format: "ssh-ed25519 AAAA... comment"
    private_key: str = field(repr=False)  # OpenSSH PEM

    @classmethod
    def generate(cls, name: str) -> KeyPair:
        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ).decode()
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ).decode()
        return cls(name=name, public_key=f"{public} {name}", private_key=private)

    @property
    def fingerprint(self) -> str:
        """SHA256 fingerprint as ssh-keygen -l prints it (safe to log)."""
        import base64
        import hashlib

        blob = base64.b64decode(self.public_key.split()[1])
        return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class BaseImage:
    """The resolved starting point of a build on one cloud."""

    cloud: str
    image_id: str  # AMI id, Glance id, or for local the path of the disk file (stable_id: what it is anywhere)
    digest: str  # sha256 of the bits where known, else the cloud's own immutable marker
    ssh_user: str
    name: str = ""
    region: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    # What names these bits on every host, when image_id is a host's own handle (a local disk's path): the
    # content (`base:debian-bookworm@sha256:…`, `sha256:…`). "" when image_id already does (AMI, Glance uuid).
    stable_id: str = ""

    @property
    def provenance_id(self) -> str:
        """The id provenance records this base under: the same on every host."""
        return self.stable_id or self.image_id


@dataclass
class Instance:
    """A running (or stopped) machine that kiln launched."""

    cloud: str
    instance_id: str
    name: str
    ssh_user: str
    tags: dict[str, str] = field(default_factory=dict)
    host_key_fingerprints: list[str] = field(default_factory=list)  # "SHA256:..." announced on the console
    details: dict[str, Any] = field(default_factory=dict)  # backend-specific: pid, ports, ip, region


@dataclass(frozen=True)
class ImageFile:
    """One file form of a local image (qcow2, raw, vmdk, vdi, ova)."""

    format: str
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ImageRef:
    """An image on a cloud: what snapshot returns and register records."""

    cloud: str
    image_id: str
    name: str
    region: str = ""
    files: tuple[ImageFile, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """Digest of the primary disk file when one exists (the first file), else ''."""
        return self.files[0].sha256 if self.files else ""


@dataclass(frozen=True)
class StopResult:
    """How an instance stopped. forced: the guest ignored the clean shutdown and was killed after the timeout."""

    forced: bool
    seconds: float
    detail: str = ""


@dataclass(frozen=True)
class Resource:
    """Something a cloud holds that kiln made: found by tags for `kiln gc`."""

    cloud: str
    kind: str  # instance | keypair | security-group | image | snapshot | floating-ip | file | process
    resource_id: str
    tags: dict[str, str] = field(default_factory=dict)
    region: str = ""
    created: dt.datetime | None = None


@runtime_checkable
class Cloud(Protocol):
    """What the build stages need of a cloud. Every delete is idempotent: gone already is success."""

    name: str

    def resolve_base(self, spec: Any, ssh_user: str) -> BaseImage: ...

    def launch(
        self,
        base: BaseImage,
        key: KeyPair,
        user_data: str,
        tags: dict[str, str],
        ports: list[int],
        *,
        role: str = "build",
    ) -> Instance: ...

    def endpoint(self, instance: Instance, port: int) -> tuple[str, int]: ...

    def console(self, instance: Instance) -> str: ...

    def stop(self, instance: Instance, timeout: float = 120) -> StopResult | None: ...

    def snapshot(self, instance: Instance, name: str, tags: dict[str, str], formats: list[str]) -> ImageRef: ...

    def terminate(self, instance: Instance) -> None: ...

    def delete_keypair(self, key: KeyPair) -> None: ...

    def delete_image(self, image: ImageRef) -> None: ...

    def tag_image(self, image: ImageRef, tags: dict[str, str]) -> None: ...

    def owned(self, tags: dict[str, str] | None = None) -> list[Resource]: ...

    def release(self, resource: Resource) -> None: ...


@runtime_checkable
class OpensSessions(Protocol):
    """A cloud that reaches some of its build machines without SSH (the local cloud's containers)."""

    def open_session(self, instance: Instance, timeout: float, log: Callable[[str], None]) -> Session | None:
        """A session once the machine is up; None when the instance is reached over SSH like any guest."""

    def access_hint(self, instance: Instance) -> str | None:
        """How a person gets a shell on a kept machine; None when it is reached over SSH."""


class StepLayers(Protocol):
    """One build machine's customize steps as cached layers (see clouds/layers.py)."""

    def reusable(self, keys: list[str]) -> list[Layer]:
        """The longest run of cached layers from the first key."""

    def restore(self, layers: list[Layer], log: Callable[[str], None]) -> Session:
        """Put the layers in place on the machine (restarting it); the new session."""

    def begin(self) -> None:
        """Remember the machine's filesystem before a step."""

    def keep(self, key: str, *, step: str, build_id: str, parent: str) -> Layer:
        """Keep what the step changed as the layer `key`."""


@runtime_checkable
class KeepsLayers(Protocol):
    """A cloud whose build machines' filesystems it can read between steps (the local build container)."""

    def layers(self, instance: Instance) -> StepLayers | None:
        """The machine's step layers; None when it cannot keep them (a VM)."""
