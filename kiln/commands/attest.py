"""`kiln attest`: a signed in-toto/SLSA provenance statement for an image, key generation, and verification."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NoReturn

import typer

from core.settings import SIGNING_KEY_ENV
from kiln.commands.output import fail, safe, stdout

KEY_ENV = SIGNING_KEY_ENV


def register(app: typer.Typer) -> None:
    app.command("attest")(attest)


def attest(
    image_id: str | None = typer.Argument(None, help="The image to attest (any id kiln knows, or its sha256)."),
    key: Path | None = typer.Option(None, "--key", help=f"ed25519 private key (PEM); default: ${KEY_ENV}."),
    out: Path | None = typer.Option(None, "--out", help="Where to write the envelope; default ./IMAGE.intoto.json."),
    generate_key: Path | None = typer.Option(None, "--generate-key", help="Make a new key pair: FILE and FILE.pub."),
    verify: Path | None = typer.Option(None, "--verify", help="Check a signed statement instead of making one."),
    pub: Path | None = typer.Option(None, "--pub", help=f"Public key to verify with; default: ${KEY_ENV}'s."),
) -> None:
    """Write a signed provenance statement (in-toto Statement v1, SLSA provenance v1, DSSE, ed25519) for an image,
    or --verify one: signature, and subjects against the recorded sha256 and the disk file when it is here."""
    if generate_key is not None:
        _generate(generate_key)
    elif verify is not None:
        _verify(verify, pub)
    elif image_id is not None:
        _attest(image_id, key, out)
    else:
        _fail("give an IMAGE_ID to attest, --verify FILE, or --generate-key FILE", 2)


def _generate(path: Path) -> None:
    from provenance import attest as statements

    try:
        public_path = statements.generate_key(path)
    except statements.AttestationError as exc:
        _fail(str(exc), 2)
    except OSError as exc:
        _fail(f"{path}: cannot write the key: {exc.strerror}" + (f" ({exc.filename})" if exc.filename else ""), 2)
    public = statements.load_public_key(public_path)
    typer.echo(f"private key {path} (keep it secret; export {KEY_ENV}={path.resolve()})")
    typer.echo(f"public key  {public_path}  keyid {statements.key_id(public)}")


def _attest(image_id: str, key_path: Path | None, out: Path | None) -> None:
    from provenance import attest as statements
    from provenance.lineage import UnknownImage

    key_path = key_path or statements.configured_key()
    if key_path is None:
        _fail(f"no signing key: pass --key FILE or set {KEY_ENV} (make one with kiln attest --generate-key FILE)", 2)
    try:
        key = statements.load_private_key(key_path)
        statement = statements.statement_for(image_id)
    except (statements.AttestationError, UnknownImage) as exc:
        _fail(str(exc), 2)
    envelope = statements.sign(statement, key)
    target = out or Path(statements.statement_file_name(image_id))
    try:
        target.write_text(json.dumps(envelope, indent=2) + "\n")
    except OSError as exc:
        _fail(f"{target}: cannot write the statement: {exc.strerror}", 2)
    names = ", ".join(subject["name"] for subject in statement["subject"])
    typer.echo(f"{target}: in-toto statement for {names}, signed by key {envelope['signatures'][0]['keyid'][:16]}")


def _verify(path: Path, pub: Path | None) -> None:
    from provenance import attest as statements

    pub = pub or _default_public_key()
    try:
        envelope = json.loads(path.read_text())
        public = statements.load_public_key(pub)
    except OSError as exc:
        _fail(f"{exc.filename or path}: cannot be read: {exc.strerror}", 2)
    except (ValueError, statements.AttestationError) as exc:  # not JSON, or not a public key
        _fail(f"{path}: {exc}", 2)
    try:
        statement = statements.open_envelope(envelope, public)
        checks = statements.check_subjects(statement)
    except statements.NotAnEnvelope as exc:
        _fail(f"{path}: {exc}", 2)
    except statements.AttestationError as exc:
        _fail(f"{path}: {exc}", 1)
    console = stdout()
    console.print(f"{safe(path)}: signature verifies with key {statements.key_id(public)[:16]}")
    for check in checks:
        mark = "[green]ok[/]" if check.ok else "[red]MISMATCH[/]"
        console.print(f"  {mark} {safe(check.name)}: {safe(check.detail)}", highlight=False)
    if not all(check.ok for check in checks):
        raise typer.Exit(1)


def _default_public_key() -> Path:
    configured = os.environ.get(KEY_ENV)
    if not configured:
        _fail(f"no key to verify with: pass --pub FILE or set {KEY_ENV}", 2)
    public = Path(configured + ".pub")
    return public if public.is_file() else Path(configured)


def _fail(message: str, code: int) -> NoReturn:
    fail(message, code)
