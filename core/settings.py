"""Where kiln keeps its files and which database it writes: one place, read from the environment."""

from __future__ import annotations

import os
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    KILN_VERSION = version("kiln")
except PackageNotFoundError:  # running from a checkout that was never installed
    KILN_VERSION = "0.0.0+unknown"
SIGNING_KEY_ENV = "KILN_SIGNING_KEY"  # the ed25519 key `kiln attest` and every build's register stage sign with
# Where `ssh_cidr: auto` looks up this machine's public address (the address, as text), as Packer does.
DEFAULT_PUBLIC_IP_URL = "https://checkip.amazonaws.com"


class SettingsError(Exception):
    """A setting kiln cannot work with; str() is one line naming the setting (an environment variable) and why."""

    def __init__(self, setting: str, cause: str) -> None:
        self.setting = setting
        self.cause = " ".join(cause.split())  # one line, whatever the cause's own text holds
        super().__init__(f"{self.setting}: {self.cause}")


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def _directory(path: Path, setting: str, *, private: bool = False) -> Path:
    """`path`, created if missing (only its owner may enter it when `private`); SettingsError if it cannot be."""
    try:
        path.mkdir(mode=0o700 if private else 0o777, parents=True, exist_ok=True)
    except FileExistsError:
        raise SettingsError(setting, f"{path} exists and is not a directory") from None
    except OSError as error:
        raise SettingsError(setting, f"cannot create the directory {path}: {error.strerror}") from None
    return path


def home_setting() -> str:
    """The setting that decides the data directory, for messages."""
    return "XDG_DATA_HOME" if not os.environ.get("KILN_HOME") and os.environ.get("XDG_DATA_HOME") else "KILN_HOME"


def data_dir() -> Path:
    """KILN_HOME, else $XDG_DATA_HOME/kiln: the database, registered local images, run state (owner only)."""
    home = os.environ.get("KILN_HOME")
    path = Path(home) if home else _xdg("XDG_DATA_HOME", ".local/share") / "kiln"
    return _directory(path, home_setting(), private=True)


def cache_dir() -> Path:
    """KILN_CACHE, else $XDG_CACHE_HOME/kiln: content-addressed base images, kept between builds."""
    cache = os.environ.get("KILN_CACHE")
    path = Path(cache) if cache else _xdg("XDG_CACHE_HOME", ".cache") / "kiln"
    return _directory(path, "KILN_CACHE" if cache or not os.environ.get("XDG_CACHE_HOME") else "XDG_CACHE_HOME")


def layers_dir() -> Path:
    """KILN_LAYER_CACHE, else KILN_CACHE/layers: the layers container builds keep of their customize steps."""
    layers = os.environ.get("KILN_LAYER_CACHE")
    return _directory(Path(layers), "KILN_LAYER_CACHE") if layers else cache_dir() / "layers"


def state_dir() -> Path:
    """Per-instance working directories of the local cloud (overlays, seeds, pid files, sockets)."""
    return _directory(data_dir() / "state", home_setting(), private=True)


def images_dir() -> Path:
    """Registered local images (qcow2, raw, ova, ...), one directory per image."""
    return _directory(data_dir() / "images", home_setting())


def database_url() -> str:
    """KILN_DATABASE_URL (any SQLAlchemy URL), else SQLite in the data directory."""
    url = os.environ.get("KILN_DATABASE_URL")
    return url if url else f"sqlite:///{data_dir() / 'kiln.db'}"


def database_setting() -> str:
    """The setting that decides the database, for messages."""
    return "KILN_DATABASE_URL" if os.environ.get("KILN_DATABASE_URL") else home_setting()


def public_ip_url() -> str:
    """KILN_PUBLIC_IP_URL, else checkip.amazonaws.com: where `ssh_cidr: auto` learns this machine's public address."""
    url = os.environ.get("KILN_PUBLIC_IP_URL") or DEFAULT_PUBLIC_IP_URL
    if not re.match(r"^https?://[^\s/]+\S*$", url):
        raise SettingsError("KILN_PUBLIC_IP_URL", f"{url!r} is not an http:// or https:// URL")
    return url


def without_password(url: str) -> str:
    """A URL to show: any password between `://user:` and `@` replaced by ***."""
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", url)


NOTIFY_ENV = "KILN_NOTIFY"


def notify_urls() -> list[str]:
    """KILN_NOTIFY: notification URLs in apprise's syntax, separated by spaces, told of every finished build on
    this host (secrets such as tokens belong here, in the host's environment, not in recipes)."""
    return os.environ.get(NOTIFY_ENV, "").split()


PAUSE_TIMEOUT_ENV = "KILN_PAUSE_TIMEOUT"
DEFAULT_PAUSE_TIMEOUT = 3600.0
_PAUSE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_seconds(text: str, setting: str) -> float:
    """'90', '90s', '30m', '2h', '1d' as seconds (more than 0); a SettingsError naming `setting` otherwise."""
    value = text.strip().lower()
    number, unit = value.rstrip("smhd"), value[len(value.rstrip("smhd")):]
    try:
        seconds = float(number) * _PAUSE_UNITS[unit]
    except (KeyError, ValueError):
        seconds = -1.0
    if not seconds > 0:
        raise SettingsError(setting, f"{text!r} is not a duration such as 600, 90s, 30m or 1h")
    return seconds


def pause_timeout() -> float:
    """How long a paused build waits for someone to resume it before it gives up and cleans up (default 1 h)."""
    text = os.environ.get(PAUSE_TIMEOUT_ENV)
    return parse_seconds(text, PAUSE_TIMEOUT_ENV) if text else DEFAULT_PAUSE_TIMEOUT
