"""A built image graph seeded through the store: base → A (+ its raw copy) → B → C, and an EC2 sibling of A."""

from __future__ import annotations

from dataclasses import dataclass

from provenance import store
from provenance.gitinfo import GitInfo

BASE_SHA = "b" * 64
BASE_ID = f"base:debian-bookworm@sha256:{BASE_SHA}"  # a bootstrap base, as every host names it
A_SHA = "a" * 64
A_RAW_SHA = "e" * 64
B_SHA = "c" * 64
C_SHA = "d" * 64


@dataclass(frozen=True)
class Chain:
    """base → A (local, + its raw copy) → B (built from A) → C (built from B); A's recipe also built ami-0sibling."""

    base: int
    a: int
    a_raw: int
    ami: int
    ami_base: int
    b: int
    c: int
    build_a: str
    build_b: str


def _version(name: str, fingerprint: str, commit: str, *, dirty: bool = False) -> int:
    git = GitInfo(in_git=True, path=f"recipes/{name}.yaml", root="/src/images", commit=commit, branch="main",
                  dirty=dirty)
    return store.record_recipe_version(name=name, version="1.0.0", fingerprint=fingerprint, recipe_json="{}", git=git)


def _built(version: int, target: str, cloud: str, image_id: str, parent: int, sha256: str = "", region: str = "",
           ) -> tuple[str, int]:
    build = store.start_build(recipe_version_id=version, target=target, cloud=cloud, region=region, trigger="test")
    row = store.record_image(cloud=cloud, region=region, image_id=image_id, build_id=build, parent_id=parent,
                             sha256=sha256, format="qcow2" if sha256 else "", path=f"/images/{image_id}.qcow2"
                             if sha256 else "")
    store.finish_build(build, "succeeded", stage="register")
    return build, row


def seed_chain() -> Chain:
    """Seed the chain through the store's own writers."""
    base = store.record_image(cloud="local", image_id=BASE_ID, sha256=BASE_SHA, kind="base", format="qcow2",
                              path="/cache/bases/bootstrap/0123.qcow2")
    ami_base = store.record_image(cloud="ec2", region="us-east-1", image_id="ami-0base", kind="base")
    golden = _version("golden", "1" * 64, "a1" * 20)
    build_a, a = _built(golden, "local", "local", "img-aaaaaaaaaaaa", base, A_SHA)
    a_raw = store.record_image(cloud="local", image_id="img-aaaaaaaaaaaa.raw", build_id=build_a, parent_id=base,
                               kind="copy", format="raw", sha256=A_RAW_SHA)
    _, ami = _built(golden, "ec2", "ec2", "ami-0sibling", ami_base, region="us-east-1")
    web = _version("web", "2" * 64, "b2" * 20, dirty=True)
    build_b, b = _built(web, "local", "local", "img-bbbbbbbbbbbb", a, B_SHA)
    app_version = _version("app", "3" * 64, "c3" * 20)
    _, c = _built(app_version, "local", "local", "img-cccccccccccc", b, C_SHA)
    return Chain(base, a, a_raw, ami, ami_base, b, c, build_a, build_b)
