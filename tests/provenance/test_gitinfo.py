"""Git capture of a recipe on temporary repositories: clean, dirty, untracked, no repo, detached, remotes, and the
source provenance records for it (the remote any host resolves; a path only when there is none, marked local)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from git import Actor, Repo

from provenance import attest, lineage, store
from provenance.gitinfo import GitDirtyError, GitInfo, capture, require_clean, source_uri, strip_credentials

ME = Actor("Joe Builder", "builder@example.org")


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    """A repository with one commit: recipes/webserver.yaml, its script and an unrelated README."""
    root = tmp_path / "images"
    (root / "recipes" / "scripts").mkdir(parents=True)
    (root / "recipes" / "webserver.yaml").write_text("name: webserver\nversion: 1.2.0\n")
    (root / "recipes" / "scripts" / "setup.sh").write_text("#!/bin/sh\necho setup\n")
    (root / "README.md").write_text("images\n")
    repo = Repo.init(root, initial_branch="main")
    repo.index.add(["recipes/webserver.yaml", "recipes/scripts/setup.sh", "README.md"])
    repo.index.commit("recipes", author=ME, committer=ME)
    return repo


def _recipe(repo: Repo) -> Path:
    return Path(repo.working_tree_dir) / "recipes" / "webserver.yaml"


def _script(repo: Repo) -> Path:
    return Path(repo.working_tree_dir) / "recipes" / "scripts" / "setup.sh"


def test_clean_recipe_records_commit_branch_and_relative_path(repo: Repo) -> None:
    (Path(repo.working_tree_dir) / "README.md").write_text("an unrelated change\n")  # not the recipe's
    info = capture(_recipe(repo), [_script(repo)])
    assert info.in_git and not info.dirty
    assert (info.commit, info.branch, info.path) == (repo.head.commit.hexsha, "main", "recipes/webserver.yaml")
    assert info.root == str(Path(repo.working_tree_dir).resolve())
    assert (info.modified, info.untracked, info.remote_url) == ((), (), None)
    assert info.repo == info.root  # no remote: the root identifies the repository
    require_clean(info)


def test_modified_recipe_is_dirty(repo: Repo) -> None:
    _recipe(repo).write_text("name: webserver\nversion: 1.2.1\n")
    info = capture(_recipe(repo), [_script(repo)])
    assert info.dirty and info.modified == ("recipes/webserver.yaml",)
    with pytest.raises(GitDirtyError, match=r"modified: recipes/webserver.yaml"):
        require_clean(info)


def test_modified_referenced_file_makes_the_recipe_dirty(repo: Repo) -> None:
    _script(repo).write_text("#!/bin/sh\necho changed\n")
    info = capture(_recipe(repo), [_script(repo)])
    assert info.dirty and info.modified == ("recipes/scripts/setup.sh",)
    assert not capture(_recipe(repo)).dirty  # the recipe alone is unchanged


def test_staged_change_is_dirty(repo: Repo) -> None:
    _script(repo).write_text("#!/bin/sh\necho staged\n")
    repo.index.add(["recipes/scripts/setup.sh"])
    assert capture(_recipe(repo), [_script(repo)]).modified == ("recipes/scripts/setup.sh",)


def test_untracked_referenced_file_is_dirty_and_named(repo: Repo) -> None:
    test_txt = Path(repo.working_tree_dir) / "recipes" / "files" / "test.txt"
    test_txt.parent.mkdir()
    test_txt.write_text("SUCCESSFUL TEST\n")
    info = capture(_recipe(repo), [_script(repo), test_txt])
    assert info.dirty and info.untracked == ("recipes/files/test.txt",) and info.modified == ()
    with pytest.raises(GitDirtyError, match=r"untracked: recipes/files/test.txt"):
        require_clean(info)


def test_referenced_file_outside_the_repository_counts_as_untracked(repo: Repo, tmp_path: Path) -> None:
    elsewhere = tmp_path / "secret-sauce.sh"
    elsewhere.write_text("echo\n")
    info = capture(_recipe(repo), [elsewhere])
    assert info.dirty and info.untracked == (str(elsewhere.resolve()),)


def test_recipe_outside_git_is_recorded_not_an_error(tmp_path: Path) -> None:
    recipe = tmp_path / "loose" / "webserver.yaml"
    recipe.parent.mkdir()
    recipe.write_text("name: webserver\n")
    info = capture(recipe)
    assert not info.in_git and info.path == str(recipe.resolve())
    assert (info.root, info.commit, info.branch, info.remote_url, info.dirty) == (None, None, None, None, False)
    with pytest.raises(GitDirtyError, match="not in a git repository"):
        require_clean(info)


def test_repository_without_commits_has_no_commit_and_is_dirty(tmp_path: Path) -> None:
    repo = Repo.init(tmp_path / "fresh", initial_branch="main")
    recipe = Path(repo.working_tree_dir) / "r.yaml"
    recipe.write_text("name: r\n")
    repo.index.add(["r.yaml"])
    info = capture(recipe)
    assert info.in_git and info.commit is None and info.dirty and info.modified == ("r.yaml",)
    with pytest.raises(GitDirtyError, match="no commit yet"):
        require_clean(info)


def test_detached_head_has_no_branch(repo: Repo) -> None:
    first = repo.head.commit.hexsha
    _script(repo).write_text("#!/bin/sh\necho two\n")
    repo.index.add(["recipes/scripts/setup.sh"])
    repo.index.commit("two", author=ME, committer=ME)
    repo.git.checkout(first)
    info = capture(_recipe(repo), [_script(repo)])
    assert (info.commit, info.branch, info.dirty) == (first, None, False)


def test_remote_credentials_are_stripped(repo: Repo) -> None:
    repo.create_remote("origin", "https://builder:s3cret@git.example.org/team/images.git")
    info = capture(_recipe(repo))
    assert info.remote_url == "https://git.example.org/team/images.git"
    assert info.repo == info.remote_url
    assert "s3cret" not in repr(info)


@pytest.mark.parametrize(
    ("url", "stripped"),
    [
        ("https://user:pass@host.example/x.git", "https://host.example/x.git"),
        ("https://ghp_T0KEN@github.com/org/x.git", "https://github.com/org/x.git"),
        ("https://oauth2:glpat-abc@gitlab.example:8443/x.git", "https://gitlab.example:8443/x.git"),
        ("http://host.example/x.git", "http://host.example/x.git"),
        ("ssh://git:pw@host.example:2222/x.git", "ssh://git@host.example:2222/x.git"),
        ("ssh://git@host.example/x.git", "ssh://git@host.example/x.git"),
        ("git@github.com:org/x.git", "git@github.com:org/x.git"),
        ("/srv/git/x.git", "/srv/git/x.git"),
    ],
)
def test_strip_credentials(url: str, stripped: str) -> None:
    assert strip_credentials(url) == stripped


@pytest.mark.parametrize(
    ("repo", "uri"),
    [
        ("https://git.example.org/team/images.git", "git+https://git.example.org/team/images.git@c0ffee"),
        ("ssh://git@host.example:2222/x.git", "git+ssh://git@host.example:2222/x.git@c0ffee"),
        ("git@github.com:org/x.git", "git+ssh://git@github.com/org/x.git@c0ffee"),
        ("/srv/git/x", "git+file:///srv/git/x@c0ffee"),
    ],
)
def test_the_source_uri_follows_slsas_git_convention(repo: str, uri: str) -> None:
    assert source_uri(repo, "c0ffee") == uri


@pytest.mark.parametrize("origin", ["https://builder:s3cret@git.example.org/team/images.git", "clone-source", None])
def test_provenance_names_the_source_by_its_remote_and_a_path_only_marked_local(
    repo: Repo, tmp_path: Path, db_url: str, origin: str | None
) -> None:
    """A clone with an https origin records that remote (the clone's path an annotation); a plain clone of a
    directory, or a repository with no remote at all, records the path, marked local."""
    if origin is None:
        checkout = repo
    else:
        checkout = repo.clone(tmp_path / "clone")
        if origin != "clone-source":
            checkout.remotes.origin.set_url(origin)
    root = Path(checkout.working_tree_dir).resolve()
    info = capture(_recipe(checkout), [_script(checkout)])
    build = _record_a_build(info)

    statement = attest.statement_for(f"img-{build[:12]}")
    source = statement["predicate"]["buildDefinition"]["resolvedDependencies"][0]
    recipe = lineage.lineage(f"img-{build[:12]}").to_dict()["recipe"]

    commit = repo.head.commit.hexsha
    if origin is None or origin == "clone-source":
        where = Path(checkout.remotes.origin.url if origin else checkout.working_tree_dir).resolve()
        assert source["uri"] == f"git+file://{where}@{commit}" and source["annotations"]["local"] is True
        assert (recipe["repo"], recipe["repo_local"]) == (str(where), True)
    else:
        assert source["uri"] == f"git+https://git.example.org/team/images.git@{commit}"
        assert source["annotations"]["local"] is False
        assert (recipe["repo"], recipe["repo_local"]) == ("https://git.example.org/team/images.git", False)
        assert "s3cret" not in json.dumps(statement)
    assert source["digest"] == {"gitCommit": commit}
    assert source["annotations"]["checkout"] == recipe["checkout"] == str(root)
    assert recipe["source"] == source["uri"]


def _record_a_build(info: GitInfo) -> str:
    version = store.record_recipe_version(name="webserver", version="1.2.0", fingerprint="f" * 64, recipe_json="{}",
                                          git=info)
    build = store.start_build(recipe_version_id=version, target="local", cloud="local", trigger="test")
    store.record_image(cloud="local", image_id=f"img-{build[:12]}", build_id=build, sha256="a" * 64)
    return build
