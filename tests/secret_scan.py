"""A secret scanner for tests: looks for a build's private key (every form it could leak in) and for known
secret patterns in the provenance database (every text column of every table), in step logs, in artifact
files, and in an image's filesystem (mounted read-only)."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from sqlalchemy import MetaData, String, Text, create_engine, select

from clouds.base import KeyPair

# Known secret shapes, whoever's: any private key block, an AWS secret key assignment, an AWS access key id.
PATTERNS = {
    "private key block": re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"),
    "aws secret access key": re.compile(
        rb"(?i)secret_?access_?key[\"']?\s*[:=]\s*[\"']?(?!\[REDACTED)[A-Za-z0-9/+=]{16,}"
    ),
    "aws access key id": re.compile(rb"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
}
SKIP_IMAGE_DIRS = ("proc", "sys", "dev", "run")


@dataclass(frozen=True)
class Hit:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def key_needles(key: KeyPair) -> dict[str, bytes]:
    """Every form the private half of `key` could leak in: the PEM, each line of its body, and the raw seed."""
    needles = {"private key (PEM)": key.private_key.strip().encode()}
    body = [line for line in key.private_key.splitlines() if line and not line.startswith("-----")]
    for number, line in enumerate(body):
        if len(line) >= 24:
            needles[f"private key body line {number + 1}"] = line.encode()
    private = serialization.load_ssh_private_key(key.private_key.encode(), password=None)
    seed = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())  # fmt: skip
    needles["private seed (raw)"] = seed
    needles["private seed (hex)"] = seed.hex().encode()
    needles["private seed (base64)"] = base64.b64encode(seed).rstrip(b"=")
    return needles


def scan_bytes(where: str, data: bytes, needles: dict[str, bytes], patterns: bool = True) -> list[Hit]:
    hits = [Hit(where, name) for name, needle in needles.items() if needle and needle in data]
    if patterns:
        hits += [Hit(where, name) for name, pattern in PATTERNS.items() if pattern.search(data)]
    return hits


def scan_database(url: str, needles: dict[str, bytes]) -> list[Hit]:
    """Every text value of every table (step logs included), read through SQLAlchemy reflection."""
    engine = create_engine(url)
    hits: list[Hit] = []
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        with engine.connect() as conn:
            for table in metadata.sorted_tables:
                columns = [c for c in table.columns if isinstance(c.type, String | Text)]
                if not columns:
                    continue
                for row in conn.execute(select(*columns)):
                    for column, value in zip(columns, row, strict=True):
                        if value:
                            hits += scan_bytes(f"database {table.name}.{column.name}", value.encode(), needles)
    finally:
        engine.dispose()
    return hits


def scan_files(paths: Iterable[Path], needles: dict[str, bytes], *, patterns: bool = True,
               label: Path | None = None) -> list[Hit]:  # fmt: skip
    """Regular files (symlinks not followed), read whole."""
    hits: list[Hit] = []
    for path in paths:
        if path.is_symlink() or not path.is_file():
            continue
        shown = f"/{path.relative_to(label)}" if label else str(path)
        try:
            hits += scan_bytes(shown, path.read_bytes(), needles, patterns)
        except OSError:
            continue
    return hits


def walk(root: Path, skip: tuple[str, ...] = ()) -> Iterable[Path]:
    for path in root.rglob("*"):
        relative = path.relative_to(root).parts
        if relative and relative[0] in skip:
            continue
        yield path


def scan_image(disk: Path, needles: dict[str, bytes]) -> list[Hit]:
    """Every file of the image's filesystem, mounted read-only, for the key's forms (not generic patterns:
    packages legitimately ship test keys and code that names key headers)."""
    from operations.audit import mounted_read_only

    with mounted_read_only(disk) as root:
        return scan_files(walk(root, SKIP_IMAGE_DIRS), needles, patterns=False, label=root)
