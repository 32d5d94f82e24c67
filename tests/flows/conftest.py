"""Fixtures for flow tests: recipes committed in throwaway git repos, and the session's shared real builds (the
session's Prefect server, prefect_api, is in tests/conftest.py: one for every directory)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import REPO
from tests.webhook import dead_url, webhook

KILN = Path(sys.executable).with_name("kiln")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def committed_recipe(tmp_path: Path, recipe_text: str, files: dict[str, str] | None = None) -> Path:
    """A recipe (and its files) committed in a fresh git repository; returns the recipe's path."""
    repo = tmp_path / "recipes-repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "test@example.org")
    git(repo, "config", "user.name", "kiln tests")
    for relative, text in (files or {}).items():
        path = repo / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (repo / "recipe.yaml").write_text(recipe_text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "recipe")
    return repo / "recipe.yaml"


def hello_recipe(tmp_path: Path, build_in: str | None = None) -> Path:
    """recipes/hello.yaml with its script, committed in a repo of its own (build_in: the local target's, if given)."""
    files = {"scripts/hello.sh": (REPO / "recipes/scripts/hello.sh").read_text()}
    return committed_recipe(tmp_path, with_build_in((REPO / "recipes/hello.yaml").read_text(), build_in), files)


def with_build_in(recipe_text: str, build_in: str | None) -> str:
    """The recipe with `build_in` set on its local target (the line after `local:`)."""
    if build_in is None:
        return recipe_text
    return recipe_text.replace("  local:\n", f"  local:\n    build_in: {build_in}\n", 1)


# hello's script, plus a service from Debian's mirror that a script starts and talks to during customize: what a
# build must do in a container as on a VM (the image's own systemd runs the service; apt reaches the mirror).
SERVICE_RECIPE = """\
name: hello-web
version: 1.0.0
description: hello's mark and lighttpd serving a page, proved over HTTP
targets:
  local:
    base: {bootstrap: debian-bookworm}
    ssh_user: debian
    memory_mb: 1024
packages: [lighttpd]
files:
  - {src: files/index.html, dest: /var/www/html/index.html, mode: "0644"}
scripts:
  - scripts/hello.sh
  - scripts/talk.sh
sanitize:
  disable: [zero-free-space]
verify:
  - command: {run: cat /etc/kiln-hello, expect: hello from kiln}
  - http: {port: 80, path: /index.html, expect: served by kiln}
  - command: {run: systemctl is-active lighttpd, expect: active}
"""
TALK_SCRIPT = """\
#!/bin/sh
# The service the packages step installed runs under the image's systemd: restart it and ask it for the page.
set -eu
systemctl restart lighttpd
for i in $(seq 50); do
  if python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1/index.html').read().decode())" \
      > /tmp/answer 2>/dev/null; then
    echo "lighttpd answered during customize: $(cat /tmp/answer)"; rm -f /tmp/answer; exit 0
  fi
  sleep 0.2
done
echo "lighttpd did not answer" >&2; exit 1
"""


def service_recipe(tmp_path: Path, build_in: str | None = None, more_verify: str = "") -> Path:
    """SERVICE_RECIPE with its files (and more_verify's probe lines), committed in a repo of its own."""
    files = {
        "scripts/hello.sh": (REPO / "recipes/scripts/hello.sh").read_text(),
        "scripts/talk.sh": TALK_SCRIPT,
        "files/index.html": "<p>served by kiln</p>\n",
    }
    return committed_recipe(tmp_path, with_build_in(SERVICE_RECIPE, build_in) + more_verify, files)


def run_kiln(*args: str, timeout: float = 1500, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(KILN), *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ | (env or {}))  # fmt: skip


def copy_tree(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest, dirs_exist_ok=True)


@dataclass
class HelloBuild:
    """SERVICE_RECIPE (hello's mark and a lighttpd page) built for real on the local cloud, in its default build
    container, once per session."""

    recipe: Path
    commit: str
    outcome: dict  # `kiln build --json`'s one outcome: build_id, image_id, status, …
    notifications: list[dict] = field(default_factory=list)  # what KILN_NOTIFY's JSON webhook received
    children: list[str] = field(default_factory=list)  # images a test built on this one, in order

    @property
    def image_id(self) -> str:
        return self.outcome["image_id"]


@pytest.fixture(scope="session")
def hello_build(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> HelloBuild:
    """One real local build of SERVICE_RECIPE by `kiln build` (a container build, then the verify boot: a TCG VM,
    1-3 min) for every test that needs a real local image: the build-DAG test, the audit, the lineage chain. A test
    that builds on it says so in `children`, so the others know which children to expect. KILN_NOTIFY names a JSON
    webhook served here and one where nothing listens: the build tells the first and succeeds all the same."""
    recipe = service_recipe(tmp_path_factory.mktemp("hello"))
    commit = git(recipe.parent, "rev-parse", "HEAD")
    with webhook() as hook:
        result = run_kiln("build", str(recipe), "--target", "local", "--json",
                          env={"KILN_NOTIFY": f"{hook.url('hello')} {dead_url()}"})  # fmt: skip
        notifications = hook.messages("hello")
    assert result.returncode == 0, result.stdout + result.stderr
    [outcome] = json.loads(result.stdout)
    return HelloBuild(recipe=recipe, commit=commit, outcome=outcome, notifications=notifications)


@dataclass
class FailedScriptBuild:
    """A real local build whose script prints a PEM private key and an AWS secret key, then exits 3."""

    recipe: Path
    result: subprocess.CompletedProcess  # `kiln build --json`: what the terminal showed
    outcome: dict
    needles: dict[str, bytes]  # every form of the two secrets that must appear nowhere


@pytest.fixture(scope="session")
def failed_script_build(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> FailedScriptBuild:
    """One real local build (a guest boot; customize fails, so nothing else boots) shared by the failing-script
    test and the secrets test. The key is long (RSA, 25 lines), so a command's last lines cut off its BEGIN."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()
    secret = secrets.token_urlsafe(30).replace("-", "+").replace("_", "/")[:40]
    script = (f"#!/bin/sh\necho about to fail\ncat <<'EOF'\n{key}EOF\n"
              f"echo 'aws_secret_access_key = {secret}'\necho the reason >&2\nexit 3\n")
    recipe = committed_recipe(
        tmp_path_factory.mktemp("broken"),
        "name: broken\nversion: '1'\ntargets:\n  local: {base: {bootstrap: debian-bookworm}, memory_mb: 1024}\n"
        "scripts: [scripts/fail.sh]\nverify: [{port: {port: 22}}]\n",
        {"scripts/fail.sh": script},
    )
    result = run_kiln("build", str(recipe), "--json")
    [outcome] = json.loads(result.stdout) if result.stdout.strip() else [{}]
    body = [line for line in key.splitlines() if not line.startswith("-----")]
    needles = {f"private key line {number}": line.encode() for number, line in enumerate(body, 1)}
    needles["aws secret access key"] = secret.encode()
    return FailedScriptBuild(recipe=recipe, result=result, outcome=outcome, needles=needles)
