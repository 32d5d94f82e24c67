"""Provenance statements: in-toto v1 + SLSA provenance v1 in a DSSE envelope signed with the user's ed25519 key;
the round trip verifies, a tampered statement, another key or a changed disk file does not."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from typer.testing import CliRunner

from core.settings import KILN_VERSION
from kiln.cli import app
from provenance import attest, lineage, store
from provenance.gitinfo import GitInfo

runner = CliRunner()
COMMIT = "c0ffee" * 6 + "beef"
KILN = Path(sys.executable).with_name("kiln")


@pytest.fixture(autouse=True)
def narrow_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here runs as in a 40-column terminal: no message may depend on the width to stay whole."""
    monkeypatch.setenv("COLUMNS", "40")

BASE_ID = "base:debian-bookworm@sha256:" + "b" * 64
PACKAGES = [("bash", "5.2.15-2+b7", "amd64"), ("apache2", "2.4.62-1~deb12u2", "amd64"), ("tzdata", "2024b-0+deb12u1",
                                                                                        "all")]


@pytest.fixture
def built(db_url: str, tmp_path: Path) -> dict:
    """A local image kiln built (a real disk file) on a base, plus its raw copy; returns their facts."""
    disk = tmp_path / "img-0123456789ab" / "hello.qcow2"
    disk.parent.mkdir()
    disk.write_bytes(b"QFI\xfb" + b"\0" * 4096)
    sha = hashlib.sha256(disk.read_bytes()).hexdigest()
    git = GitInfo(in_git=True, path="recipes/hello.yaml", root="/src/images", commit=COMMIT, branch="main",
                  remote_url="https://git.example.org/images.git")
    version = store.record_recipe_version(name="hello", version="1.0.0", fingerprint="f" * 64, recipe_json="{}",
                                          git=git)
    build = store.start_build(recipe_version_id=version, target="local", cloud="local", trigger="cli",
                              parameters={"recipe": "recipes/hello.yaml", "target": "local", "on_error": "cleanup"})
    base = store.record_image(cloud="local", image_id=BASE_ID, kind="base", sha256="b" * 64,
                              path="/home/me/.cache/kiln/bases/bootstrap/0123.qcow2")
    image_row = store.record_image(cloud="local", image_id="img-0123456789ab", build_id=build, parent_id=base,
                                   format="qcow2", size=disk.stat().st_size, sha256=sha, path=str(disk))
    store.record_packages(image_row, PACKAGES)
    store.record_image(cloud="local", image_id="img-0123456789ab.raw", build_id=build, parent_id=base, kind="copy",
                       format="raw", sha256="e" * 64)
    store.record_probe(build, name="port :22", kind="port", passed=True, detail="open", duration=0.2)
    store.finish_build(build, "succeeded", stage="register")
    key = tmp_path / "keys" / "kiln.key"
    result = runner.invoke(app, ["attest", "--generate-key", str(key)])
    assert result.exit_code == 0, result.output
    return {"disk": disk, "sha": sha, "build": build, "key": key, "pub": Path(f"{key}.pub"), "tmp": tmp_path}


def _attest(built: dict, *extra: str) -> Path:
    out = built["tmp"] / "img.intoto.json"
    result = runner.invoke(app, ["attest", "img-0123456789ab", "--key", str(built["key"]), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return out


def _payload(envelope_file: Path) -> dict:
    return json.loads(base64.b64decode(json.loads(envelope_file.read_text())["payload"]))


def test_statement_names_the_disk_digest_cloud_ids_recipe_commit_and_build(built: dict) -> None:
    statement = _payload(_attest(built))

    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    assert [(s["name"], s["digest"]) for s in statement["subject"]] == [
        ("local:img-0123456789ab", {"sha256": built["sha"]}), ("local:img-0123456789ab.raw", {"sha256": "e" * 64})]
    definition = statement["predicate"]["buildDefinition"]
    assert definition["externalParameters"]["recipe"]["fingerprint"] == "f" * 64
    assert definition["externalParameters"]["recipe"]["commit"] == COMMIT
    assert definition["externalParameters"]["parameters"]["target"] == "local"
    dependencies = definition["resolvedDependencies"]
    assert dependencies[0] == {"uri": f"git+https://git.example.org/images.git@{COMMIT}",
                               "digest": {"gitCommit": COMMIT},
                               "annotations": {"dirty": False, "local": False, "checkout": "/src/images"}}
    assert {"name": "base:local:debian-bookworm@sha256:" + "b" * 64, "digest": {"sha256": "b" * 64},
            "annotations": {"imageId": BASE_ID, "cloud": "local", "kind": "base", "status": "available"}
            } in dependencies
    assert "/home/me/.cache" not in json.dumps(statement), "a host's cache path names nothing elsewhere"
    run = statement["predicate"]["runDetails"]
    assert run["builder"]["version"] == {"kiln": KILN_VERSION}
    assert run["metadata"]["invocationId"] == built["build"]
    assert run["metadata"]["startedOn"].endswith("Z") and run["metadata"]["finishedOn"].endswith("Z")


def test_a_signed_statement_verifies_against_the_public_key_and_the_disk(built: dict) -> None:
    out = _attest(built)

    result = runner.invoke(app, ["attest", "--verify", str(out), "--pub", str(built["pub"])])

    assert result.exit_code == 0, result.output
    assert "signature verifies" in result.stdout and "ok local:img-0123456789ab" in result.stdout
    assert f"{built['disk']} matches" in result.stdout


def test_a_tampered_statement_fails_verification(built: dict) -> None:
    out = _attest(built)
    envelope = json.loads(out.read_text())
    statement = _payload(out)
    statement["subject"][0]["digest"]["sha256"] = "0" * 64
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    out.write_text(json.dumps(envelope))

    result = runner.invoke(app, ["attest", "--verify", str(out), "--pub", str(built["pub"])])

    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {out}: no signature verifies") and result.stderr.count("\n") == 1


def test_a_statement_signed_by_another_key_fails_verification(built: dict) -> None:
    out = _attest(built)
    other = built["tmp"] / "other.key"
    attest.generate_key(other)

    result = runner.invoke(app, ["attest", "--verify", str(out), "--pub", f"{other}.pub"])

    assert result.exit_code == 1 and "no signature verifies" in result.stderr


def test_a_disk_changed_after_attestation_fails_the_subject_check(built: dict) -> None:
    out = _attest(built)
    built["disk"].write_bytes(b"tampered")

    result = runner.invoke(app, ["attest", "--verify", str(out), "--pub", str(built["pub"])])

    assert result.exit_code == 1
    assert "MISMATCH local:img-0123456789ab" in result.stdout and "has sha256" in result.stdout


def test_the_key_comes_from_kiln_signing_key_and_its_absence_exits_2(built: dict, monkeypatch) -> None:
    monkeypatch.delenv("KILN_SIGNING_KEY", raising=False)
    result = runner.invoke(app, ["attest", "img-0123456789ab"])
    assert result.exit_code == 2 and "KILN_SIGNING_KEY" in result.stderr

    monkeypatch.setenv("KILN_SIGNING_KEY", str(built["key"]))
    out = built["tmp"] / "from-env.json"
    assert runner.invoke(app, ["attest", "img-0123456789ab", "--out", str(out)]).exit_code == 0
    verified = runner.invoke(app, ["attest", "--verify", str(out)])  # the public half found next to the key
    assert verified.exit_code == 0, verified.output


def test_the_private_key_is_owner_only_never_overwritten_and_never_in_the_statement(built: dict) -> None:
    assert stat.S_IMODE(built["key"].stat().st_mode) == 0o600
    again = runner.invoke(app, ["attest", "--generate-key", str(built["key"])])
    assert again.exit_code == 2 and "never overwrites" in again.stderr
    private_body = "".join(built["key"].read_text().splitlines()[1:-1])
    assert private_body not in _attest(built).read_text()


def test_unknown_or_unbuilt_images_cannot_be_attested(built: dict) -> None:
    for image_id, message in (("img-ffffffffffff", "no image"), (BASE_ID, "did not build")):
        result = runner.invoke(app, ["attest", image_id, "--key", str(built["key"])])
        assert result.exit_code == 2 and message in result.stderr, result.output


def test_an_envelope_round_trips_through_the_library(built: dict) -> None:
    key = attest.load_private_key(built["key"])
    envelope = attest.sign(attest.statement_for(built["sha"]), key)
    statement = attest.open_envelope(envelope, key.public_key())
    checks = attest.check_subjects(statement)
    assert [(c.name, c.ok, c.on_disk) for c in checks] == [
        ("local:img-0123456789ab", True, True), ("local:img-0123456789ab.raw", True, None)]
    assert lineage.resolve_image(built["sha"]).image_id == "img-0123456789ab"


def test_verify_messages_are_one_line_when_stderr_is_not_a_terminal_whatever_its_width(built: dict) -> None:
    out = _attest(built)
    other = built["tmp"] / "other.key"
    attest.generate_key(other)

    result = subprocess.run([str(KILN), "attest", "--verify", str(out), "--pub", f"{other}.pub"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "40"})

    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {out}: no signature verifies with key ")
    assert result.stderr.count("\n") == 1, result.stderr


def test_a_file_that_is_no_envelope_and_an_unwritable_key_path_are_one_line_exit_2(built: dict) -> None:
    for content in ("[1, 2]", '{"payloadType": 3}', '{"payloadType": "application/vnd.in-toto+json"}'):
        odd = built["tmp"] / "odd.json"
        odd.write_text(content)
        result = runner.invoke(app, ["attest", "--verify", str(odd), "--pub", str(built["pub"])])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert result.stderr.startswith(f"error: {odd}: ") and result.stderr.count("\n") == 1, result.stderr

    unwritable = Path("/proc/kiln-test/kiln.key")  # nobody may create files under /proc, not even root
    result = runner.invoke(app, ["attest", "--generate-key", str(unwritable)])
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {unwritable}: cannot write the key: ")
    assert result.stderr.count("\n") == 1

def test_standard_tools_validate_the_statement_and_verify_it_with_the_public_key_alone(built: dict) -> None:
    """in_toto_attestation's Statement (and SLSA's provenance proto, strictly) accept the statement, and
    securesystemslib's DSSE code verifies the envelope given nothing but the public key."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from google.protobuf import json_format
    from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
    from in_toto_attestation.v1 import statement_pb2
    from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor
    from in_toto_attestation.v1.statement import Statement
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import VerificationError
    from securesystemslib.signer import SSlibKey

    envelope = json.loads(_attest(built).read_text())
    public = SSlibKey.from_crypto(load_pem_public_key(built["pub"].read_bytes()))  # its keyid: the standard one

    accepted = Envelope.from_dict(json.loads(json.dumps(envelope))).verify([public], 1)

    assert list(accepted) == [public.keyid] == [envelope["signatures"][0]["keyid"]]
    payload = base64.b64decode(envelope["payload"])
    statement = Statement.copy_from_pb(json_format.Parse(payload, statement_pb2.Statement()))
    statement.validate()
    predicate = json.loads(payload)["predicate"]
    provenance = json_format.ParseDict(predicate, provenance_pb2.Provenance())  # unknown fields fail
    for descriptor in [*provenance.build_definition.resolved_dependencies, *provenance.run_details.byproducts]:
        ResourceDescriptor.copy_from_pb(descriptor).validate()
    [packages] = [b for b in predicate["runDetails"]["byproducts"] if b["name"] == "packages"]
    listing = base64.b64decode(packages["content"])
    assert listing == b"apache2\t2.4.62-1~deb12u2\tamd64\nbash\t5.2.15-2+b7\tamd64\ntzdata\t2024b-0+deb12u1\tall\n"
    assert packages["digest"] == {"sha256": hashlib.sha256(listing).hexdigest()}
    assert packages["annotations"]["count"] == len(PACKAGES)

    statement_dict = json.loads(payload)
    statement_dict["subject"][0]["digest"]["sha256"] = "0" * 64
    tampered = {**envelope, "payload": base64.b64encode(json.dumps(statement_dict).encode()).decode()}
    with pytest.raises(VerificationError):
        Envelope.from_dict(json.loads(json.dumps(tampered))).verify([public], 1)


def test_an_envelope_naming_the_key_by_kilns_old_key_id_still_verifies(built: dict) -> None:
    key = attest.load_private_key(built["key"])
    envelope = attest.sign(attest.statement_for("img-0123456789ab"), key)
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    envelope["signatures"][0]["keyid"] = hashlib.sha256(raw).hexdigest()  # how kiln named keys before
    old = built["tmp"] / "old.intoto.json"
    old.write_text(json.dumps(envelope))

    result = runner.invoke(app, ["attest", "--verify", str(old), "--pub", str(built["pub"])])

    assert result.exit_code == 0, result.output
    assert "signature verifies" in result.stdout


def test_a_package_list_too_long_to_carry_is_named_by_its_digest_alone(built: dict, monkeypatch) -> None:
    monkeypatch.setattr(attest, "PACKAGE_LIST_INLINE_LIMIT", 16)

    [packages] = [b for b in attest.statement_for("img-0123456789ab")["predicate"]["runDetails"]["byproducts"]
                  if b["name"] == "packages"]

    assert "content" not in packages
    assert packages["digest"]["sha256"] == hashlib.sha256(attest.package_list(PACKAGES)).hexdigest()
