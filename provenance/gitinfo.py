"""The git facts of a recipe (repository, commit, branch, remote, dirtiness), captured with gitpython, and the
URI that names its source on any host (SLSA's `git+<remote>@<commit>`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from git import InvalidGitRepositoryError, NoSuchPathError, Repo


@dataclass(frozen=True)
class GitInfo:
    """Where a recipe lives in git. Outside git: in_git=False, path absolute, the rest empty."""

    in_git: bool
    path: str  # the recipe, relative to root (POSIX); absolute when not in git
    root: str | None = None
    commit: str | None = None  # None outside git or before the first commit
    branch: str | None = None  # None when HEAD is detached
    remote_url: str | None = None  # credentials stripped
    dirty: bool = False  # the recipe or one of its files is modified, staged or untracked
    modified: tuple[str, ...] = ()  # the recipe's tracked files with uncommitted changes (relative to root)
    untracked: tuple[str, ...] = ()  # the recipe's files git does not track (relative, or absolute if outside)

    @property
    def repo(self) -> str | None:
        """What identifies the repository in provenance: its remote when it has one, else its root."""
        return self.remote_url or self.root

    @property
    def repo_local(self) -> bool:
        """The repository is known only by a path on this host (no remote, or a remote that is a path)."""
        return self.repo is not None and is_local_location(self.repo)


class GitDirtyError(RuntimeError):
    """The recipe cannot be reproduced from a commit: it or its files are modified, untracked or not in git."""


def capture(recipe_path: Path, extra_files: Iterable[Path] = ()) -> GitInfo:
    """Git facts for a recipe and the files it references (scripts, copied files)."""
    recipe = Path(recipe_path).resolve()
    try:
        repo = Repo(recipe.parent, search_parent_directories=True)
    except (InvalidGitRepositoryError, NoSuchPathError):
        return GitInfo(in_git=False, path=str(recipe))
    with repo:
        if repo.working_tree_dir is None:  # a bare repository holds no recipe files
            return GitInfo(in_git=False, path=str(recipe))
        root = Path(repo.working_tree_dir).resolve()
        inside, outside = _split_by_root([recipe, *(Path(f).resolve() for f in extra_files)], root)
        tracked = set(repo.git.ls_files("-z", "--", *inside).split("\0")) - {""} if inside else set()
        untracked = [p for p in inside if p not in tracked] + outside
        modified = _modified(repo, sorted(tracked))
        return GitInfo(
            in_git=True,
            path=recipe.relative_to(root).as_posix(),
            root=str(root),
            commit=repo.head.commit.hexsha if repo.head.is_valid() else None,
            branch=None if repo.head.is_detached else repo.active_branch.name,
            remote_url=_remote_url(repo),
            dirty=bool(modified or untracked),
            modified=tuple(modified),
            untracked=tuple(dict.fromkeys(untracked)),
        )


def require_clean(info: GitInfo) -> None:
    """Raise GitDirtyError unless the recipe and all its files are committed, naming what is not."""
    if not info.in_git:
        raise GitDirtyError(f"recipe {info.path} is not in a git repository; commit it to build with --require-clean")
    problems = []
    if info.commit is None:
        problems.append("the repository has no commit yet")
    if info.modified:
        problems.append("modified: " + ", ".join(info.modified))
    if info.untracked:
        problems.append("untracked: " + ", ".join(info.untracked))
    if problems:
        raise GitDirtyError(f"recipe {info.path} in {info.root} is not clean ({'; '.join(problems)}); commit first")


def strip_credentials(url: str) -> str:
    """A remote URL without user:password or token userinfo (ssh keeps its user name; scp-like is kept)."""
    if "://" not in url:
        return url  # scp-like git@host:path or a local path: no credentials to strip
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    if parts.scheme in ("ssh", "git+ssh", "ssh+git"):
        user = userinfo.split(":", 1)[0]
        host = f"{user}@{host}" if user else host
    return urlunsplit(parts._replace(netloc=host))


def is_local_location(repo: str) -> bool:
    """A path or file: URL (only this host can resolve it), not a network remote."""
    return repo.startswith(("/", "file:", "git+file:")) or ("://" not in repo and ":" not in repo.split("/", 1)[0])


def source_uri(repo: str, commit: str | None) -> str:
    """The repository at a commit as SLSA names a source: git+https://host/path@commit, git+ssh://… for an ssh or
    scp-like remote, git+file:///path for a repository known only by its path."""
    if repo.startswith("git+"):
        uri = repo
    elif "://" in repo:
        uri = f"git+{repo}"
    elif is_local_location(repo):
        uri = f"git+{Path(repo).as_uri()}"  # capture() records a path remote absolute
    else:  # scp-like [user@]host:path
        host, path = repo.split(":", 1)
        uri = f"git+ssh://{host}/{path.lstrip('/')}"
    return f"{uri}@{commit}" if commit else uri


def _split_by_root(files: list[Path], root: Path) -> tuple[list[str], list[str]]:
    inside: list[str] = []
    outside: list[str] = []
    for file in files:
        if file.is_relative_to(root):
            inside.append(file.relative_to(root).as_posix())
        else:
            outside.append(str(file))
    return inside, outside


def _modified(repo: Repo, tracked: list[str]) -> list[str]:
    """Tracked files whose index or work tree differs from HEAD (staged, unstaged or deleted)."""
    if not tracked:
        return []
    status = repo.git.status("--porcelain=v1", "-z", "--untracked-files=no", "--", *tracked)
    # Each entry is "XY path"; a rename adds its source path as the next NUL-separated field.
    entries = [e for e in status.split("\0") if e]
    changed: list[str] = []
    skip_next = False
    for entry in entries:
        if skip_next:
            skip_next = False
            continue
        changed.append(entry[3:])
        skip_next = entry[0] in "RC"
    return sorted(set(changed))


def _remote_url(repo: Repo) -> str | None:
    """The URL of the branch's tracking remote, else origin, else the first remote."""
    remotes = list(repo.remotes)
    if not remotes:
        return None
    remote = next((r for r in remotes if r.name == "origin"), remotes[0])
    if not repo.head.is_detached:
        tracking = repo.active_branch.tracking_branch()
        if tracking is not None:
            remote = next((r for r in remotes if r.name == tracking.remote_name), remote)
    try:
        url = strip_credentials(remote.url)
    except Exception:  # a remote without a url entry
        return None
    if is_local_location(url) and not url.startswith(("/", "file:", "git+file:")):  # relative to the work tree
        url = str((Path(repo.working_tree_dir or ".") / url).resolve())
    return url
