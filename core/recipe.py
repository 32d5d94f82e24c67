"""The recipe: its YAML format, its validation into typed models, its fingerprint and its JSON Schema."""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import ipaddress
import json
import os
import posixpath
import re
import stat
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from core import settings
from core.digests import sha256_file

# Named like virt-sysprep's operations where the meaning is the same; all run unless the recipe names some.
SANITIZE_OPERATIONS = (
    "ssh-hostkeys",
    "ssh-userdir",
    "machine-id",
    "cloud-init-state",
    "udev-persistent-net",
    "bash-history",
    "logfiles",
    "tmp-files",
    "package-manager-cache",
    "dhcp-client-state",
    "zero-free-space",
)

OUTPUT_FORMATS = ("qcow2", "raw", "vmdk", "vdi", "ova")
# ec2 ssh_cidr: this machine's public address, looked up like Packer's temporary_security_group_source_public_ip
SSH_CIDR_AUTO = "auto"
BASE_SOURCES = ("image", "name", "ssm_parameter", "file", "url", "bootstrap")
FINGERPRINT_SCHEME = 1  # bump when the canonical form changes, so old fingerprints never collide

# What the loader reads at most: a recipe is a page of YAML, so anything far bigger is a mistake or an attack.
MAX_RECIPE_BYTES = 256 * 1024
MAX_YAML_VALUES = 5_000  # scalars and collections after alias expansion (an alias bomb stops here)
MAX_YAML_DEPTH = 32  # nesting, aliases included
MAX_NUMBER_DIGITS = 1000  # Python refuses int() of more than 4300 digits (a ValueError, not YAML's error)
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
MAX_PROBE_TIMEOUT_SECONDS = 3600
MAX_MEMORY_MB = 1024 * 1024

SLUG = r"^[a-z0-9][a-z0-9._-]*$"
VERSION = r"^[0-9]{1,9}(\.[0-9]{1,9}){0,2}(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$"
PACKAGE = r"^[A-Za-z0-9][A-Za-z0-9.+:~_=-]*$"
SHA256 = r"^[0-9a-f]{64}$"
HTTP_URL = r"^https?://[^\s/]+\S*$"
EMAIL = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
MODE = r"^[0-7]{3,4}$"
OWNER = r"^[A-Za-z0-9_][A-Za-z0-9._-]*(:[A-Za-z0-9_][A-Za-z0-9._-]*)?$"
UNIX_USER = r"^[a-z_][a-z0-9_-]*$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
AWS_REGION = r"^[a-z]{2}(-[a-z]+)+-\d+$"
AWS_ACCOUNT = r"^\d{12}$"
EC2_INSTANCE_TYPE = r"^[a-z0-9][a-z0-9-]*\.[a-z0-9-]+$"
SUBNET_ID = r"^subnet-[0-9a-f]+$"
VPC_ID = r"^vpc-[0-9a-f]+$"
NO_SPACE = r"^\S+$"
HTTP_PATH = r"^/\S*$"
SSM_PATH = r"^/\S+$"
ONE_LINE = r"^[^\t\n]*$"

# What each pattern means, in words, for error messages (pydantic would print the regex).
_PATTERN_MEANING = {
    SLUG: "a slug: lowercase letters, digits, '.', '_' or '-', starting with a letter or digit",
    VERSION: "a version like 1, 1.2 or 1.2.3, optionally followed by -suffix or +suffix "
             "(letters, digits, '.' and '-')",
    PACKAGE: "a package name (letters, digits and . + : ~ _ = -; no spaces or shell characters)",
    SHA256: "a sha256: 64 lowercase hex digits, as sha256sum prints it",
    HTTP_URL: "an http:// or https:// URL",
    EMAIL: "an email address like builder@example.org",
    MODE: "an octal file mode like \"0644\"",
    OWNER: "an owner like root or root:root",
    UNIX_USER: "a Unix user name like debian or admin",
    ENV_NAME: "an environment variable name (letters, digits, _)",
    AWS_REGION: "an AWS region like us-east-1",
    AWS_ACCOUNT: "a 12-digit AWS account id",
    EC2_INSTANCE_TYPE: "an EC2 instance type like t3.small",
    SUBNET_ID: "a subnet id like subnet-0abc123",
    VPC_ID: "a VPC id like vpc-0abc123",
    NO_SPACE: "a single word without spaces",
    HTTP_PATH: "an absolute URL path like /index.html",
    SSM_PATH: "an SSM parameter path like /aws/service/debian/release/12/latest/amd64",
    ONE_LINE: "one line of text (no tabs or line breaks)",
}


class Problem(NamedTuple):
    """One thing wrong with a recipe: the field path, what is wrong, and the YAML line where known."""

    field: str
    message: str
    line: int | None


class RecipeError(Exception):
    """A recipe that cannot be used; str() gives one `file:line: field: message` line per problem."""

    def __init__(self, file: str | Path, problems: list[Problem]) -> None:
        self.file = Path(file)
        self._shown = str(file)
        self.problems = problems
        super().__init__(str(self))

    def lines(self) -> list[str]:
        return [_render_problem(self._shown, problem) for problem in self.problems]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _render_problem(file: str, problem: Problem) -> str:
    where = f"{file}:{problem.line}" if problem.line is not None else file
    line = f"{where}: {problem.field}: {problem.message}" if problem.field else f"{where}: {problem.message}"
    return printable(line)  # one line, whatever the recipe's keys, values or file name hold


# Characters that make text show something other than what it is: C0/C1 controls (terminal escapes, carriage
# returns, line breaks) and the Unicode bidirectional controls of "Trojan Source" (CVE-2021-42574).
BIDI_CONTROLS = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNPRINTABLE = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{BIDI_CONTROLS}]")
_FORBIDDEN_IN_VALUES = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029{BIDI_CONTROLS}]")  # tab, newline ok
_BIDI = re.compile(f"[{BIDI_CONTROLS}]")


def printable(text: str) -> str:
    """`text` on one line with every control and bidirectional character shown as its escape (\\n, \\x1b,
    \\u202e): safe to print to a terminal or a log line."""
    return _UNPRINTABLE.sub(lambda match: repr(match.group())[1:-1], text)


def _unsafe_character(text: str, *, key: bool) -> str | None:
    """Why `text` may not appear in a recipe (a control or bidirectional character), or None."""
    found = (_UNPRINTABLE if key else _FORBIDDEN_IN_VALUES).search(text)
    if found is None:
        return None
    char = found.group()
    code = f"U+{ord(char):04X}"
    if _BIDI.match(char):
        return f"contains the bidirectional control {code}, which makes text display differently from what it is"
    return f"contains the control character {code}"


def _field_error(message: str, *sub: str | int) -> PydanticCustomError:
    """An error raised by a model-level check but belonging to a field below it (`sub`, relative)."""
    return PydanticCustomError("kiln_field", "{message}", {"message": message, "sub": sub})


def _yaml_text(value: Any) -> Any:
    """The source text of a YAML number, for fields that are text even when YAML reads a number."""
    if isinstance(value, bool):
        return value
    if isinstance(value, _YamlInt | _YamlFloat):
        return value.yaml_text
    if isinstance(value, int | float):
        return str(value)
    return value


YamlText = Annotated[str, BeforeValidator(_yaml_text)]


class _Model(BaseModel):
    # strict: YAML already has types, so "yes" is not a boolean and "80" is not a port
    model_config = ConfigDict(extra="forbid", strict=True)


# ---------------------------------------------------------------- paths inside the recipe's directory


def _recipe_relative(value: str, info: ValidationInfo) -> str:
    """Normalise a recipe-relative path; with a validation context, check it is a regular file inside."""
    if not value:
        raise ValueError("must not be empty")
    if value.startswith("/"):
        raise ValueError(f"{value} is absolute; give a path relative to the recipe's directory")
    normal = posixpath.normpath(value)
    if normal == ".." or normal.startswith("../"):
        raise ValueError(f"{value} points outside the recipe's directory")
    context = info.context or {}
    base_dir: Path | None = context.get("base_dir")
    if base_dir is None:
        return normal
    shown = context.get("shown_dir", f"{base_dir}/")
    full = base_dir / normal
    if not full.resolve().is_relative_to(base_dir.resolve()):
        raise ValueError(f"{value} is a symlink that resolves outside the recipe's directory ({shown})")
    if not full.exists():
        raise ValueError(f"{value} does not exist (relative to {shown})")
    if not full.is_file():
        raise ValueError(f"{value} is not a regular file (relative to {shown})")
    return normal


# ---------------------------------------------------------------- models


class Author(_Model):
    """Who maintains the recipe."""

    name: str = Field(min_length=1, max_length=200, pattern=ONE_LINE)
    email: str | None = Field(default=None, pattern=EMAIL)


class FileSpec(_Model):
    """A file copied from the recipe's directory into the guest."""

    src: str = Field(description="Path relative to the recipe's directory.")
    dest: str = Field(max_length=4096, description="Absolute path in the guest.")
    mode: YamlText = Field(default="0644", pattern=MODE, description="Octal mode, e.g. \"0644\".")
    owner: str = Field(default="root:root", pattern=OWNER)

    _check_src = field_validator("src")(_recipe_relative)

    @field_validator("mode")
    @classmethod
    def _four_digit_mode(cls, mode: str) -> str:
        return mode.zfill(4)

    @field_validator("dest")
    @classmethod
    def _absolute_guest_path(cls, dest: str) -> str:
        if not dest.startswith("/"):
            raise ValueError(f"{dest} is relative; give an absolute path in the guest, like /etc/motd")
        if ".." in dest.split("/"):
            raise ValueError(f"{dest} contains '..'; give the path without it")
        if dest.endswith("/") or dest.endswith("/."):
            raise ValueError(f"{dest} names a directory; give the full path of the file")
        if any(ord(char) < 32 for char in dest):
            raise ValueError("contains control characters")
        normal = "/" + posixpath.normpath(dest).lstrip("/")  # normpath keeps a leading "//"
        if normal == "/":
            raise ValueError(f"{dest} is the root directory; give the full path of a file")
        return normal


class Script(_Model):
    """A shell script run as root in the guest: a file in the recipe's directory, or inline text."""

    path: str | None = Field(default=None, description="Script file relative to the recipe's directory.")
    inline: str | None = Field(default=None, description="Shell text run as is.")
    name: str = Field(default="", description="Shown in logs; defaults to the path or inline-N.")
    env: dict[Annotated[str, Field(pattern=ENV_NAME)], str] = {}

    @field_validator("path")
    @classmethod
    def _path_inside_recipe(cls, path: str | None, info: ValidationInfo) -> str | None:
        return None if path is None else _recipe_relative(path, info)

    @field_validator("inline")
    @classmethod
    def _inline_not_blank(cls, inline: str | None) -> str | None:
        if inline is not None and not inline.strip():
            raise ValueError("is empty")
        return inline

    @field_validator("name")
    @classmethod
    def _printable_name(cls, name: str) -> str:
        if any(ord(char) < 32 for char in name) or len(name) > 100:
            raise ValueError("must be one line of at most 100 characters")
        return name

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Script:
        if (self.path is None) == (self.inline is None):
            which = "both" if self.path is not None else "neither"
            raise ValueError(f"give either path or inline (found {which})")
        if not self.name and self.path is not None:
            self.name = self.path
        return self


def _script_from_yaml(value: Any) -> Any:
    """`scripts/x.sh` is short for `{path: scripts/x.sh}`."""
    if isinstance(value, str):
        return {"path": value}
    if not isinstance(value, dict):
        raise PydanticCustomError(
            "kiln_field",
            "{message}",
            {"message": f"expected a script path or a mapping {{path: ...}} or {{inline: ...}}, "
                        f"got {_describe(value)}", "sub": ()},
        )
    return value


ScriptEntry = Annotated[Script, BeforeValidator(_script_from_yaml, json_schema_input_type=str | Script)]


class SanitizeSpec(_Model):
    """Which sanitize operations run before the snapshot: all of them; only those `enable` names (as virt-sysprep's
    --enable); or all but those `disable` names. Not both lists."""

    enable: list[Literal[SANITIZE_OPERATIONS]] = Field(  # type: ignore[valid-type]
        default=[], description="Run only these operations (every other one is left out).")
    disable: list[Literal[SANITIZE_OPERATIONS]] = Field(  # type: ignore[valid-type]
        default=[], description="Run every operation but these.")

    @model_validator(mode="after")
    def _not_both(self) -> SanitizeSpec:
        for index, name in enumerate(self.disable):
            if name in self.enable:
                raise _field_error(f"{name!r} is both enabled and disabled; keep it in one list", "disable", index)
        if self.enable and self.disable:
            raise _field_error("give enable (only these run) or disable (every operation but these run), not both",
                               "disable")  # fmt: skip
        return self

    def selected(self) -> list[str]:
        """The operations to run, in SANITIZE_OPERATIONS order."""
        if self.enable:
            return [name for name in SANITIZE_OPERATIONS if name in self.enable]
        return [name for name in SANITIZE_OPERATIONS if name not in self.disable]


class CommandProbe(_Model):
    """Run a command in the booted image; pass on the exit code and, if given, a substring of stdout."""

    run: str = Field(min_length=1)
    expect: str | None = None
    exit_code: int = Field(default=0, ge=0, le=255)
    timeout: int = Field(default=60, gt=0, le=MAX_PROBE_TIMEOUT_SECONDS)


class PortProbe(_Model):
    """A TCP port of the booted image accepts connections."""

    port: int = Field(ge=1, le=65535)
    timeout: int = Field(default=60, gt=0, le=MAX_PROBE_TIMEOUT_SECONDS)


class HttpProbe(_Model):
    """An HTTP GET on the booted image returns this status and, if given, a substring of the body."""

    port: int = Field(default=80, ge=1, le=65535)
    path: str = Field(default="/", pattern=HTTP_PATH)
    status: int = Field(default=200, ge=100, le=599)
    expect: str | None = None
    timeout: int = Field(default=60, gt=0, le=MAX_PROBE_TIMEOUT_SECONDS)


def _one_key_of_non_null_properties(schema: dict[str, Any]) -> None:
    """JSON Schema of a single-key mapping whose value is never null (`{http: {...}}`)."""
    schema.update(minProperties=1, maxProperties=1)
    for prop in schema["properties"].values():
        branches = [branch for branch in prop.pop("anyOf") if branch != {"type": "null"}]
        prop.update(branches[0])
        prop.pop("default", None)


class Probe(_Model):
    """One verify step: exactly one of command, port or http."""

    model_config = ConfigDict(json_schema_extra=_one_key_of_non_null_properties)

    command: CommandProbe | None = None
    port: PortProbe | None = None
    http: HttpProbe | None = None

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> Probe:
        kinds = [kind for kind in ("command", "port", "http") if getattr(self, kind) is not None]
        if len(kinds) != 1:
            found = " and ".join(kinds) if kinds else "none"
            raise ValueError(f"a probe has exactly one kind (command, port or http); found {found}")
        return self

    @property
    def kind(self) -> Literal["command", "port", "http"]:
        if self.command is not None:
            return "command"
        return "port" if self.port is not None else "http"

    @property
    def spec(self) -> CommandProbe | PortProbe | HttpProbe:
        spec = self.command or self.port or self.http
        assert spec is not None  # guaranteed by _exactly_one_kind
        return spec

    @property
    def timeout(self) -> int:
        return self.spec.timeout

    @property
    def label(self) -> str:
        """Short human text: `command systemctl is-active apache2`, `port :22`, `http :80/test.txt`."""
        if self.command is not None:
            run = self.command.run if len(self.command.run) <= 48 else self.command.run[:47] + "…"
            return f"command {run}"
        if self.port is not None:
            return f"port :{self.port.port}"
        assert self.http is not None
        return f"http :{self.http.port}{self.http.path}"


class Outputs(_Model):
    """Disk formats the build produces (local cloud); the first is the primary image."""

    formats: list[Literal[OUTPUT_FORMATS]] = Field(default=["qcow2"], min_length=1)  # type: ignore[valid-type]

    @field_validator("formats")
    @classmethod
    def _no_duplicates(cls, formats: list[str]) -> list[str]:
        for index, name in enumerate(formats):
            if name in formats[:index]:
                raise _field_error(f"{name!r} is listed twice", index)
        return formats


_CRON_FIELDS = (  # name, lowest, highest, names allowed
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
    ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)


def _cron_problem(expression: str) -> str | None:
    """Why a 5-field cron expression is malformed, or None when it is well formed."""
    fields = expression.split()
    if len(fields) != 5:
        return f"{expression!r} has {len(fields)} fields; cron needs 5 (minute hour day-of-month month day-of-week)"
    for text, (what, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        for part in text.split(","):
            match = re.fullmatch(r"(\*|[0-9a-z]+(?:-[0-9a-z]+)?)(?:/(\d+))?", part.lower())
            if not match or (match.group(2) is not None and int(match.group(2)) == 0):
                return f"{what} field {text!r} is not cron syntax"
            if match.group(1) == "*":
                continue
            for bound in match.group(1).split("-"):
                value = names.index(bound) + (low if what == "month" else 0) if bound in names else None
                if value is None and not bound.isdigit():
                    return f"{what} field {text!r}: {bound!r} is not a number" + (
                        f" or one of {', '.join(names)}" if names else ""
                    )
                if value is None and not low <= int(bound) <= high:
                    return f"{what} field {text!r}: {bound} is outside {low}-{high}"
    return None


class Schedule(_Model):
    """Hints for the nightly-rebuild flow."""

    cron: str | None = Field(default=None, description="5-field cron expression for scheduled rebuilds.")
    nightly: bool = Field(default=True, description="Rebuild in the nightly run when stale.")

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, cron: str | None) -> str | None:
        if cron is not None and (problem := _cron_problem(cron)):
            raise ValueError(problem)
        return None if cron is None else " ".join(cron.split())


VALIDITY = re.compile(r"^\s*([1-9][0-9]{0,3})\s*(hour|day|week|month|year)s?\s*$", re.IGNORECASE)
DEFAULT_VALIDITY = "1 year"  # like StratusLab's signed metadata: an image leaves the catalogue unless renewed


def validity_problem(text: str) -> str | None:
    """Why `text` is not a validity period such as "2 days", "6 months" or "1 year" (None when it is one)."""
    if not VALIDITY.match(text):
        return f"{text!r} is not a period such as 12 hours, 2 days, 3 weeks, 6 months or 1 year"
    return None


def valid_until(start: dt.datetime, period: str) -> dt.datetime:
    """The end of a validity period (calendar months and years: 31 Jan + 1 month is 28 or 29 Feb)."""
    from dateutil.relativedelta import relativedelta

    match = VALIDITY.match(period)
    if match is None:
        raise ValueError(validity_problem(period))
    count, unit = int(match[1]), match[2].lower()
    return start + relativedelta(**{f"{unit}s": count})


def notify_url_problem(url: str) -> str | None:
    """Why apprise cannot send to `url` (None when it can): an unknown scheme or a malformed URL."""
    import apprise

    if apprise.Apprise.instantiate(url) is None:
        return "is not a notification URL apprise can send to (e.g. json://host/path, mailto://…, slack://…)"
    return None


def masked_notify_url(url: str) -> str:
    """The URL with its credentials and tokens masked, as apprise prints it: safe for a log or the database."""
    import apprise

    plugin = apprise.Apprise.instantiate(url)
    return plugin.url(privacy=True) if plugin is not None else "(invalid notification URL)"


class Timeouts(_Model):
    """Stage time limits in seconds."""

    boot: int = Field(default=900, gt=0, le=MAX_TIMEOUT_SECONDS)
    customize: int = Field(default=3600, gt=0, le=MAX_TIMEOUT_SECONDS)
    image: int = Field(default=1800, gt=0, le=MAX_TIMEOUT_SECONDS)


class BaseSpec(_Model):
    """Where a build starts: exactly one of image, name, ssm_parameter, file, url or bootstrap."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [{"required": [source]} for source in BASE_SOURCES],
            "dependentRequired": {"url": ["sha256"], "owners": ["name"], "packages": ["bootstrap"]},
        }
    )

    image: str | None = Field(default=None, min_length=1,
                              description="AMI id, Glance id or name, or a kiln local image id.")
    name: str | None = Field(default=None, min_length=1, description="Image name or pattern; the newest wins.")
    owners: list[YamlText] | None = Field(default=None, description="EC2 owners of `name` images.")
    ssm_parameter: str | None = Field(default=None, pattern=SSM_PATH, description="EC2 SSM parameter path.")
    file: str | None = Field(default=None, description="Disk image relative to the recipe (local).")
    url: str | None = Field(default=None, pattern=HTTP_URL, description="Disk image to download (local).")
    sha256: str | None = Field(default=None, pattern=SHA256)
    bootstrap: Literal["debian-bookworm"] | None = Field(default=None, description="Build the base (local).")
    packages: list[Annotated[str, Field(pattern=PACKAGE)]] | None = Field(
        default=None, description="Extra packages baked into a bootstrap base."
    )

    @field_validator("file")
    @classmethod
    def _file_inside_recipe(cls, file: str | None, info: ValidationInfo) -> str | None:
        return None if file is None else _recipe_relative(file, info)

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo) -> BaseSpec:
        sources = [source for source in BASE_SOURCES if getattr(self, source) is not None]
        if len(sources) != 1:
            choices = ", ".join(BASE_SOURCES)
            if not sources:
                raise ValueError(f"no base given; set exactly one of {choices}")
            raise ValueError(f"set exactly one base source, found {' and '.join(sources)} (choices: {choices})")
        if self.owners is not None and self.name is None:
            raise _field_error("owners only applies to a name search", "owners")
        if self.packages is not None and self.bootstrap is None:
            raise _field_error("packages only applies to a bootstrap base", "packages")
        if self.sha256 is not None and self.file is None and self.url is None:
            raise _field_error("sha256 only applies to a file or url base", "sha256")
        if self.url is not None and self.sha256 is None:
            raise _field_error("is required with url: kiln checks every base it downloads", "sha256")
        base_dir = (info.context or {}).get("base_dir")
        if self.file is not None and self.sha256 is not None and base_dir is not None:
            actual = sha256_file(base_dir / self.file)
            if actual != self.sha256:
                raise _field_error(f"{self.file} has sha256 {actual}, not {self.sha256}", "sha256")
        return self

    @property
    def kind(self) -> Literal["image", "name", "ssm_parameter", "file", "url", "bootstrap"]:
        return next(source for source in BASE_SOURCES if getattr(self, source) is not None)  # type: ignore[return-value]


class CloudTarget(_Model):
    """What every target says, whatever its cloud; each cloud's model adds its own fields and its `cloud` literal
    (the discriminator)."""

    base: BaseSpec
    ssh_user: str = Field(default="debian", pattern=UNIX_USER, description="Login user of the base image.")
    disk_size_gb: int | None = Field(default=None, gt=0, le=16384)
    build_in: Literal["vm"] = Field(default="vm", description="Cloud targets build in an instance reached over SSH.")

    _allowed_bases: typing.ClassVar[tuple[str, ...]] = BASE_SOURCES
    _owners_apply: typing.ClassVar[bool] = False  # base.owners narrows a name search to these image owners

    @model_validator(mode="after")
    def _base_fits_cloud(self) -> CloudTarget:
        cloud = type(self).model_fields["cloud"].default
        kind = self.base.kind
        if kind not in self._allowed_bases:
            allowed = ", ".join(self._allowed_bases)
            raise _field_error(f"{kind} bases are not available for {cloud} targets (use {allowed})", "base", kind)
        if self.base.owners is not None and not self._owners_apply:
            owning = ", ".join(sorted(kind for kind, model in _MODELS.items() if model._owners_apply))
            raise _field_error(f"owners only applies to {owning} targets, not {cloud}", "base", "owners")
        return self

    def check_settings(self) -> None:
        """Read the host settings a build of this target uses, so a bad one stops the build before anything starts
        (SettingsError naming the setting)."""
        settings.data_dir()


def _recorded(info: ValidationInfo | None) -> bool:
    """Validating a target recorded by an earlier build (to clean up after it), not one about to be built."""
    return bool(info is not None and (info.context or {}).get("recorded"))


def _cidr(value: str | None, info: ValidationInfo | None = None) -> str | None:
    """An IPv4 or IPv6 CIDR block, exactly as meant: no /0 (the whole internet), no host bits to drop."""
    if value is None:
        return None
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a CIDR block like 203.0.113.0/24 or 2001:db8::/64") from None
    address = ipaddress.ip_interface(value).ip
    if _recorded(info):
        return str(network)
    if network.prefixlen == 0:
        meant = f"; did you mean {address}/{address.max_prefixlen}?" if not address.is_unspecified else ""
        raise ValueError(f"{value} is every address on the internet: SSH would be open to the world; give the "
                         f"range that may reach the build{meant}")
    if network.network_address != address:
        raise ValueError(f"{value} has host bits set: write {network} for that network, or "
                         f"{address}/{address.max_prefixlen} for the one address")
    return str(network)


def _ec2_cidr(value: str | None, info: ValidationInfo) -> str | None:
    return value if value == SSH_CIDR_AUTO else _cidr(value, info)


class LocalTarget(CloudTarget):
    """This host: a container (or a QEMU guest) to build in, a QEMU guest to verify in."""

    cloud: Literal["local"] = "local"
    memory_mb: int = Field(default=2048, ge=256, le=MAX_MEMORY_MB)
    cpus: int = Field(default=2, ge=1, le=64)
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    build_in: Literal["container", "vm"] = Field(  # type: ignore[assignment] - widens the base's choice
        default="container",
        description="container: customize and sanitize run in a systemd-nspawn container on the base's own "
        "filesystem, at native speed (scripts run as root on this host's kernel); vm: in a QEMU guest, which also "
        "isolates a recipe you do not trust and allows kernel work (modules, sysctls, mounts). verify always boots "
        "the image in QEMU.",
    )
    qcow2_compression: Literal["zstd", "zlib"] = Field(
        default="zstd",
        description="zstd: faster and smaller, read by QEMU 5.1 or newer; zlib: for hypervisors with an older "
        "QEMU (Ubuntu 20.04 and older compute hosts) that the qcow2 is published to.",
    )

    _allowed_bases = ("image", "name", "file", "url", "bootstrap")

    def check_settings(self) -> None:
        super().check_settings()
        settings.cache_dir()


class EC2Target(CloudTarget):
    """Amazon EC2 (or an EC2-compatible endpoint)."""

    cloud: Literal["ec2"] = "ec2"
    region: str = Field(pattern=AWS_REGION)
    profile: str | None = Field(default=None, min_length=1, description="AWS profile name.")
    endpoint_url: str | None = Field(default=None, pattern=HTTP_URL)
    instance_type: str = Field(default="t3.small", pattern=EC2_INSTANCE_TYPE)
    subnet_id: str | None = Field(default=None, pattern=SUBNET_ID)
    vpc_id: str | None = Field(default=None, pattern=VPC_ID)
    ssh_interface: Literal["public", "private"] = "public"
    ssh_cidr: str | None = Field(
        default=None,
        description="Who may reach SSH and the probe ports during the build: a CIDR, or `auto` for this machine's "
        "public address (looked up at public_ip_url). Required with ssh_interface: public.",
    )
    public_ip_url: str | None = Field(
        default=None, pattern=HTTP_URL,
        description="With ssh_cidr: auto, where this machine's public address is looked up (the URL answers with "
        "the address as text); default: KILN_PUBLIC_IP_URL, else https://checkip.amazonaws.com.",
    )
    regions: list[Annotated[str, Field(pattern=AWS_REGION)]] = Field(
        default=[], description="Extra regions the image is copied to."
    )
    share_with: list[Annotated[YamlText, Field(pattern=AWS_ACCOUNT)]] = Field(
        default=[], description="AWS account ids given launch permission."
    )

    _allowed_bases = ("image", "name", "ssm_parameter")
    _owners_apply = True
    _check_cidr = field_validator("ssh_cidr")(_ec2_cidr)

    def check_settings(self) -> None:
        super().check_settings()
        if self.ssh_cidr == SSH_CIDR_AUTO and self.public_ip_url is None:
            settings.public_ip_url()

    @model_validator(mode="after")
    def _nothing_open_to_the_world(self, info: ValidationInfo) -> EC2Target:
        if self.ssh_cidr is None and self.ssh_interface == "public" and not _recorded(info):
            raise _field_error(
                "is required with ssh_interface: public (the build's SSH and probe ports would be open to the "
                "world): give the CIDR kiln connects from, like 203.0.113.7/32, or `auto` to look up this "
                "machine's public address when the build starts", "ssh_cidr",
            )
        if self.public_ip_url is not None and self.ssh_cidr != SSH_CIDR_AUTO:
            raise _field_error("only applies with ssh_cidr: auto", "public_ip_url")
        return self


class OpenStackTarget(CloudTarget):
    """An OpenStack cloud reached through a clouds.yaml entry."""

    cloud: Literal["openstack"] = "openstack"
    os_cloud: str | None = Field(default=None, min_length=1, description="clouds.yaml entry; default: target name.")
    flavor: str = Field(min_length=1)
    network: str | None = Field(default=None, min_length=1)
    floating_ip: bool = False
    ssh_cidr: str | None = None
    share_with: list[Annotated[str, Field(pattern=NO_SPACE)]] = Field(
        default=[], description="Project ids the image is shared with."
    )

    _allowed_bases = ("image", "name")
    _check_cidr = field_validator("ssh_cidr")(_cidr)

    def effective_os_cloud(self, target_name: str) -> str:
        """The clouds.yaml entry to use: os_cloud, else the target's name."""
        return self.os_cloud or target_name


Target = Annotated[LocalTarget | EC2Target | OpenStackTarget, Field(discriminator="cloud")]
_TARGET = TypeAdapter(Target)
_MODELS: dict[str, type[CloudTarget]] = {
    model.model_fields["cloud"].default: model for model in typing.get_args(typing.get_args(Target)[0])
}
CLOUD_KINDS = tuple(_MODELS)  # every cloud a target may name (each has its backend in clouds/registry.py)


def recorded_target(spec: dict[str, Any]) -> LocalTarget | EC2Target | OpenStackTarget:
    """A target as an earlier build recorded it (to release or flag what that build made): rules added since for
    new builds, like EC2's required ssh_cidr, do not stop the clean-up."""
    return _TARGET.validate_python(spec, context={"recorded": True})
TargetName = Annotated[str, Field(pattern=SLUG, max_length=63)]


class Recipe(_Model):
    """A kiln recipe: how to bake one image on one or more clouds, and how to prove it works."""

    name: str = Field(pattern=SLUG, max_length=63)
    version: YamlText = Field(pattern=VERSION)
    description: str = ""
    author: Author | None = None
    targets: dict[TargetName, Target] = Field(min_length=1)
    packages: list[Annotated[str, Field(pattern=PACKAGE)]] = []
    files: list[FileSpec] = []
    scripts: list[ScriptEntry] = []
    sanitize: SanitizeSpec = Field(default_factory=SanitizeSpec)
    verify: list[Probe] = []
    outputs: Outputs = Field(default_factory=Outputs)
    schedule: Schedule | None = None
    timeouts: Timeouts = Field(default_factory=Timeouts)
    valid_for: str | None = Field(
        default=None,
        description=f"How long an image stays valid, e.g. '2 days', '6 months' (default {DEFAULT_VALIDITY}): its "
        "catalog entry, EC2 DeprecationTime and Glance property say until when; nightly-rebuild renews it in time.",
    )
    notify: list[str] = Field(
        default=[],
        description="Notification URLs in apprise's syntax (json://, mailto://, slack://…), told of every finished "
        "build besides those in KILN_NOTIFY. Keep secrets out of recipes: a URL with a token belongs in KILN_NOTIFY.",
    )

    _path: Path | None = PrivateAttr(default=None)

    @field_validator("valid_for")
    @classmethod
    def _a_period(cls, period: str | None) -> str | None:
        if period is not None and (problem := validity_problem(period)):
            raise ValueError(problem)
        return None if period is None else " ".join(period.split()).lower()

    @field_validator("notify")
    @classmethod
    def _notify_urls(cls, urls: list[str]) -> list[str]:
        for index, url in enumerate(urls):
            if problem := notify_url_problem(url):
                raise _field_error(problem, index)
        return urls

    def validity(self) -> str:
        """The recipe's validity period, or the default one."""
        return self.valid_for or DEFAULT_VALIDITY

    def stored_form(self) -> dict[str, Any]:
        """The recipe as provenance keeps it: notification URLs masked (they may carry tokens)."""
        data = self.model_dump(mode="json")
        data["notify"] = [masked_notify_url(url) for url in self.notify]
        return data

    @model_validator(mode="before")
    @classmethod
    def _cloud_from_target_name(cls, data: Any) -> Any:
        """A target named local, ec2 or openstack is of that cloud unless it says otherwise."""
        if not isinstance(data, dict) or not isinstance(data.get("targets"), dict):
            return data
        targets = {
            name: {"cloud": name, **target} if name in CLOUD_KINDS and isinstance(target, dict) else target
            for name, target in data["targets"].items()
        }
        return {**data, "targets": targets}

    @field_validator("files")
    @classmethod
    def _one_file_per_dest(cls, files: list[FileSpec]) -> list[FileSpec]:
        for index, spec in enumerate(files):
            for earlier, other in enumerate(files[:index]):
                if other.dest == spec.dest:
                    raise _field_error(f"{spec.dest} is already written by files[{earlier}]", index, "dest")
        return files

    @field_validator("scripts")
    @classmethod
    def _named_scripts(cls, scripts: list[Script]) -> list[Script]:
        named = [
            script if script.name else script.model_copy(update={"name": f"inline-{index + 1}"})
            for index, script in enumerate(scripts)
        ]
        for index, script in enumerate(named):
            if any(other.name == script.name for other in named[:index]):
                raise _field_error(f"another script is already named {script.name!r}", index, "name")
        return named

    @property
    def path(self) -> Path | None:
        """The recipe file (absolute) when loaded with load_recipe; not part of the recipe itself."""
        return self._path

    @property
    def base_dir(self) -> Path:
        """The directory recipe-relative paths resolve against (the current directory if not loaded)."""
        return self._path.parent if self._path is not None else Path.cwd()

    def resolve(self, relative: str) -> Path:
        """A recipe-relative path (files[].src, scripts[].path, base.file) as a path on this machine."""
        return self.base_dir / relative

    def _relative_files(self) -> list[str]:
        paths = [spec.src for spec in self.files]
        paths += [script.path for script in self.scripts if script.path is not None]
        paths += [target.base.file for target in self.targets.values() if target.base.file is not None]
        return sorted(set(paths))

    def referenced_files(self) -> list[Path]:
        """Every file the recipe uses besides itself, sorted: files[].src, script paths, base files."""
        return [self.resolve(relative) for relative in self._relative_files()]

    def fingerprint(self) -> str:
        """sha256 of the canonical recipe (defaults filled, keys sorted) and each referenced file's content."""
        files = []
        for relative in self._relative_files():
            try:
                files.append({"path": relative, "sha256": sha256_file(self.resolve(relative))})
            except OSError as error:
                problem = Problem(_field_of_file(self, relative), f"cannot read {relative}: {error.strerror}", None)
                raise RecipeError(self._path or Path(self.name), [problem]) from error
        # Who is told and how long the image stays valid do not change the image: not part of its identity.
        recipe = self.model_dump(mode="json", exclude={"valid_for", "notify"})
        canonical = {"scheme": FINGERPRINT_SCHEME, "recipe": recipe, "files": files}
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def target(self, name: str) -> LocalTarget | EC2Target | OpenStackTarget:
        """The target called `name`; KeyError naming the recipe's targets when there is none."""
        try:
            return self.targets[name]
        except KeyError:
            raise KeyError(f"recipe {self.name} has no target {name!r} (targets: {', '.join(self.targets)})") from None

    def target_kind(self, name: str) -> str:
        """Which cloud the target called `name` builds on."""
        return self.target(name).cloud

    def probe_ports(self) -> list[int]:
        """TCP ports the verify probes reach directly (to forward or open), sorted, without repeats."""
        ports = {probe.spec.port for probe in self.verify if isinstance(probe.spec, PortProbe | HttpProbe)}
        return sorted(ports)


def _field_of_file(recipe: Recipe, relative: str) -> str:
    for index, spec in enumerate(recipe.files):
        if spec.src == relative:
            return f"files[{index}].src"
    for index, script in enumerate(recipe.scripts):
        if script.path == relative:
            return f"scripts[{index}].path"
    for name, target in recipe.targets.items():
        if target.base.file == relative:
            return f"targets.{name}.base.file"
    return ""


# ---------------------------------------------------------------- YAML loading with line numbers


class _YamlInt(int):
    yaml_text: str


class _YamlFloat(float):
    yaml_text: str


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps the source text of numbers, reads timestamps as plain strings, and refuses what
    would take it minutes or its stack to compose: more than MAX_YAML_VALUES values once aliases are expanded
    (an alias bomb), nesting deeper than MAX_YAML_DEPTH (aliases included), and an alias inside its own anchor.

    Each node's expanded size and depth are computed once, as it is composed; an alias reuses them."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._open_anchors: set[str] = set()
        self._extent: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) with aliases expanded

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if event.anchor in self._open_anchors:
                raise yaml.composer.ComposerError(
                    None, None, f"alias *{event.anchor} refers to the collection that contains it (a recursive alias)",
                    event.start_mark,
                )
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nesting is deeper than {MAX_YAML_DEPTH} levels", event.start_mark
                )
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if id(node) not in self._extent:
            self._measure(node)
        return node

    def compose_sequence_node(self, anchor: str | None) -> yaml.Node:
        return self._composing(anchor, super().compose_sequence_node)

    def compose_mapping_node(self, anchor: str | None) -> yaml.Node:
        return self._composing(anchor, super().compose_mapping_node)

    def _composing(self, anchor: str | None, compose: Any) -> yaml.Node:
        if anchor is not None:
            self._open_anchors.add(anchor)
        try:
            return compose(anchor)
        finally:
            self._open_anchors.discard(anchor)

    def _measure(self, node: yaml.Node) -> None:
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        extents = [self._extent[id(child)] for child in children]
        values = 1 + sum(count for count, _ in extents)
        depth = 1 + max((deep for _, deep in extents), default=0)
        if values > MAX_YAML_VALUES:
            what = (f"aliases expand this to more than {MAX_YAML_VALUES} values (an alias bomb?)" if self._aliases
                    else f"this holds more than {MAX_YAML_VALUES} values")
            raise yaml.composer.ComposerError(None, None, f"{what}; a recipe is far smaller", node.start_mark)
        if depth > MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"aliases nest this deeper than {MAX_YAML_DEPTH} levels", node.start_mark
            )
        self._extent[id(node)] = (values, depth)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _YamlInt:
    _check_number_length(node)
    value = _YamlInt(yaml.SafeLoader.construct_yaml_int(loader, node))
    value.yaml_text = node.value
    return value


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _YamlFloat:
    _check_number_length(node)
    value = _YamlFloat(yaml.SafeLoader.construct_yaml_float(loader, node))
    value.yaml_text = node.value
    return value


def _check_number_length(node: yaml.ScalarNode) -> None:
    # int() of thousands of digits takes long, and Python refuses over 4300 with a ValueError: stop here.
    if len(node.value) > MAX_NUMBER_DIGITS:
        raise yaml.constructor.ConstructorError(
            None, None, f"the number {node.value[:12]}… has more than {MAX_NUMBER_DIGITS} characters; quote it "
            "if it is text", node.start_mark,
        )


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_Loader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)


def _parse_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _line_at(root: yaml.Node, loc: tuple[str | int, ...]) -> int:
    """The line of the deepest node along `loc` (a mapping entry's key line; a missing key gives its parent)."""
    node, line = root, _line(root)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            matches = [(key, value) for key, value in node.value
                       if isinstance(key, yaml.ScalarNode) and key.value == str(part)]
            if not matches:
                return line
            key, node = matches[-1]  # YAML keeps the last of duplicate keys
            line = _line(key)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = _line(node)
        else:
            return line
    return line


def _render_loc(loc: tuple[str | int, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _duplicate_keys(node: yaml.Node, loc: tuple[str | int, ...] = (), visited: set[int] | None = None) -> list[Problem]:
    """PyYAML silently keeps the last of duplicate keys; a recipe must not say two things at once.

    Each node is visited once: an alias's target was checked where its anchor is (no re-expansion)."""
    visited = set() if visited is None else visited
    if id(node) in visited:
        return []
    visited.add(id(node))
    problems: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    problems.append(Problem(_render_loc((*loc, key.value)),
                                            f"duplicate key (first set on line {seen[key.value]})", _line(key)))
                seen.setdefault(key.value, _line(key))
                problems += _duplicate_keys(value, (*loc, key.value), visited)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems += _duplicate_keys(item, (*loc, index), visited)
    return problems


def _unsafe_text(data: Any, loc: tuple[str | int, ...] = ()) -> list[tuple[tuple[str | int, ...], str]]:
    """Every key and string value holding a control or bidirectional character: (location, why).

    `data` is bounded by the loader (MAX_YAML_VALUES values, MAX_YAML_DEPTH levels), aliases expanded."""
    found: list[tuple[tuple[str | int, ...], str]] = []
    if isinstance(data, str):
        if why := _unsafe_character(data, key=False):
            found.append((loc, why))
    elif isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str) and (why := _unsafe_character(key, key=True)):
                found.append(((*loc, key), f"the key {why}"))
            else:
                found += _unsafe_text(value, (*loc, key))
    elif isinstance(data, list):
        for index, item in enumerate(data):
            found += _unsafe_text(item, (*loc, index))
    return found


# ---------------------------------------------------------------- pydantic errors as Problems


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {_yaml_text(value)}"
    if isinstance(value, str):
        return f"string {value[:60]!r}" + ("…" if len(value) > 60 else "")
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


_TYPE_WORDS = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "float_type": "a number",
}


def _expected_keys(loc: tuple[str | int, ...]) -> list[str]:
    """Keys allowed in the mapping at `loc` (a pydantic error location, union tags included)."""
    candidates: list[Any] = [Recipe]
    for part in loc:
        following: list[Any] = []
        for annotation in candidates:
            for kind in _unwrap(annotation):
                origin = typing.get_origin(kind)
                if isinstance(kind, type) and issubclass(kind, BaseModel):
                    if isinstance(part, str) and part in kind.model_fields:
                        following.append(kind.model_fields[part].annotation)
                    elif kind.model_fields.get("cloud") and kind.model_fields["cloud"].default == part:
                        following.append(kind)  # the discriminator tag pydantic puts in the location
                elif origin is list and isinstance(part, int):
                    following.append(typing.get_args(kind)[0])
                elif origin is dict:
                    following.append(typing.get_args(kind)[1])
        candidates = following
    keys: list[str] = []
    for annotation in candidates:
        for kind in _unwrap(annotation):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                keys += [key for key in kind.model_fields if key not in keys]
    return keys


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types inside Annotated[...] and unions."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [kind for arg in typing.get_args(annotation) for kind in _unwrap(arg)]
    return [annotation]


def _problem_from_error(error: dict[str, Any], root: yaml.Node | None) -> Problem:
    raw_loc: tuple[str | int, ...] = tuple(error["loc"])
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    loc = raw_loc
    if len(loc) >= 3 and loc[0] == "targets" and loc[2] in CLOUD_KINDS:
        loc = loc[:2] + loc[3:]  # drop the discriminator tag pydantic inserts
    is_key = bool(loc) and loc[-1] == "[key]"
    if is_key:
        loc = loc[:-1]
    message = _message(kind, ctx, value, raw_loc, error["msg"], is_key)
    if kind == "kiln_field":
        loc = (*loc, *ctx["sub"])
    elif kind in ("union_tag_not_found", "union_tag_invalid"):
        loc = (*loc, "cloud")
    return Problem(_render_loc(loc), message, _line_at(root, loc) if root is not None else None)


def _message(kind: str, ctx: dict[str, Any], value: Any, loc: tuple[str | int, ...], msg: str, is_key: bool) -> str:
    if kind == "kiln_field":
        return ctx["message"]
    if kind == "value_error":
        return str(ctx.get("error", msg))
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        if len(loc) == 3 and loc[0] == "verify":
            return "unknown probe kind; a probe is one of command, port or http"
        expected = _expected_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), expected, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (expected one of: {', '.join(expected)})"
        return "unknown key" + hint
    if kind == "union_tag_not_found":
        return ("is required: say which cloud this target builds on (local, ec2 or openstack), "
                "or name the target after its cloud")
    if kind == "union_tag_invalid":
        return f"unknown cloud {ctx.get('tag')!r}; kiln knows {', '.join(CLOUD_KINDS)}"
    if kind == "literal_error":
        return f"unknown value {_short(repr(value))}; expected {ctx.get('expected')}"
    if kind == "string_pattern_mismatch":
        meaning = _PATTERN_MEANING.get(ctx.get("pattern", ""), f"matching {ctx.get('pattern')}")
        subject = "the key " if is_key else ""
        return f"{subject}{_short(repr(value))} is not {meaning}"
    if kind in _TYPE_WORDS:
        hint = " (quote it)" if kind == "string_type" and isinstance(value, int | float) else ""
        return f"expected {_TYPE_WORDS[kind]}, got {_describe(value)}{hint}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bound = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}",
                 "less_than": "< {lt}", "less_than_equal": "<= {le}"}[kind].format(**ctx)
        return f"must be {bound}, got {_short(str(_yaml_text(value)))}"
    if kind == "too_short":
        return "must not be empty"
    if kind == "too_long":
        return f"must be at most {ctx.get('max_length')} long"
    return msg


# ---------------------------------------------------------------- entry points


def load_recipe(path: str | Path) -> Recipe:
    """Read, parse and validate a recipe file, its referenced files included; RecipeError lists every problem."""
    path = Path(path)
    shown_dir = f"{path.parent}/"
    text = _read_recipe_text(path)
    try:
        root, data = _parse_yaml(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        detail = ", ".join(part for part in (error.context, error.problem) if part)
        raise RecipeError(path, [Problem("", f"invalid YAML: {detail}", mark.line + 1 if mark else None)]) from None
    except yaml.reader.ReaderError as error:  # a character YAML does not allow: its position, not a mark
        line = text.count("\n", 0, error.position) + 1
        code = f"U+{error.character:04X}" if isinstance(error.character, int) else repr(error.character)
        problem = f"invalid YAML: the character {code} is not allowed in YAML"
        raise RecipeError(path, [Problem("", problem, line)]) from None
    except yaml.YAMLError as error:
        raise RecipeError(path, [Problem("", f"invalid YAML: {error}", None)]) from None
    except (ValueError, RecursionError) as error:  # the loader's bounds should make these unreachable: a last net
        raise RecipeError(path, [Problem("", f"invalid YAML: {type(error).__name__}: {error}", None)]) from None
    if root is None:
        raise RecipeError(path, [Problem("", "the recipe is empty", None)])
    if not isinstance(data, dict):
        raise RecipeError(path, [Problem("", f"the recipe must be a mapping (name: ..., targets: ...), "
                                             f"not {_describe(data)}", _line(root))])
    problems = _duplicate_keys(root)
    unsafe = _unsafe_text(data)
    problems += [Problem(_render_loc(loc), why, _line_at(root, loc)) for loc, why in unsafe]
    context = {"base_dir": path.parent, "shown_dir": shown_dir}
    try:
        recipe = Recipe.model_validate(data, context=context)
    except ValidationError as error:
        flagged = [_render_loc(loc) for loc, _ in unsafe]
        problems += [
            problem for problem in (_problem_from_error(dict(item), root) for item in error.errors(include_url=False))
            if not any(problem.field == field or problem.field.startswith((f"{field}.", f"{field}["))
                       for field in flagged)  # said once, by the character check
        ]
        recipe = None
    if problems or recipe is None:
        raise RecipeError(path, sorted(problems, key=lambda problem: (problem.line or 0)))
    recipe._path = path.absolute()
    return recipe


_FILE_KINDS = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
               stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def _read_recipe_text(path: Path) -> str:
    """The recipe's text: a regular file of at most MAX_RECIPE_BYTES, in UTF-8. A FIFO, a device or a socket is
    refused before anything is read from it (opened non-blocking, checked with fstat on the open descriptor)."""

    def refuse(message: str) -> RecipeError:
        return RecipeError(path, [Problem("", message, None)])

    too_big = f"is larger than {MAX_RECIPE_BYTES // 1024} KiB; a recipe is a page of YAML"
    def check_kind(mode: int) -> None:
        kind = stat.S_IFMT(mode)
        if kind != stat.S_IFREG:
            raise refuse(f"is {_FILE_KINDS.get(kind, 'not a regular file')}, not a recipe file")

    try:
        check_kind(os.stat(path).st_mode)  # a socket cannot even be opened: say what it is
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise refuse("no such recipe file") from None
    except OSError as error:
        raise refuse(f"cannot be read: {error.strerror}") from None
    try:
        info = os.fstat(descriptor)  # what was opened, in case the path changed since the stat
        check_kind(info.st_mode)
        if info.st_size > MAX_RECIPE_BYTES:
            raise refuse(too_big)
        with os.fdopen(os.dup(descriptor), "rb") as handle:
            data = handle.read(MAX_RECIPE_BYTES + 1)  # it may have grown since fstat
    except OSError as error:
        raise refuse(f"cannot be read: {error.strerror}") from None
    finally:
        os.close(descriptor)
    if len(data) > MAX_RECIPE_BYTES:
        raise refuse(too_big)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise refuse(f"is not UTF-8 text (byte {error.start}: {error.reason})") from None


def recipe_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the recipe YAML, for editors and other tools."""
    schema = Recipe.model_json_schema()
    union = {"oneOf": [{"$ref": f"#/$defs/{model.__name__}"} for model in _MODELS.values()]}
    schema["properties"]["targets"] = {
        "title": "Targets",
        "description": f"Clouds to build on, by target name. A target named {', '.join(CLOUD_KINDS[:-1])} or "
                       f"{CLOUD_KINDS[-1]} "
                       "is of that cloud unless it sets `cloud`; any other name must set `cloud`.",
        "type": "object",
        "minProperties": 1,
        "propertyNames": {"pattern": SLUG, "maxLength": 63},
        "properties": {
            name: {"if": {"required": ["cloud"]}, "then": union,
                   "else": {"$ref": f"#/$defs/{model.__name__}"}}
            for name, model in _MODELS.items()
        },
        "additionalProperties": {"allOf": [{"required": ["cloud"]}, union]},
    }
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "kiln recipe"}
