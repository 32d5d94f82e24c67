"""`kiln audit`: the recorded commit checked out in a temporary worktree, the fingerprint verified (a build from
uncommitted changes cannot be audited), and one real audit of a local build: rebuilt, compared, recorded."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from git import Repo

from core.recipe import load_recipe
from flows.audit import (
    AuditError,
    FingerprintMismatch,
    audit_subject,
    check_fingerprint,
    find_repository,
    recorded_checkout,
)
from kiln.commands.audit import print_report
from provenance import gitinfo, lineage, store
from tests.conftest import REPO
from tests.flows.conftest import HelloBuild, git, hello_recipe, run_kiln


def _record_build(recipe_path: Path, disk: Path) -> str:
    """Record an image built from the recipe as it is now in the work tree (clean or dirty); returns its id."""
    recipe = load_recipe(recipe_path)
    info = gitinfo.capture(recipe.path, recipe.referenced_files())
    version = store.record_recipe_version(name=recipe.name, version=recipe.version, fingerprint=recipe.fingerprint(),
                                          recipe_json="{}", git=info)
    build = store.start_build(recipe_version_id=version, target="local", cloud="local", trigger="test")
    image_id = f"img-{build[:12]}"
    store.record_image(cloud="local", image_id=image_id, build_id=build, path=str(disk), format="qcow2",
                       sha256=build * 2)
    store.finish_build(build, "succeeded", stage="register")
    return image_id


def _disk(tmp_path: Path) -> Path:
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    return disk


def _worktrees(repo: Path) -> list[str]:
    return [line for line in git(repo, "worktree", "list", "--porcelain").splitlines() if line.startswith("worktree ")]


def test_the_recorded_commit_is_checked_out_in_a_temporary_worktree_and_removed_after(tmp_path) -> None:
    recipe = hello_recipe(tmp_path)
    first = git(recipe.parent, "rev-parse", "HEAD")
    (recipe.parent / "scripts/hello.sh").write_text("#!/bin/sh\necho changed > /etc/kiln-hello\n")
    git(recipe.parent, "commit", "-qam", "change the script")
    repo = Repo(recipe.parent)

    with recorded_checkout(repo, first) as tree:
        assert git(tree, "rev-parse", "HEAD") == first
        assert "hello from kiln" in (tree / "scripts/hello.sh").read_text()
        assert len(_worktrees(recipe.parent)) == 2

    assert not tree.exists() and len(_worktrees(recipe.parent)) == 1
    assert "changed" in (recipe.parent / "scripts/hello.sh").read_text(), "the user's work tree is untouched"


def test_a_build_from_uncommitted_changes_fails_the_fingerprint_check(tmp_path) -> None:
    recipe = hello_recipe(tmp_path)
    (recipe.parent / "scripts/hello.sh").write_text("#!/bin/sh\necho edited but not committed\n")
    image_id = _record_build(recipe, _disk(tmp_path))  # recorded dirty: the fingerprint includes the edit
    subject = audit_subject(image_id)
    assert subject.recipe.dirty and subject.recipe.commit == git(recipe.parent, "rev-parse", "HEAD")

    with (recorded_checkout(find_repository(subject.recipe), subject.recipe.commit) as tree,
          pytest.raises(FingerprintMismatch, match="uncommitted changes")):
        check_fingerprint(tree / subject.recipe.path, subject.recipe.fingerprint)
    git(recipe.parent, "checkout", "--", "scripts/hello.sh")
    (tmp_path / "clean").mkdir()
    clean = _record_build(recipe, _disk(tmp_path / "clean"))
    subject = audit_subject(clean)
    with recorded_checkout(find_repository(subject.recipe), subject.recipe.commit) as tree:
        assert check_fingerprint(tree / subject.recipe.path, subject.recipe.fingerprint) == subject.recipe.fingerprint


def test_kiln_audit_of_a_dirty_build_exits_1_naming_the_fingerprint_and_records_the_failed_audit(
    tmp_path, prefect_api
) -> None:
    recipe = hello_recipe(tmp_path)
    (recipe.parent / "scripts/hello.sh").write_text("#!/bin/sh\necho edited but not committed\n")
    image_id = _record_build(recipe, _disk(tmp_path))

    result = run_kiln("audit", image_id, timeout=600)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "fingerprint" in result.stderr and "uncommitted changes" in result.stderr
    [audit] = lineage.audits_of(lineage.resolve_image(image_id).id)
    assert audit.status == "failed" and "fingerprint" in audit.error and audit.rebuild_id is None
    assert audit.fingerprint_found and audit.fingerprint_found != audit.fingerprint
    assert len(_worktrees(recipe.parent)) == 1


def test_audit_refuses_what_it_cannot_rebuild_with_exit_2(tmp_path) -> None:
    base = store.record_image(cloud="local", image_id="/cache/base.qcow2", kind="base", sha256="b" * 64)
    assert base
    with pytest.raises(AuditError, match="did not build"):
        audit_subject("/cache/base.qcow2")
    for image_id, message in (("img-000000000000", "no image"), ("/cache/base.qcow2", "did not build")):
        result = run_kiln("audit", image_id, timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_the_audit_deployment_runs_the_audit_flow_with_its_parameters() -> None:
    spec = yaml.safe_load((REPO / "deployments/prefect.yaml").read_text())
    [deployment] = [d for d in spec["deployments"] if d["name"] == "audit"]
    module, name = deployment["entrypoint"].split(":")
    flow = getattr(__import__(module, fromlist=[name]), name)
    assert flow.name == "audit-image"
    assert set(deployment["parameters"]) <= set(flow.parameters.properties)
    assert flow.parameters.required == ["image_id"]


@pytest.mark.vm
@pytest.mark.timeout(3600)  # two full builds under TCG; on a loaded 2-core machine one took 15 minutes
def test_audit_of_a_real_local_build_rebuilds_the_same_commit_and_finds_it_identical(
    hello_build: HelloBuild, capsys
) -> None:
    recipe, commit, image_id = hello_build.recipe, hello_build.commit, hello_build.image_id  # `kiln build`'s

    shown = run_kiln("lineage", image_id, "--format", "json")
    assert shown.returncode == 0, shown.stderr
    graph = json.loads(shown.stdout)
    assert graph["recipe"]["commit"] == commit and graph["recipe"]["fingerprint"] == load_recipe(recipe).fingerprint()
    assert graph["base"]["kind"] == "base" and graph["base"]["sha256"] and graph["children"] == hello_build.children

    result = run_kiln("audit", image_id, "--json")

    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "passed" and report["commit"] == commit
    assert report["packages"] == {"added": [], "removed": [], "changed": []}
    assert report["files"]["compared"] > 5000 and report["identity"] >= 99.0
    with capsys.disabled():
        print(f"\naudit of {image_id}: {report['identity']:.3f}% of {report['files']['compared']} files identical; "
              f"differing: {report['files']['changed'][:20]} {report['files']['only_original'][:10]} "
              f"{report['files']['only_rebuild'][:10]}")
    [audit] = lineage.audits_of(lineage.resolve_image(image_id).id)
    assert (audit.status, audit.rebuild_id) == ("passed", report["rebuild_build_id"])
    assert audit.identity == pytest.approx(report["identity"], abs=1e-3)  # the report rounds to 3 decimals
    rebuild = lineage.get_build(audit.rebuild_id)
    assert rebuild.build.trigger == "audit" and rebuild.recipe.fingerprint == graph["recipe"]["fingerprint"]
    siblings = lineage.lineage(image_id, up=False, down=False).siblings
    assert report["rebuild_image_id"] in [node.image.image_id for node in siblings]
    print_report(report)
    assert f"{report['identity']:.2f}% identical" in capsys.readouterr().out
