"""Repeatability audit: check out an image's recorded commit, prove the recipe is the one recorded (fingerprint),
rebuild the same target, and compare the two images' packages and files; the result is recorded and returned."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from git import BadName, InvalidGitRepositoryError, NoSuchPathError, Repo
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from core.recipe import RecipeError, load_recipe
from flows.build import build_image
from operations.audit import EXCLUDED_PATTERNS, FileComparison, PackageDiff, compare_disks, compare_packages
from provenance import lineage, store
from provenance.models import Build, Image, RecipeVersion
from provenance.redact import describe

DEFAULT_THRESHOLD = 99.0  # percent of identical files an audit needs to pass


class AuditError(RuntimeError):
    """The audit cannot run or stopped: the message says why and what to do."""


class FingerprintMismatch(AuditError):
    """The recipe at the recorded commit is not the recipe the image was built from."""

    def __init__(self, message: str, found: str) -> None:
        super().__init__(message)
        self.found = found


@dataclass(frozen=True)
class AuditSubject:
    """The image to audit with the build and recipe version that made it."""

    image: Image
    build: Build
    recipe: RecipeVersion


def audit_subject(image_id: str) -> AuditSubject:
    """The image kiln knows by this id or digest, if an audit can rebuild it (lineage.UnknownImage if unknown)."""
    image = lineage.resolve_image(image_id)
    detail = lineage.get_build(image.build_id) if image.build_id else None
    if detail is None:
        raise AuditError(f"{image.image_id} is a {image.kind} image kiln did not build: nothing to rebuild")
    if detail.recipe.commit is None:
        raise AuditError(f"{image.image_id} was built from {detail.recipe.path}, which was not committed to git: "
                         "there is no recorded commit to rebuild from")
    if not image.path:
        raise AuditError(f"{image.image_id} on {image.cloud} has no disk file kiln can mount; audits compare the "
                         "files of local images")
    if not Path(image.path).is_file():
        raise AuditError(f"{image.image_id}: its disk {image.path} is gone; nothing to compare the rebuild with")
    return AuditSubject(image=image, build=detail.build, recipe=detail.recipe)


def find_repository(recipe: RecipeVersion, repo: str | None = None) -> Repo:
    """The git repository holding the recorded commit: `repo` if given, else the recorded work tree or repository
    when it is a directory here, else the one around the working directory."""
    recorded = (recipe.checkout, recipe.repo, ".")
    candidates = [repo] if repo else [c for c in dict.fromkeys(recorded) if c and Path(c).is_dir()]
    tried = []
    for candidate in candidates:
        try:
            found = Repo(candidate, search_parent_directories=True)
        except (InvalidGitRepositoryError, NoSuchPathError):
            tried.append(f"{candidate} (not a git repository)")
            continue
        try:
            found.commit(recipe.commit)
        except (BadName, ValueError):
            tried.append(f"{found.working_tree_dir} (no commit {recipe.commit[:12]})")
            found.close()
            continue
        return found
    raise AuditError(f"commit {recipe.commit} of {recipe.repo or recipe.path} is not in "
                     f"{', '.join(tried) or 'any repository here'}: fetch it, or pass --repo PATH")


@contextmanager
def recorded_checkout(repo: Repo, commit: str) -> Iterator[Path]:
    """A temporary detached worktree at `commit`, removed (and pruned from the repository) on exit."""
    holder = Path(tempfile.mkdtemp(prefix="kiln-audit-src-"))
    tree = holder / "src"
    try:
        repo.git.worktree("add", "--detach", str(tree), commit)
        yield tree
    finally:
        if tree.exists():
            repo.git.worktree("remove", "--force", str(tree))
        shutil.rmtree(holder, ignore_errors=True)
        repo.git.worktree("prune")


def check_fingerprint(recipe_file: Path, recorded: str) -> str:
    """The fingerprint of the recipe as checked out; FingerprintMismatch unless it is the recorded one."""
    try:
        found = load_recipe(recipe_file).fingerprint()
    except RecipeError as exc:
        raise AuditError(f"the recipe at the recorded commit does not load: {exc}") from exc
    except FileNotFoundError as exc:
        raise AuditError(f"the recorded commit has no recipe at {recipe_file.name}: {exc}") from exc
    if found != recorded:
        raise FingerprintMismatch(
            f"recipe fingerprint at the recorded commit is {found}, but the image was built from {recorded}: "
            "the build used uncommitted changes (or files outside git), so this commit cannot reproduce it",
            found,
        )
    return found


@dataclass
class AuditReport:
    audit_id: int
    image_id: str
    rebuild_image_id: str
    rebuild_build_id: str
    commit: str
    fingerprint: str
    status: str  # passed | differs
    threshold: float
    packages: PackageDiff
    files: FileComparison

    def to_dict(self) -> dict:
        return {
            "audit_id": self.audit_id,
            "image_id": self.image_id,
            "rebuild_image_id": self.rebuild_image_id,
            "rebuild_build_id": self.rebuild_build_id,
            "commit": self.commit,
            "fingerprint": self.fingerprint,
            "status": self.status,
            "threshold": self.threshold,
            "identity": round(self.files.identity, 3),
            "packages": self.packages.to_dict(),
            "files": self.files.to_dict(),
            "excluded_patterns": list(EXCLUDED_PATTERNS),
        }


@task(name="compare-images", cache_policy=NO_CACHE, persist_result=False)
def compare_images(original: Image, rebuild: Image) -> tuple[PackageDiff, FileComparison]:
    """Package manifests from provenance, files from the two disks mounted read-only."""
    assert original.id is not None and rebuild.id is not None
    packages = compare_packages(lineage.packages_of(original.id), lineage.packages_of(rebuild.id))
    files = compare_disks(Path(original.path), Path(rebuild.path))
    return packages, files


@flow(name="audit-image")
def audit_image(image_id: str, repo: str | None = None, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Rebuild an image from its recorded commit and compare: identical packages and at least `threshold`
    percent identical files pass. Every audit is recorded, with the rebuild linked to it."""
    subject = audit_subject(image_id)
    assert subject.image.id is not None and subject.recipe.commit is not None
    audit_id = store.start_audit(subject.image.id, fingerprint=subject.recipe.fingerprint,
                                 commit=subject.recipe.commit, threshold=threshold)
    found = None
    try:
        with recorded_checkout(find_repository(subject.recipe, repo), subject.recipe.commit) as tree:
            found = check_fingerprint(tree / subject.recipe.path, subject.recipe.fingerprint)
            rebuilt = build_image(str(tree / subject.recipe.path), subject.build.target, trigger="audit",
                                  use_cache=False)  # fmt: skip
        rebuild = lineage.resolve_image(rebuilt["image_id"])
        store.set_audit_rebuild(audit_id, rebuild_id=rebuilt["build_id"], rebuild_image_row_id=rebuild.id)
        packages, files = compare_images(subject.image, rebuild)
    except BaseException as exc:
        found = exc.found if isinstance(exc, FingerprintMismatch) else found
        store.finish_audit(audit_id, "failed", fingerprint_found=found, error=describe(exc),
                           excluded=list(EXCLUDED_PATTERNS))
        raise
    status = "passed" if packages.identical and files.identity >= threshold else "differs"
    store.finish_audit(
        audit_id, status, fingerprint_found=found, files_compared=files.compared, files_identical=files.identical,
        identity=files.identity, packages=packages.to_dict(), files=files.to_dict(), excluded=list(EXCLUDED_PATTERNS),
    )
    report = AuditReport(audit_id, subject.image.image_id, rebuild.image_id, rebuilt["build_id"],
                         subject.recipe.commit, subject.recipe.fingerprint, status, threshold, packages, files)
    return {**report.to_dict(), "interactive": subject.build.interactive}


def interactive_warning(subject: AuditSubject) -> str | None:
    """What an audit says first of an image someone worked on by hand in its build (kiln shell)."""
    if not subject.build.interactive:
        return None
    return (f"{subject.image.image_id}: {lineage.NOT_REPRODUCIBLE}; a rebuild from its recipe is expected to "
            "differ by those changes")
