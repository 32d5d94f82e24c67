"""The layer cache of container builds: what one customize step changed in the build container's filesystem,
kept as a layer (a tar of the changed paths and a list of the removed ones) under a key that digests everything
that went into the step, so a rebuild re-runs only from the first step whose key changed.

A step's change is found by comparing the filesystem's metadata before and after it: a path is changed when its
inode, its inode-change time (which nothing in userspace can set back) or its type differs; removed when it is
gone. Layers are written to a temporary name and renamed when complete, checked against their sha256 on use (a
corrupt one is discarded), and made under a lock per key, so two builds that need the same missing layer do not
both write it. The cache directory is 0700; sanitize runs after the cached steps, and the layers hold what the
build's steps left (the build key never enters a container: there is no SSH in it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clouds.errors import CloudError
from clouds.fetch import file_lock
from core.digests import sha256_file

log = logging.getLogger(__name__)

Manifest = dict[str, tuple[int, int, int]]  # root-relative path -> (inode, ctime_ns, file type bits)
TAR_OPTIONS = ("--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner", "--sparse")


@dataclass
class Layer:
    """One cached step: its key, what made it, and what it holds."""

    key: str
    step: str  # "packages (apt): apache2", "file files/x -> /etc/x", "script scripts/setup.sh"
    build_id: str  # the build that made it
    parent: str  # the key of the layer below it (the base digest at the root of a chain)
    created: str
    last_used: str
    size: int
    sha256: str
    removed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class LayerCache:
    """Layers on this host: <key>.tar and <key>.json under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def _paths(self, key: str) -> tuple[Path, Path]:
        if not key.isalnum():
            raise CloudError(f"layer key {key!r} is not a digest")
        return self.root / f"{key}.tar", self.root / f"{key}.json"

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """One maker of a layer at a time, across processes."""
        self._prepare()
        with file_lock(self.root / f"{key}.lock"):
            yield

    def get(self, key: str, *, verify: bool = True) -> Layer | None:
        """The layer if it is there and whole; a corrupt one is removed (and logged) so that it is made again."""
        tar, meta_path = self._paths(key)
        try:
            layer = Layer(**json.loads(meta_path.read_text()))
        except (OSError, ValueError, TypeError):
            if tar.exists() or meta_path.exists():
                log.warning("layer %s has no readable description: discarded, it will be made again", key[:12])
                self.discard(key)
            return None
        if verify and (not tar.is_file() or tar.stat().st_size != layer.size or sha256_file(tar) != layer.sha256):
            log.warning("layer %s (%s) is corrupt (its sha256 differs): discarded, it will be made again",
                        key[:12], layer.step)  # fmt: skip
            self.discard(key)
            return None
        return layer

    def touch(self, layer: Layer) -> None:
        layer.last_used = _now()
        _write_json(self._paths(layer.key)[1], layer.to_dict())

    def keep(self, key: str, root: Path, before: Manifest, *, step: str, build_id: str, parent: str) -> Layer:
        """Store what changed under root since `before` as the layer `key`."""
        self._prepare()
        changed, removed = diff(before, manifest(root))
        tar, meta_path = self._paths(key)
        partial = tar.with_name(f".{tar.name}.{os.getpid()}.part")
        try:
            write_tar(root, changed, partial)
            layer = Layer(key=key, step=step, build_id=build_id, parent=parent, created=_now(), last_used=_now(),
                          size=partial.stat().st_size, sha256=sha256_file(partial), removed=removed)  # fmt: skip
            os.replace(partial, tar)
        finally:
            partial.unlink(missing_ok=True)
        _write_json(meta_path, layer.to_dict())
        return layer

    def apply(self, layer: Layer, root: Path) -> None:
        """Make root what it was after the layer's step: remove what the step removed, extract what it changed."""
        for relative in layer.removed:
            _remove(root / relative)
        tar = self._paths(layer.key)[0]
        done = subprocess.run(["tar", "-x", "-f", str(tar), "-C", str(root), *TAR_OPTIONS, "--same-permissions"],
                              capture_output=True, text=True, timeout=1800)  # fmt: skip
        if done.returncode != 0:
            raise CloudError(f"could not apply layer {layer.key[:12]} ({layer.step}): {done.stderr.strip()[-500:]}")

    def discard(self, key: str) -> None:
        for path in self._paths(key):
            path.unlink(missing_ok=True)

    def list(self) -> list[Layer]:
        """Every complete layer, newest use first (not checksummed: listing stays cheap)."""
        found = [layer for meta in self.root.glob("*.json") if (layer := self.get(meta.stem, verify=False))]
        return sorted(found, key=lambda layer: layer.last_used, reverse=True)

    def prune(self, *, max_size: int | None = None, older_than: dt.timedelta | None = None) -> list[Layer]:
        """Remove layers unused for longer than older_than, then the least recently used until the cache holds at
        most max_size bytes; returns what went."""
        layers = sorted(self.list(), key=lambda layer: layer.last_used)  # least recently used first
        cutoff = (dt.datetime.now(dt.UTC) - older_than).isoformat(timespec="seconds") if older_than else None
        total = sum(layer.size for layer in layers)
        gone = []
        for layer in layers:
            too_old = cutoff is not None and layer.last_used < cutoff
            too_big = max_size is not None and total > max_size
            if not (too_old or too_big):
                continue
            with self.locked(layer.key):
                self.discard(layer.key)
            (self.root / f"{layer.key}.lock").unlink(missing_ok=True)
            total -= layer.size
            gone.append(layer)
        return gone


# ----------------------------------------------------------------------------------------- filesystem diff


def manifest(root: Path) -> Manifest:
    """Every path under root (not crossing into other filesystems) with its inode, ctime and type."""
    root = Path(root)
    device = root.stat().st_dev
    found: Manifest = {}
    pending = [str(root)]
    prefix = len(str(root)) + 1
    while pending:
        directory = pending.pop()
        with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found[entry.path[prefix:]] = (info.st_ino, info.st_ctime_ns, stat.S_IFMT(info.st_mode))
                if stat.S_ISDIR(info.st_mode) and info.st_dev == device:
                    pending.append(entry.path)
    return found


def diff(before: Manifest, after: Manifest) -> tuple[list[str], list[str]]:
    """(changed paths, removed paths): a path whose type changed is both removed and changed; a removed directory
    is listed once, without its contents."""
    changed = sorted(path for path, now in after.items() if before.get(path) != now)
    gone = {path for path in before if path not in after}
    gone |= {path for path in changed if path in before and before[path][2] != after[path][2]}
    removed = sorted(path for path in gone if not any(parent in gone for parent in _parents(path)))
    return changed, removed


def _parents(path: str) -> Iterator[str]:
    parts = path.split("/")
    for end in range(1, len(parts)):
        yield "/".join(parts[:end])


def write_tar(root: Path, paths: list[str], dest: Path) -> None:
    """A tar of exactly these root-relative paths (directories without their contents), metadata and all."""
    with tempfile.NamedTemporaryFile("wb", prefix="kiln-layer-", suffix=".list", delete=False) as listing:
        listing.write(b"\0".join(path.encode("utf-8", "surrogateescape") for path in paths))
    try:
        done = subprocess.run(
            ["tar", "-c", "-f", str(dest), "-C", str(root), "--no-recursion", "--null", "-T", listing.name,
             *TAR_OPTIONS, "--warning=no-file-changed", "--warning=no-file-removed", "--warning=no-file-ignored"],
            capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
    finally:
        os.unlink(listing.name)
    if done.returncode not in (0, 1):  # 1: a file changed while it was read (a running journal)
        raise CloudError(f"could not write layer {dest.name}: {done.stderr.strip()[-500:]}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(partial, path)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
