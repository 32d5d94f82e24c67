"""Where kiln keeps its files and which database it writes: one place, read from the environment."""

from __future__ import annotations

import os
from pathlib import Path

from kiln import __version__

KILN_VERSION = __version__


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def data_dir() -> Path:
    """KILN_HOME, else $XDG_DATA_HOME/kiln: the database, registered local images, run state."""
    home = os.environ.get("KILN_HOME")
    path = Path(home) if home else _xdg("XDG_DATA_HOME", ".local/share") / "kiln"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """KILN_CACHE, else $XDG_CACHE_HOME/kiln: content-addressed base images, kept between builds."""
    cache = os.environ.get("KILN_CACHE")
    path = Path(cache) if cache else _xdg("XDG_CACHE_HOME", ".cache") / "kiln"
    path.mkdir(parents=True, exist_ok=True)
    return path


def state_dir() -> Path:
    """Per-instance working directories of the local cloud (overlays, seeds, pid files, sockets)."""
    path = data_dir() / "state"
    path.mkdir(parents=True, exist_ok=True)
    return path


def images_dir() -> Path:
    """Registered local images (qcow2, raw, ova, ...), one directory per image."""
    path = data_dir() / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_url() -> str:
    """KILN_DATABASE_URL (any SQLAlchemy URL), else SQLite in the data directory."""
    url = os.environ.get("KILN_DATABASE_URL")
    return url if url else f"sqlite:///{data_dir() / 'kiln.db'}"


NOTIFY_ENV = "KILN_NOTIFY"


def notify_urls() -> list[str]:
    """KILN_NOTIFY: notification URLs in apprise's syntax, separated by spaces, told of every finished build on
    this host (secrets such as tokens belong here, in the host's environment, not in recipes)."""
    return os.environ.get(NOTIFY_ENV, "").split()
