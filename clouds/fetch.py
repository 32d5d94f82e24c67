"""The content-addressed cache of base disks: files and http(s) downloads, verified by sha256, resumable."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from clouds.errors import CloudError
from core.digests import sha256_file

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock: one download (or bootstrap) of the same thing at a time, across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def normalize_sha256(value: str | None, field: str) -> str:
    """'sha256:ABC…' or 'abc…' → 'abc…'; anything else is bad input naming the field."""
    if not value:
        raise CloudError(f"{field}: a sha256 is required for this base (sha256: <64 hex digits>)")
    text = value.strip().lower()
    text = text.removeprefix("sha256:")
    if not _HEX64.match(text):
        raise CloudError(f"{field}: {value!r} is not a sha256 (64 hex digits)")
    return text


def cache_path(cache_root: Path, sha256: str) -> Path:
    return cache_root / "bases" / "sha256" / sha256


def cache_file(source: Path, sha256: str, cache_root: Path) -> Path:
    """Copy a local disk file into the cache under its digest, verifying it on the way."""
    dest = cache_path(cache_root, sha256)
    if dest.exists():
        return dest
    if not source.is_file():
        raise CloudError(f"base.file: {source} does not exist")
    with file_lock(dest.with_name(sha256 + ".lock")):
        if dest.exists():
            return dest
        part = dest.with_name(sha256 + ".copy")
        digest = hashlib.sha256()
        try:
            with open(source, "rb") as src, open(part, "wb") as out:
                for chunk in iter(lambda: src.read(CHUNK), b""):
                    digest.update(chunk)
                    out.write(chunk)
            got = digest.hexdigest()
            if got != sha256:
                raise CloudError(f"base.file: {source} has sha256 {got}, the recipe says {sha256}")
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
    log.info("cached %s as %s", source, dest)
    return dest


def download(url: str, sha256: str, cache_root: Path, *, attempts: int = 3, timeout: float = 60) -> Path:
    """Download url into the cache once; an interrupted download resumes from its .part file (HTTP Range).

    The file only takes its digest's name after the whole of it matched sha256; a mismatch removes it.
    """
    if not url.startswith(("http://", "https://")):
        raise CloudError(f"base.url: {url!r} is not an http(s) URL")
    dest = cache_path(cache_root, sha256)
    if dest.exists():
        return dest
    with file_lock(dest.with_name(sha256 + ".lock")):
        if dest.exists():
            return dest
        part = dest.with_name(sha256 + ".part")
        last_error: Exception | None = None
        for attempt in range(1, attempts + 1):
            try:
                _fetch_into(url, part, timeout)
                break
            except (OSError, http.client.HTTPException) as exc:  # URLError and timeouts are OSErrors
                if isinstance(exc, urllib.error.HTTPError) and exc.code != 416 and exc.code < 500:
                    raise CloudError(f"base.url: {url}: HTTP {exc.code} {exc.reason}") from exc
                last_error = exc
                have = part.stat().st_size if part.exists() else 0
                log.warning("download of %s interrupted at %d bytes (%s); attempt %d of %d", url, have, exc,
                            attempt, attempts)  # fmt: skip
                time.sleep(min(2 * attempt, 5))
        else:
            raise CloudError(
                f"base.url: {url}: download failed after {attempts} attempts ({last_error}); "
                "run again to resume from what arrived"
            )
        got = sha256_file(part)
        if got != sha256:
            part.unlink(missing_ok=True)
            raise CloudError(f"base.url: {url} has sha256 {got}, the recipe says {sha256} (download discarded)")
        os.replace(part, dest)
    log.info("downloaded %s into %s", url, dest)
    return dest


def _fetch_into(url: str, part: Path, timeout: float) -> None:
    """One HTTP request appending to part from where it stops; restarts when the server ignores Range.

    A body cut short raises ConnectionError (http.client itself returns the truncated bytes silently),
    so the caller retries from the new end of part.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "kiln", **({"Range": f"bytes={offset}-"} if offset else {})}
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (scheme checked above)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the part file already holds everything (or more): let the digest decide
            return
        raise
    with response:
        resumed_at, total = _content_range(response.headers.get("Content-Range", ""))
        if offset and (response.status != 206 or resumed_at != offset):
            log.info("%s does not resume at byte %d (HTTP %s): starting over", url, offset, response.status)
            offset = 0
        elif offset:
            log.info("resuming %s at byte %d", url, offset)
        length = response.headers.get("Content-Length")
        expected = total if response.status == 206 else (int(length) if length and length.isdigit() else None)
        with open(part, "ab" if offset else "wb") as out:
            shutil.copyfileobj(response, out, CHUNK)
    have = part.stat().st_size
    if expected is not None and have < expected:
        raise ConnectionError(f"the server sent {have} of {expected} bytes")


def _content_range(header: str) -> tuple[int | None, int | None]:
    """'bytes 100-199/200' → (100, 200); what is missing is None."""
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", header.strip())
    if not match:
        return None, None
    return int(match.group(1)), (int(match.group(2)) if match.group(2).isdigit() else None)
