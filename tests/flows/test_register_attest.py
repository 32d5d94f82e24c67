"""The register stage carries the recipe's validity (catalog entry, tags, provenance, EC2's DeprecationTime) and
signs the new image's provenance statement when KILN_SIGNING_KEY names a key: written next
to the image, named in its catalog entry, verifiable by `kiln attest --verify`; without a key nothing is signed,
and an unreadable key stops `kiln build` before anything launches. The stage runs for real (provenance rows,
catalog, Prefect artifacts on the session's server) on an image recorded from a real qcow2 file, without a VM."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from prefect.logging import disable_run_logger
from typer.testing import CliRunner

from clouds import open_cloud
from clouds.base import TAG_VALID_UNTIL, BaseImage, ImageFile, ImageRef
from core import settings
from core.recipe import BaseSpec, load_recipe
from kiln.cli import app
from provenance import attest, gitinfo, lineage, store
from tasks.common import BuildPlan
from tasks.fetch_base import ResolvedBase
from tasks.register import register
from tasks.verify import ProbeOutcome, Verification
from tests.clouds.moto_ec2 import SSM_AL2023
from tests.clouds.test_ec2 import built_image
from tests.conftest import REPO

runner = CliRunner()


@dataclass
class TaggingCloud:
    """What register asks of a local cloud: tag the image (remembered here)."""

    name: str = "local"
    tagged: dict[str, dict[str, str]] = field(default_factory=dict)

    def tag_image(self, image: ImageRef, tags: dict[str, str]) -> None:
        self.tagged[image.image_id] = dict(tags)


def snapshot_made(tmp_path: Path) -> tuple[BuildPlan, ResolvedBase, ImageRef, Verification]:
    """A build of recipes/hello.yaml up to verify: its plan, recorded base, the qcow2 snapshot and the probes."""
    recipe = load_recipe(REPO / "recipes/hello.yaml")
    git = gitinfo.capture(recipe.path, recipe.referenced_files())
    version = store.record_recipe_version(name=recipe.name, version=recipe.version, fingerprint=recipe.fingerprint(),
                                          recipe_json="{}", git=git)  # fmt: skip
    build_id = store.start_build(recipe_version_id=version, target="local", cloud="local", trigger="test")
    plan = BuildPlan(build_id=build_id, recipe=recipe, target_name="local", git=git, recipe_version_id=version,
                     cloud=TaggingCloud())  # fmt: skip
    base_sha = hashlib.sha256(build_id.encode()).hexdigest()
    base_path = str(tmp_path / "bases" / "bootstrap" / "debian-bookworm.qcow2")
    stable = f"base:debian-bookworm@sha256:{base_sha}"
    base_row = store.record_image(cloud="local", image_id=stable, sha256=base_sha, kind="base", format="qcow2",
                                  path=base_path)
    base = ResolvedBase(BaseImage(cloud="local", image_id=base_path, digest=base_sha, ssh_user="debian",
                                  stable_id=stable, details={"path": base_path}), base_row)
    image_id = f"img-{build_id[:12]}"
    disk = tmp_path / "images" / image_id / "hello-1.0.0.qcow2"
    disk.parent.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    file = ImageFile("qcow2", str(disk), disk.stat().st_size, hashlib.sha256(disk.read_bytes()).hexdigest())
    image = ImageRef(cloud="local", image_id=image_id, name="hello-1.0.0", files=(file,))
    store.record_probe(build_id, name="port :22", kind="port", passed=True, detail="open", duration=0.1)
    verification = Verification([ProbeOutcome("port :22", "port", True, "open", 0.1)], [("bash", "5.2", "amd64")],
                                "Debian GNU/Linux 12")  # fmt: skip
    return plan, base, image, verification


def _register(plan: BuildPlan, base: ResolvedBase, image: ImageRef, verification: Verification):  # noqa: ANN202
    with disable_run_logger():
        return register.fn(plan, base, image, verification)


def test_register_signs_the_statement_next_to_the_image_when_kiln_signing_key_is_set(
    tmp_path, prefect_api, monkeypatch
) -> None:
    key = tmp_path / "keys" / "kiln.key"
    attest.generate_key(key)
    monkeypatch.setenv(attest.KEY_ENV, str(key))
    plan, base, image, verification = snapshot_made(tmp_path)

    registered = _register(plan, base, image, verification)

    statement_file = Path(image.files[0].path).parent / f"{image.image_id}.intoto.json"
    assert statement_file.is_file()
    entry = json.loads(Path(registered.catalog_path).read_text())
    assert entry["attestation"] == str(statement_file)
    envelope = json.loads(statement_file.read_text())
    assert envelope["signatures"][0]["keyid"] == attest.key_id(attest.load_public_key(Path(f"{key}.pub")))
    statement = json.loads(base64.b64decode(envelope["payload"]))
    [subject] = statement["subject"]
    assert subject["digest"] == {"sha256": image.files[0].sha256}
    assert subject["annotations"]["imageId"] == image.image_id
    definition = statement["predicate"]["buildDefinition"]
    assert definition["externalParameters"]["recipe"]["fingerprint"] == plan.recipe.fingerprint()
    assert definition["externalParameters"]["recipe"]["commit"] == plan.git.commit
    [base_dependency] = [dep for dep in definition["resolvedDependencies"] if dep.get("name", "").startswith("base:")]
    assert base.image_id == f"base:debian-bookworm@sha256:{base.image.digest}"
    assert base_dependency["annotations"]["imageId"] == base.image_id
    assert entry["parent"] == {"image_id": base.image_id, "digest": base.image.digest}
    [packages] = [b for b in statement["predicate"]["runDetails"]["byproducts"] if b["name"] == "packages"]
    assert base64.b64decode(packages["content"]) == b"bash\t5.2\tamd64\n"  # what verify listed, as recorded
    assert str(tmp_path) not in json.dumps(definition), "no path of this host names the base or the source"
    metadata = statement["predicate"]["runDetails"]["metadata"]
    assert metadata["invocationId"] == plan.build_id and "finishedOn" not in metadata  # signed before it finished
    assert key.read_text() not in statement_file.read_text()
    [step] = lineage.get_build(plan.build_id).steps
    assert (step.stage, step.status) == ("register", "succeeded")
    assert f"provenance statement {statement_file}" in step.log

    verified = runner.invoke(app, ["attest", "--verify", str(statement_file)])  # the key's .pub, via KILN_SIGNING_KEY

    assert verified.exit_code == 0, verified.output
    assert "signature verifies" in verified.stdout and f"ok local:{image.image_id}" in verified.stdout


def test_register_signs_nothing_without_kiln_signing_key(tmp_path, prefect_api, monkeypatch) -> None:
    monkeypatch.delenv(attest.KEY_ENV, raising=False)
    plan, base, image, verification = snapshot_made(tmp_path)

    registered = _register(plan, base, image, verification)

    assert list(Path(image.files[0].path).parent.glob("*.intoto.json")) == []
    assert "attestation" not in json.loads(Path(registered.catalog_path).read_text())
    assert list((settings.data_dir() / "catalog").glob(f"{image.image_id}*.intoto.json")) == []


def test_an_unreadable_signing_key_stops_kiln_build_before_anything_launches(tmp_path, monkeypatch) -> None:
    not_a_key = tmp_path / "kiln.key"
    not_a_key.write_text("not a PEM key\n")
    monkeypatch.setenv(attest.KEY_ENV, str(not_a_key))
    builds_before = len(lineage.list_builds(limit=1000))

    result = runner.invoke(app, ["build", str(REPO / "recipes/hello.yaml"), "--json"])

    assert result.exit_code == 2, result.output
    assert attest.KEY_ENV in result.stderr and str(not_a_key) in result.stderr
    assert len(lineage.list_builds(limit=1000)) == builds_before


def test_an_unreadable_signing_key_fails_a_deployment_run_before_any_build_starts(tmp_path, monkeypatch) -> None:
    """A run from the Prefect UI bypasses the CLI's checks: the flow's own validation catches the key."""
    from flows.build import BadInput, BuildRequest, targets_of

    monkeypatch.setenv(attest.KEY_ENV, str(tmp_path / "missing.key"))

    with pytest.raises(BadInput, match=attest.KEY_ENV):
        targets_of(BuildRequest(recipe=str(REPO / "recipes/hello.yaml")))


@pytest.fixture(autouse=True)
def _no_catalog_left(tmp_path) -> None:
    """Catalog entries live in the session's kiln home: remove this test's, so later tests see only theirs."""
    before = set((settings.data_dir() / "catalog").glob("*")) if (settings.data_dir() / "catalog").exists() else set()
    yield
    for path in set((settings.data_dir() / "catalog").glob("*")) - before:
        path.unlink()


def test_valid_for_reaches_the_catalog_entry_the_image_tags_and_provenance(tmp_path, prefect_api) -> None:
    plan, base, image, verification = snapshot_made(tmp_path)
    plan.recipe = plan.recipe.model_copy(update={"valid_for": "2 days"})
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)

    registered = _register(plan, base, image, verification)

    entry = json.loads(Path(registered.catalog_path).read_text())
    until = dt.datetime.fromisoformat(entry["valid_until"])
    assert entry["valid_for"] == "2 days"
    assert before + dt.timedelta(days=2) <= until <= dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    assert plan.cloud.tagged[image.image_id][TAG_VALID_UNTIL] == until.isoformat()
    [row] = lineage.find_image(image.image_id)
    assert row.image.valid_until == until


def test_valid_for_sets_the_deprecation_time_of_the_ami_and_its_copies(tmp_path, prefect_api, moto) -> None:  # noqa: F811
    recipe = load_recipe(write_ec2_recipe(tmp_path, moto))
    cloud = open_cloud(recipe.targets["ec2"], target_name="ec2")
    cloud.poll_seconds = 0.2
    deprecations: list[dict] = []
    for region in ("us-east-1", "eu-west-1"):
        answer_enable_image_deprecation(cloud.ec2(region), deprecations)  # moto has no EnableImageDeprecation
    plan, base = ec2_plan(recipe, cloud)
    image = built_image(cloud, base.image)
    before = dt.datetime.now(dt.UTC)

    with disable_run_logger():
        register.fn(plan, base, image, Verification([], [], "Amazon Linux 2023"))

    [row] = lineage.find_image(image.image_id)
    until = row.image.valid_until
    assert dt.timedelta(days=181) <= until - before <= dt.timedelta(days=184)  # 6 calendar months
    deprecate_at = until.replace(second=0) + (dt.timedelta(minutes=1) if until.second else dt.timedelta(0))
    copies = [s.image for s in lineage.list_images(cloud="ec2")
              if s.build_id == plan.build_id and s.image.kind == "copy"]  # fmt: skip
    assert [c.region for c in copies] == ["eu-west-1"] and copies[0].valid_until == until
    assert sorted((d["ImageId"], d["DeprecateAt"]) for d in deprecations) == sorted(
        [(image.image_id, deprecate_at), (copies[0].image_id, deprecate_at)])
    described = cloud.ec2("eu-west-1").describe_images(ImageIds=[copies[0].image_id])["Images"][0]
    assert {"Key": TAG_VALID_UNTIL, "Value": until.isoformat()} in described["Tags"]


def write_ec2_recipe(tmp_path: Path, endpoint: str) -> Path:
    path = tmp_path / "ec2.yaml"
    path.write_text(f"""name: hello-ec2
version: 1.0.0
targets:
  ec2: {{region: us-east-1, endpoint_url: "{endpoint}", base: {{ssm_parameter: {SSM_AL2023}}}, ssh_user: admin,
        ssh_cidr: 198.51.100.7/32, regions: [eu-west-1]}}
valid_for: 6 months
""")
    return path


def ec2_plan(recipe, cloud) -> tuple[BuildPlan, ResolvedBase]:  # noqa: ANN001 - a Recipe and an EC2Cloud
    git = gitinfo.capture(recipe.path, recipe.referenced_files())
    version = store.record_recipe_version(name=recipe.name, version=recipe.version, fingerprint=recipe.fingerprint(),
                                          recipe_json="{}", git=git)  # fmt: skip
    build_id = store.start_build(recipe_version_id=version, target="ec2", cloud="ec2", region="us-east-1",
                                 trigger="test")  # fmt: skip
    image = cloud.resolve_base(BaseSpec(ssm_parameter=SSM_AL2023), "admin")
    row = store.record_image(cloud="ec2", region="us-east-1", image_id=image.image_id, sha256=image.digest,
                             kind="base")  # fmt: skip
    plan = BuildPlan(build_id=build_id, recipe=recipe, target_name="ec2", git=git, recipe_version_id=version,
                     cloud=cloud)  # fmt: skip
    return plan, ResolvedBase(image, row)


def answer_enable_image_deprecation(client, calls: list[dict]) -> None:  # noqa: ANN001 - a boto3 EC2 client
    """Answer EnableImageDeprecation before it leaves the client, as EC2 does, remembering its parameters."""
    client.meta.events.register("provide-client-params.ec2.EnableImageDeprecation",
                                lambda params, **_: calls.append(dict(params)))  # fmt: skip
    client.meta.events.register("before-call.ec2.EnableImageDeprecation", lambda **_: (
        SimpleNamespace(status_code=200), {"Return": True, "ResponseMetadata": {"HTTPStatusCode": 200}}))
