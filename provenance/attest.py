"""Provenance statements: an in-toto Statement v1 with a SLSA provenance v1 predicate for an image kiln built,
signed as a DSSE envelope with an ed25519 key the user owns, and the verification of one.

Subjects are the image's disk files by sha256 (named by cloud and image id) and, for the build's cloud images
that have no file (an AMI, a Glance image), the cloud image id itself as the digest value (`kilnCloudImageId`).
Everything in a statement names things as any host can resolve them: the recipe's source is its repository's
remote (`git+https://…@commit`, SLSA's convention; a path only when there is no remote, marked local), the base
its host-independent id, and the byproducts carry the image's package list (its digest, and the list itself when
it fits). Keys are named as securesystemslib names them, so a standard DSSE verifier needs the public key only.
Only the public half of a key is ever printed; the private key stays in the user's file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from core.digests import sha256_file
from core.settings import SIGNING_KEY_ENV
from provenance import gitinfo, lineage

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUILD_TYPE = "https://kiln.dev/build-image/v1"  # what a kiln image build is: recipe + target on a base
BUILDER_ID = "https://kiln.dev/builder/v1"
CLOUD_ID_DIGEST = "kilnCloudImageId"
KEY_ENV = SIGNING_KEY_ENV  # path of the ed25519 private key `kiln attest` and the register stage sign with
PACKAGE_LIST_MEDIA_TYPE = "text/tab-separated-values"
PACKAGE_LIST_FORMAT = "name<TAB>version<TAB>arch per line, sorted bytewise (LC_ALL=C sort)"
# The package list travels inside the statement up to this size (a Debian server's ~500 packages: ~20 KiB);
# beyond it, its digest alone names it.
PACKAGE_LIST_INLINE_LIMIT = 128 * 1024


class AttestationError(RuntimeError):
    """A statement cannot be made, signed or verified; the message says which part and why."""


class NotAnEnvelope(AttestationError):
    """The file is not a DSSE envelope at all (bad input), as opposed to one that does not verify."""


# ------------------------------------------------------------------------------------------------ keys


def generate_key(path: Path) -> Path:
    """A new ed25519 key: the private half in `path` (PKCS#8 PEM, mode 0600), the public in `path`.pub."""
    path = Path(path)
    if path.exists():
        raise AttestationError(f"{path} exists already: kiln never overwrites a key")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private)
    public_path = path.with_name(path.name + ".pub")
    public_path.write_bytes(_public_pem(key.public_key()))
    return public_path


def configured_key() -> Path | None:
    """The signing key KILN_SIGNING_KEY names, or None when it is unset (then nothing is signed automatically)."""
    value = os.environ.get(KEY_ENV, "").strip()
    return Path(value).expanduser() if value else None


def signing_key_problem() -> str | None:
    """Why KILN_SIGNING_KEY cannot sign (None: unset or usable); builds check it before anything launches."""
    path = configured_key()
    if path is None:
        return None
    try:
        load_private_key(path)
    except AttestationError as exc:
        return f"{KEY_ENV}: {exc}"
    return None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise AttestationError(f"signing key {path}: cannot read an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise AttestationError(f"signing key {path} is not an ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A public key file, or the public half of a private key file."""
    data = Path(path).read_bytes()
    try:
        key: Any = serialization.load_pem_public_key(data)
    except ValueError:
        key = load_private_key(path).public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise AttestationError(f"verification key {path} is not an ed25519 key")
    return key


def key_id(public: Ed25519PublicKey) -> str:
    """The key's id as securesystemslib computes it, so standard DSSE verifiers match kiln's signatures to the key:
    sha256 of the canonical JSON of its description (keytype, scheme, the raw public key in hex). Envelopes
    from kilns that named keys by sha256(raw key) still verify: `kiln attest --verify` tries the key on every
    signature whatever its keyid."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    description = {"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": raw.hex()}}
    # Canonical JSON (OLPC) of plain ASCII strings is json.dumps with sorted keys and no whitespace.
    return hashlib.sha256(json.dumps(description, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# ------------------------------------------------------------------------------------------ statement


def statement_for(image_id: str) -> dict[str, Any]:
    """The in-toto statement for an image kiln built (lineage.UnknownImage if kiln does not know it)."""
    image = lineage.resolve_image(image_id)
    detail = lineage.get_build(image.build_id) if image.build_id else None
    if detail is None:
        raise AttestationError(f"{image.image_id} is a {image.kind} image kiln did not build: no provenance to attest")
    build, recipe = detail.build, detail.recipe
    same_build = sorted((s.image for s in detail.images), key=lambda row: (row.id != image.id, row.id or 0))
    base = lineage.ancestors(image.id)[:1] if image.id is not None else []
    dependencies: list[dict[str, Any]] = []
    if recipe.commit:
        dependencies.append(_source(recipe))
    dependencies.append({"name": f"recipe:{recipe.path}", "digest": {"sha256": recipe.fingerprint}})
    if base:
        dependencies.append(_base(base[0].image))
    probes = [{"name": f"probe:{probe.name}", "annotations": {"kind": probe.kind, "passed": probe.passed}}
              for probe in detail.probes]
    packages = _packages(same_build)
    return {
        "_type": STATEMENT_TYPE,
        "subject": [_subject(row) for row in same_build],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "recipe": {"name": recipe.name, "version": recipe.version, "path": recipe.path,
                               "repository": recipe.repo, "local": recipe.repo_local, "commit": recipe.commit,
                               "dirty": recipe.dirty, "fingerprint": recipe.fingerprint},
                    "target": build.target,
                    "parameters": json.loads(build.parameters_json or "{}"),
                },
                "internalParameters": {"cloud": build.cloud, "region": build.region, "trigger": build.trigger,
                                       "interactive": build.interactive,
                                       "reproducibleFromRecipe": not build.interactive},
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"kiln": build.kiln_version}},
                "metadata": _present(  # finishedOn is absent while the build still runs (the register stage)
                    invocationId=build.id, startedOn=_rfc3339(build.started), finishedOn=_rfc3339(build.finished)
                ),
                "byproducts": probes + packages + _shell_sessions(detail.steps),
            },
        },
    }


def _shell_sessions(steps: list[Any]) -> list[dict[str, Any]]:
    """Each `kiln shell` session in the build (hands on the build machine): its redacted transcript's digest."""
    return [{"name": f"shell-session:{step.attempt}",
             "digest": {"sha256": hashlib.sha256(step.log.encode()).hexdigest()},
             "annotations": {"interactive": True, "note": "not reproducible from the recipe alone"}}
            for step in steps if step.stage == "shell"]


def write_statement(image_id: str, key: Ed25519PrivateKey, out: Path) -> dict[str, Any]:
    """Sign the image's statement with `key` and write the DSSE envelope to `out`; returns the envelope."""
    envelope = sign(statement_for(image_id), key)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(envelope, indent=2) + "\n")
    return envelope


def statement_file_name(image_id: str) -> str:
    """IMAGE.intoto.json, with anything but letters, digits, dot, dash and underscore replaced."""
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', image_id)}.intoto.json"


def _source(recipe: Any) -> dict[str, Any]:
    """The recipe's repository at its commit: the remote any host can fetch, the work tree only as an annotation."""
    annotations: dict[str, Any] = {"dirty": recipe.dirty, "local": recipe.repo_local}
    if recipe.checkout:
        annotations["checkout"] = recipe.checkout
    uri = gitinfo.source_uri(recipe.repo, recipe.commit) if recipe.repo else recipe.path
    return {"uri": uri, "digest": {"gitCommit": recipe.commit}, "annotations": annotations}


def _base(parent: Any) -> dict[str, Any]:
    """The image the build started from, by the id that is the same on every host."""
    name = _subject_name(parent.cloud, parent.region, parent.image_id.removeprefix("base:"))
    return {"name": f"base:{name}", "digest": _digest(parent.sha256, parent.image_id),
            "annotations": {"imageId": parent.image_id, "cloud": parent.cloud, "kind": parent.kind,
                            "status": parent.status}}


def package_list(packages: list[tuple[str, str, str]]) -> bytes:
    """An image's package manifest as the statement carries it: one `name<TAB>version<TAB>arch` line per installed
    package, sorted bytewise (as `LC_ALL=C sort` does), so anyone can recompute its digest from the image."""
    return b"".join(sorted(f"{name}\t{version}\t{arch}\n".encode() for name, version, arch in packages))


def _packages(same_build: list[Any]) -> list[dict[str, Any]]:
    """The image's package list as a byproduct: its sha256, and the list itself when it fits."""
    built = next((row for row in same_build if row.kind == "built" and row.id is not None), None)
    manifest = lineage.packages_of(built.id) if built is not None else []
    if not manifest:
        return []
    listing = package_list(manifest)
    byproduct: dict[str, Any] = {
        "name": "packages", "digest": {"sha256": hashlib.sha256(listing).hexdigest()},
        "mediaType": PACKAGE_LIST_MEDIA_TYPE,
        "annotations": {"count": len(manifest), "format": PACKAGE_LIST_FORMAT},
    }
    if len(listing) <= PACKAGE_LIST_INLINE_LIMIT:
        byproduct["content"] = base64.b64encode(listing).decode()
    return [byproduct]


def _present(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def _subject(row: Any) -> dict[str, Any]:
    subject: dict[str, Any] = {
        "name": _subject_name(row.cloud, row.region, row.image_id),
        "digest": _digest(row.sha256, row.image_id),
        "annotations": {"cloud": row.cloud, "region": row.region, "imageId": row.image_id, "kind": row.kind},
    }
    if row.format:
        subject["annotations"]["format"] = row.format
    if row.size is not None:
        subject["annotations"]["size"] = row.size
    return subject


def _subject_name(cloud: str, region: str, image_id: str) -> str:
    return ":".join(part for part in (cloud, region, image_id) if part)


def _digest(sha256: str, image_id: str) -> dict[str, str]:
    return {"sha256": sha256} if sha256 else {CLOUD_ID_DIGEST: image_id}


def _rfc3339(moment: Any) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None


# --------------------------------------------------------------------------------------------- DSSE


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def sign(statement: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """The statement in a DSSE envelope signed with `key`."""
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    signature = key.sign(pae(PAYLOAD_TYPE, payload))
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": key_id(key.public_key()), "sig": base64.b64encode(signature).decode()}],
    }


def open_envelope(envelope: dict[str, Any], public: Ed25519PublicKey) -> dict[str, Any]:
    """The statement inside a DSSE envelope, once a signature by `public` verifies over it."""
    if not isinstance(envelope, dict):
        raise NotAnEnvelope(f"not a DSSE envelope: a JSON {type(envelope).__name__}, not an object with "
                            "payloadType, payload and signatures")
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise NotAnEnvelope(f"payloadType {envelope.get('payloadType')!r} is not {PAYLOAD_TYPE}")
    try:
        payload = base64.b64decode(envelope["payload"], validate=True)
        signatures = [base64.b64decode(s["sig"], validate=True) for s in envelope.get("signatures", [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise NotAnEnvelope(f"not a DSSE envelope: {exc}") from exc
    message = pae(PAYLOAD_TYPE, payload)
    for signature in signatures:
        try:
            public.verify(signature, message)
        except InvalidSignature:
            continue
        try:
            statement = json.loads(payload)
        except ValueError as exc:
            raise AttestationError(f"the signed payload is not JSON: {exc}") from exc
        kinds = (statement.get("_type"), statement.get("predicateType")) if isinstance(statement, dict) else ()
        if kinds != (STATEMENT_TYPE, PREDICATE_TYPE):
            raise AttestationError("the signed payload is not an in-toto v1 statement with SLSA provenance v1")
        return statement
    raise AttestationError(f"no signature verifies with key {key_id(public)[:16]}: the statement was altered "
                           "or signed by another key")


# -------------------------------------------------------------------------------------- subject checks


@dataclass(frozen=True)
class SubjectCheck:
    name: str
    recorded: bool  # the sha256 equals the one provenance recorded for this image
    on_disk: bool | None  # the file exists and hashes to it (None: no file here to check)
    detail: str

    @property
    def ok(self) -> bool:
        return self.recorded and self.on_disk is not False


def check_subjects(statement: dict[str, Any]) -> list[SubjectCheck]:
    """Each subject with a sha256 against the image provenance recorded (and its file when it is here)."""
    checks = []
    for subject in statement.get("subject", []):
        sha = subject.get("digest", {}).get("sha256")
        image_id = subject.get("annotations", {}).get("imageId")
        if not sha or not image_id:
            continue
        rows = [s.image for s in lineage.find_image(image_id) if s.image.image_id == image_id]
        row = next((r for r in rows if r.cloud == subject["annotations"].get("cloud")), None)
        if row is None:
            checks.append(SubjectCheck(subject["name"], False, None, "provenance has no such image"))
            continue
        recorded = row.sha256 == sha
        on_disk = None
        detail = "matches provenance" if recorded else f"provenance recorded sha256 {row.sha256}"
        if row.path and Path(row.path).is_file():
            actual = sha256_file(row.path)
            on_disk = actual == sha
            detail += f"; {row.path} " + ("matches" if on_disk else f"has sha256 {actual}")
        checks.append(SubjectCheck(subject["name"], recorded, on_disk, detail))
    if not checks:
        raise AttestationError("the statement has no sha256 subject kiln can check")
    return checks

