"""The one way kiln digests a file: read once in 1 MiB blocks, every asked algorithm fed from the same read."""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 1 << 20


def file_digests(path: Path | str, *algorithms: str) -> dict[str, str]:
    """{algorithm: hex digest} of the file, each algorithm one hashlib name (sha256, sha512, md5...)."""
    digests = {name: hashlib.new(name, usedforsecurity=name != "md5") for name in algorithms}
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            for digest in digests.values():
                digest.update(block)
    return {name: digest.hexdigest() for name, digest in digests.items()}


def sha256_file(path: Path | str) -> str:
    """The file's sha256, hex."""
    return file_digests(path, "sha256")["sha256"]
