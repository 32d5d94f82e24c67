"""What kiln asks of a cloud: the protocol the build stages call (Cloud), the one kiln gc and the records need
(Collectable), the optional capabilities a backend may have (each a small protocol, checked with isinstance),
the registration every cloud module declares (Backend), and the typed values passed between them."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clouds.errors import BootTimeout, CloudError, HostKeyMismatch  # noqa: F401 - what backends take from here
from core.digests import file_digests
from core.recipe import BaseSpec, CloudTarget, Timeouts

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

# The kinds of Resource a cloud holds for kiln, in the order kiln gc releases them: instances hold key pairs,
# groups and addresses, images hold snapshots, a container's process holds its mount, the mount its loop device.
RELEASE_ORDER = (
    "instance", "image", "snapshot", "volume", "import-task", "object", "keypair", "security-group", "floating-ip",
    "process", "mount", "loop", "netns", "file",
)  # fmt: skip


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
class FileDigests:
    """Digests of one local file, computed in one pass: what kiln records and what a cloud reports back."""

    size: int
    md5: str
    sha256: str
    sha512: str

    @classmethod
    def of(cls, path: Path) -> FileDigests:
        return cls(Path(path).stat().st_size, **file_digests(path, "md5", "sha256", "sha512"))

    def by_algorithm(self, algorithm: str) -> str | None:
        return {"md5": self.md5, "sha256": self.sha256, "sha512": self.sha512}.get(algorithm.lower())


@dataclass(frozen=True)
class Resource:
    """Something a cloud holds that kiln made: found by tags for `kiln gc`."""

    cloud: str
    kind: str  # one of RELEASE_ORDER
    resource_id: str
    tags: dict[str, str] = field(default_factory=dict)
    region: str = ""
    created: dt.datetime | None = None


@runtime_checkable
class Cloud(Protocol):
    """What the build stages call of a cloud, and nothing more. Every release is idempotent: gone already is
    success."""

    name: str  # the cloud's kind: a target's `cloud:`, provenance's and the ledger's cloud column
    region: str  # where it runs machines and keeps images: an EC2 region, a clouds.yaml entry; "" for this host

    def resolve_base(self, spec: BaseSpec, ssh_user: str) -> BaseImage:
        """The base image the spec names on this cloud (fetch_base; verify, for the new image)."""

    def import_key(self, key: KeyPair, tags: dict[str, str]) -> str | None:
        """The build key as the cloud holds it (its id, ledgered); None when it travels in the user-data alone."""

    def open_ports(self, name: str, ports: list[int], tags: dict[str, str]) -> str | None:
        """A firewall opening for SSH and the probe ports (its id, ledgered); None when the cloud needs none."""

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
        """A tagged machine booting the base with the user-data, reachable on the ports."""

    def endpoint(self, instance: Instance, port: int) -> tuple[str, int]:
        """Where this host reaches a guest port."""

    def stop(self, instance: Instance, timeout: float = 120) -> StopResult | None:
        """Stop the machine cleanly (forced after timeout, and the result says so)."""

    def snapshot(self, instance: Instance, name: str, tags: dict[str, str], formats: list[str]) -> ImageRef:
        """The cloud's image of the stopped machine."""

    def tag_image(self, image: ImageRef, tags: dict[str, str]) -> None:
        """Merge kiln's tags into the image's."""

    def release(self, resource: Resource) -> None:
        """Undo what the ledger (or owned()) names."""


@runtime_checkable
class Collectable(Protocol):
    """What `kiln gc`, `kiln cleanup` and revocation need of a cloud, beside the build: what it reaches, what kiln
    made there, and how to release it."""

    name: str
    region: str

    @property
    def scope(self) -> tuple[str, ...]:
        """What this cloud reaches: two clouds of one scope list and release the same resources."""

    def reaches(self, region: str) -> bool:
        """Whether this cloud holds what provenance records in `region`."""

    def owned(self, tags: dict[str, str] | None = None) -> list[Resource]:
        """Everything kiln made here whose tags match all of `tags`."""

    def release(self, resource: Resource) -> None: ...


# -- optional capabilities: a backend has one when its class has the members (isinstance) ----------------------


@runtime_checkable
class ShowsConsole(Protocol):
    """A cloud that shows a machine's console: wait_boot pins the host key the console announces and quotes its
    last lines when the boot times out (without one, the first host key seen is recorded)."""

    console_poll_seconds: float  # how often the boot wait may read it (a local file: often; an API: seldom)

    def console(self, instance: Instance) -> str: ...


@runtime_checkable
class PowersOffFromInside(Protocol):
    """A cloud whose machine ends when its guest powers itself off (QEMU, a container's systemd), so the snapshot
    stage may power it off from inside, faster than a shutdown through the cloud."""

    def expect_power_off(self, instance: Instance) -> None:
        """The guest was told to power itself off: stop() waits for that before anything else."""


@runtime_checkable
class ReplicatesImages(Protocol):
    """A cloud that copies a new image into the target's other regions (register, each copy ledgered)."""

    regions: list[str]  # the regions besides its own that every image is copied to

    def copy_image(self, image: ImageRef, region: str, tags: dict[str, str]) -> ImageRef: ...


@runtime_checkable
class SharesImages(Protocol):
    """A cloud that lets other accounts or projects launch kiln's images (register; publish)."""

    share_with: list[str]

    def share_image(self, image: ImageRef, accounts: list[str]) -> None: ...


@runtime_checkable
class ExpiresImages(Protocol):
    """A cloud with an expiry date of its own on images (EC2's DeprecationTime), set at the end of their validity."""

    def set_expiry(self, image: ImageRef, valid_until: dt.datetime) -> dt.datetime:
        """Set it (the cloud may round it); the time set."""


@runtime_checkable
class RevokesImages(Protocol):
    """A cloud that flags a revoked image where its users find it (deprecated, deactivated, marked)."""

    def revoke_image(self, image: ImageRef, reason: str) -> None: ...


class PublishLedger(Protocol):
    """Where a publication writes what it is about to create (before the call) and what it created."""

    def intent(self, kind: str, name: str) -> Any: ...

    def created(self, handle: Any, cloud_id: str) -> None: ...

    def released(self, handle: Any) -> None: ...


class NoLedger:
    """A PublishLedger that keeps nothing: a publication no build owns (its strays are found by their tags)."""

    def intent(self, kind: str, name: str) -> None:
        return None

    def created(self, handle: Any, cloud_id: str) -> None:
        pass

    def released(self, handle: Any) -> None:
        pass


@runtime_checkable
class PublishesImages(Protocol):
    """A cloud that takes a local image's disk file as an image of its own (Glance upload, EC2 VM Import): tagged,
    shared with share_with, the same bits proved where the cloud can tell, deleted again if anything fails."""

    share_with: list[str]

    def publish_problem(self, *, bucket: str | None) -> str | None:
        """Why a publication with these options cannot work here (before anything is read or uploaded)."""

    def publish(
        self,
        path: Path,
        name: str,
        *,
        tags: dict[str, str] | None = None,
        properties: dict[str, str] | None = None,
        disk_format: str = "qcow2",
        progress: Callable[[str], None] = ...,
        bucket: str | None = None,
        ledger: PublishLedger | None = None,
    ) -> tuple[ImageRef, FileDigests]:
        """The published image and the digests of the bits it was made from. `properties` are metadata beside the
        tags where the cloud keeps such (Glance); `bucket` is where a cloud that stages the disk puts it (S3)."""

    def delete_image(self, image: ImageRef) -> None: ...


@runtime_checkable
class HoldsConnection(Protocol):
    """A cloud holding a connection open (OpenStack's session): closed when kiln is done with it."""

    def close(self) -> None: ...


@runtime_checkable
class OpensSessions(Protocol):
    """A cloud that reaches some of its build machines without SSH (the local cloud's containers)."""

    def open_session(self, instance: Instance, timeout: float, log: Callable[[str], None]) -> Session | None:
        """A session once the machine is up; None when the instance is reached over SSH like any guest."""

    def access_hint(self, instance: Instance) -> str | None:
        """How a person gets a shell on a kept machine; None when it is reached over SSH."""

    def shell_command(self, instance: Instance) -> list[str] | None:
        """The command line of a root shell on a running machine (`kiln shell`); None when reached over SSH."""


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


# -- registration ---------------------------------------------------------------------------------------------

TargetT = TypeVar("TargetT", bound=CloudTarget)


def not_a_path(image_id: str) -> bool:
    """An image id on a cloud, not a file on this host."""
    return not image_id.startswith("/")


@dataclass(frozen=True)
class Backend(Generic[TargetT]):
    """A cloud module's registration (its module-level BACKEND, listed in clouds/registry.py): everything kiln
    outside clouds/ may know of a cloud. Capabilities are not listed here: they are the protocols above that the
    opened cloud implements."""

    kind: str  # the `cloud:` of its targets
    target_model: type[TargetT]  # its targets' recipe model (core/recipe.py), the discriminator's other half
    open_target: Callable[[TargetT, Timeouts | None, str], Cloud]  # a target, its timeouts, its name -> the cloud
    default_vm_limit: Callable[[], int]  # VMs at once where no kiln-vms-* limit is set (the ephemeral server)
    # The cloud at a place provenance recorded (its region column) without a target; None when a place alone does
    # not say how to reach it (an EC2 region names no account or endpoint).
    open_place: Callable[[str], Cloud] | None = None
    # `kiln publish --to NAME` without a recipe: the cloud NAME (this kind, or one of its named places) with the
    # command's region, endpoint_url and profile options; None when it takes no publication that way.
    open_destination: Callable[..., Cloud] | None = None
    collected_always: bool = False  # kiln gc looks through open_place("") even when no build recorded a target
    names_places: bool = False  # its places are names users give (clouds.yaml entries): `--to NAME` means one
    is_image_id: Callable[[str], bool] = not_a_path  # a cloud image's id, not a file form of one
    errors: tuple[type[Exception], ...] = ()  # what its SDK raises when the cloud refuses or fails a call
