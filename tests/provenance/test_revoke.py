"""Revocation: the image and its copies revoked, descendants parent-revoked (revoked with --cascade), the local
catalog flagged, and fetch_base refusing a revoked (or parent-revoked) base on the real local cloud."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger
from typer.testing import CliRunner

from clouds.local import LocalCloud
from core import settings
from core.recipe import load_recipe
from kiln.cli import app
from operations.revoke import revoke
from provenance import gitinfo, lineage, store
from tasks.common import BuildPlan
from tasks.fetch_base import RevokedBaseError, fetch_base
from tests.provenance.seeded_chain import Chain, seed_chain

runner = CliRunner()


@pytest.fixture
def chain(db_url: str) -> Chain:
    return seed_chain()


def _statuses(*row_ids: int) -> list[tuple[str, str | None]]:
    found = {s.image.id: s.image for s in lineage.list_images()}
    return [(found[row].status, found[row].revoked_reason) for row in row_ids]


def test_revoking_an_image_revokes_its_copies_and_marks_every_descendant_parent_revoked(chain: Chain) -> None:
    changed = store.revoke_image(chain.a, "CVE-2026-1234 in openssl")

    assert [(c.image_id, c.status) for c in changed] == [
        ("img-aaaaaaaaaaaa", "revoked"), ("img-aaaaaaaaaaaa.raw", "revoked"),
        ("img-bbbbbbbbbbbb", "parent-revoked"), ("img-cccccccccccc", "parent-revoked"),
    ]
    assert _statuses(chain.a, chain.b) == [
        ("revoked", "CVE-2026-1234 in openssl"),
        ("parent-revoked", "img-aaaaaaaaaaaa was revoked: CVE-2026-1234 in openssl"),
    ]
    assert _statuses(chain.base, chain.ami, chain.ami_base) == [("available", None)] * 3


def test_cascade_revokes_descendants_and_keeps_an_earlier_revocation_reason(chain: Chain) -> None:
    store.revoke_image(chain.c, "leaked key")

    changed = store.revoke_image(chain.a, "CVE-2026-1234", cascade=True)

    assert {c.image_id: c.status for c in changed} == {
        "img-aaaaaaaaaaaa": "revoked", "img-aaaaaaaaaaaa.raw": "revoked", "img-bbbbbbbbbbbb": "revoked"}
    assert _statuses(chain.b, chain.c) == [
        ("revoked", "img-aaaaaaaaaaaa was revoked: CVE-2026-1234"), ("revoked", "leaked key")]


def test_a_revocation_needs_a_reason(chain: Chain) -> None:
    with pytest.raises(ValueError, match="reason"):
        store.revoke_image(chain.a, "  ")
    result = runner.invoke(app, ["revoke", "img-aaaaaaaaaaaa"])
    assert result.exit_code == 2 and "--reason" in result.output
    assert _statuses(chain.a) == [("available", None)]


def _local_image(image_id: str, images_dir: Path, disk: Path) -> str:
    """An image directory as LocalCloud.snapshot leaves it: the qcow2 and meta.json."""
    directory = images_dir / image_id
    directory.mkdir(parents=True)
    target = directory / "disk.qcow2"
    target.write_bytes(disk.read_bytes())
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    meta = {"image_id": image_id, "name": "golden-1.0.0", "created": "2026-11-22T00:00:00Z", "tags": {},
            "files": [{"format": "qcow2", "path": str(target), "size": target.stat().st_size, "sha256": digest}]}
    (directory / "meta.json").write_text(json.dumps(meta))
    return digest


def _qcow2(path: Path, size: str = "16M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def test_kiln_revoke_flags_the_local_image_and_catalog_and_lineage_shows_the_state(chain: Chain, tmp_path) -> None:
    _local_image("img-aaaaaaaaaaaa", settings.images_dir(), _qcow2(tmp_path / "a.qcow2"))
    catalog = settings.data_dir() / "catalog" / "img-aaaaaaaaaaaa.json"
    catalog.parent.mkdir(parents=True, exist_ok=True)
    catalog.write_text(json.dumps({"identifier": "img-aaaaaaaaaaaa"}))
    try:
        result = runner.invoke(app, ["revoke", "img-aaaaaaaaaaaa", "--reason", "CVE-2026-1234", "--json"])

        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert [(a["image_id"], a["outcome"]) for a in report["cloud_actions"]] == [
            ("img-aaaaaaaaaaaa", "flagged"), ("img-aaaaaaaaaaaa.raw", "skipped")]
        meta = json.loads((settings.images_dir() / "img-aaaaaaaaaaaa" / "meta.json").read_text())
        assert meta["revoked"]["reason"] == "CVE-2026-1234"
        entry = json.loads(catalog.read_text())
        assert entry["status"] == "revoked" and entry["revoked"]["reason"] == "CVE-2026-1234"
        shown = json.loads(runner.invoke(app, ["lineage", "img-bbbbbbbbbbbb", "--format", "json"]).stdout)
        assert shown["image"]["status"] == "parent-revoked"
        assert [(n["image_id"], n["status"]) for n in shown["ancestors"][:1]] == [("img-aaaaaaaaaaaa", "revoked")]
        tree = runner.invoke(app, ["lineage", "img-bbbbbbbbbbbb"]).stdout
        assert "parent-revoked" in tree and "CVE-2026-1234" in tree
    finally:
        LocalCloud().delete_image(_ref("img-aaaaaaaaaaaa"))
        catalog.unlink(missing_ok=True)


def _ref(image_id: str):  # noqa: ANN202
    from clouds.base import ImageRef

    return ImageRef(cloud="local", image_id=image_id, name="")


def test_revoking_on_a_backend_without_revocation_is_reported_not_failed(chain: Chain) -> None:
    result = runner.invoke(app, ["revoke", "ami-0sibling", "--reason", "superseded", "--json"])

    assert result.exit_code == 0, result.output
    [action] = json.loads(result.stdout)["cloud_actions"]
    assert action["outcome"] == "unsupported" and "provenance only" in action["detail"]
    assert _statuses(chain.ami) == [("revoked", "superseded")]


def test_a_cloud_that_fails_to_flag_the_image_makes_revoke_exit_1_after_revoking_in_provenance(chain: Chain) -> None:
    # img-cccccccccccc has no directory under the local images dir: the local cloud refuses to flag it.
    result = runner.invoke(app, ["revoke", "img-cccccccccccc", "--reason", "bad build"])

    assert result.exit_code == 1
    assert "failed" in result.stdout and "does not exist" in result.stdout
    assert _statuses(chain.c) == [("revoked", "bad build")]


def test_unknown_image_revocation_exits_2(chain: Chain) -> None:
    result = runner.invoke(app, ["revoke", "img-000000000000", "--reason", "x"])
    assert result.exit_code == 2 and "no image 'img-000000000000'" in result.stderr


# ------------------------------------------------------------------------------- fetch_base refuses


def _plan(recipe_path: Path, cloud: LocalCloud) -> BuildPlan:
    recipe = load_recipe(recipe_path)
    git = gitinfo.capture(recipe.path, recipe.referenced_files())
    version = store.record_recipe_version(name=recipe.name, version=recipe.version, fingerprint=recipe.fingerprint(),
                                          recipe_json="{}", git=git)
    build = store.start_build(recipe_version_id=version, target="local", cloud="local", trigger="test")
    return BuildPlan(build_id=build, recipe=recipe, target_name="local", git=git, recipe_version_id=version,
                     cloud=cloud)


def _recipe(directory: Path, base: str) -> Path:
    path = directory / "recipe.yaml"
    path.write_text(f"name: on-base\nversion: '1'\ntargets:\n  local: {{base: {base}}}\n")
    return path


def test_fetch_base_refuses_a_revoked_base_and_a_base_whose_parent_was_revoked(db_url, tmp_path, monkeypatch) -> None:
    cloud = LocalCloud(state_dir=tmp_path / "state", images_dir=tmp_path / "images", cache_dir=tmp_path / "cache")
    disk = _qcow2(tmp_path / "base.qcow2")
    digest = hashlib.sha256(disk.read_bytes()).hexdigest()
    monkeypatch.chdir(tmp_path)  # fetch_base resolves a recipe-relative base file against the working directory
    on_file = _recipe(tmp_path, f"{{file: base.qcow2, sha256: '{digest}'}}")
    with disable_run_logger():
        base = fetch_base.fn(_plan(on_file, cloud))  # first sighting: recorded, available
        assert lineage.image_status(base.row_id) == "available"
        # An image kiln built on that base, registered in the local cloud and in provenance.
        built_digest = _local_image("img-111111111111", cloud.images_dir, _qcow2(tmp_path / "built.qcow2", "32M"))
        built = store.start_build(recipe_version_id=_plan(on_file, cloud).recipe_version_id, target="local",
                                  cloud="local", trigger="test")
        store.record_image(cloud="local", image_id="img-111111111111", build_id=built, parent_id=base.row_id,
                           sha256=built_digest, format="qcow2")
        on_image = _recipe(tmp_path / "images", "{image: img-111111111111}")
        assert fetch_base.fn(_plan(on_image, cloud)).image.details["kiln_image_id"] == "img-111111111111"

        revoke(digest, "base image has a backdoor")

        plan = _plan(on_file, cloud)
        with pytest.raises(RevokedBaseError, match="is revoked in provenance"):
            fetch_base.fn(plan)
        with pytest.raises(RevokedBaseError, match="is parent-revoked in provenance"):
            fetch_base.fn(_plan(on_image, cloud))
    [step] = lineage.get_build(plan.build_id).steps
    assert (step.stage, step.status) == ("fetch_base", "failed") and "choose another base" in step.error
