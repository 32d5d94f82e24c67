"""Lineage of any image kiln knows: ancestors, descendants and siblings by recursive SQL, on SQLite and PostgreSQL,
in the three output formats, and an unknown id refused with exit 2."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from kiln.cli import app
from provenance import lineage, store
from provenance.gitinfo import GitInfo

runner = CliRunner()

BASE_SHA = "b" * 64
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


@pytest.fixture
def chain(db_url: str) -> Chain:
    base = store.record_image(cloud="local", image_id="/cache/bases/debian-bookworm.qcow2", sha256=BASE_SHA,
                              kind="base", format="qcow2")
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


def _ids(nodes: list[lineage.LineageNode]) -> list[str]:
    return [node.image.image_id for node in nodes]


def test_ancestors_run_from_the_parent_up_to_the_root(chain: Chain) -> None:
    found = lineage.lineage("img-cccccccccccc", down=False, siblings=False)

    assert _ids(found.ancestors) == ["img-bbbbbbbbbbbb", "img-aaaaaaaaaaaa", "/cache/bases/debian-bookworm.qcow2"]
    assert [node.depth for node in found.ancestors] == [1, 2, 3]
    assert found.descendants is None and found.siblings is None
    b = found.ancestors[0]
    assert (b.recipe.name, b.recipe.commit, b.recipe.dirty, b.recipe.fingerprint) == ("web", "b2" * 20, True, "2" * 64)
    assert b.build.id == chain.build_b
    assert found.ancestors[-1].build is None and found.ancestors[-1].image.kind == "base"


def test_descendants_reach_every_depth_with_their_parents(chain: Chain) -> None:
    found = lineage.lineage("/cache/bases/debian-bookworm.qcow2", up=False, siblings=False)

    assert [(n.image.image_id, n.depth) for n in found.descendants] == [
        ("img-aaaaaaaaaaaa", 1), ("img-aaaaaaaaaaaa.raw", 1), ("img-bbbbbbbbbbbb", 2), ("img-cccccccccccc", 3),
    ]
    assert [n.parent_row_id for n in found.descendants] == [chain.base, chain.base, chain.a, chain.b]
    assert found.ancestors is None


def test_siblings_are_the_same_recipe_version_on_other_targets_and_formats(chain: Chain) -> None:
    found = lineage.lineage("img-aaaaaaaaaaaa", up=False, down=False)

    assert sorted(_ids(found.siblings)) == ["ami-0sibling", "img-aaaaaaaaaaaa.raw"]
    ami = next(n for n in found.siblings if n.image.image_id == "ami-0sibling")
    assert (ami.image.cloud, ami.image.region, ami.build.target, ami.parent_row_id) == (
        "ec2", "us-east-1", "ec2", chain.ami_base)
    assert lineage.lineage("img-cccccccccccc", up=False, down=False).siblings == []


def test_an_image_is_found_by_its_file_digest_and_a_built_row_wins_over_a_base(chain: Chain) -> None:
    assert lineage.resolve_image(A_SHA).id == chain.a
    assert lineage.resolve_image(A_RAW_SHA).id == chain.a_raw
    assert lineage.resolve_image(BASE_SHA).id == chain.base
    # A base kiln saw again under the digest of a built image still resolves to the built image.
    store.record_image(cloud="local", image_id="/cache/copy-of-a.qcow2", sha256=A_SHA, kind="base")
    assert lineage.resolve_image(A_SHA).id == chain.a


def test_lineage_json_names_build_commit_fingerprint_base_and_children(chain: Chain) -> None:
    result = runner.invoke(app, ["lineage", "img-aaaaaaaaaaaa", "--format", "json"])

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["image"]["image_id"] == "img-aaaaaaaaaaaa" and data["image"]["sha256"] == A_SHA
    assert data["build"]["id"] == chain.build_a and data["build"]["target"] == "local"
    assert data["recipe"] == {"name": "golden", "version": "1.0.0", "fingerprint": "1" * 64,
                              "repo": "/src/images", "commit": "a1" * 20, "branch": "main", "dirty": False,
                              "path": "recipes/golden.yaml"}
    assert data["base"]["image_id"] == "/cache/bases/debian-bookworm.qcow2" and data["base"]["kind"] == "base"
    assert [n["image_id"] for n in data["ancestors"]] == ["/cache/bases/debian-bookworm.qcow2"]
    assert data["children"] == ["img-bbbbbbbbbbbb"]
    assert [(n["image_id"], n["depth"]) for n in data["descendants"]] == [
        ("img-bbbbbbbbbbbb", 1), ("img-cccccccccccc", 2)]
    assert sorted(n["image_id"] for n in data["siblings"]) == ["ami-0sibling", "img-aaaaaaaaaaaa.raw"]


def test_lineage_flags_limit_the_directions(chain: Chain) -> None:
    result = runner.invoke(app, ["lineage", "img-bbbbbbbbbbbb", "--up", "--format", "json"])

    data = json.loads(result.stdout)
    assert [n["image_id"] for n in data["ancestors"]] == ["img-aaaaaaaaaaaa", "/cache/bases/debian-bookworm.qcow2"]
    assert "descendants" not in data and "siblings" not in data and "children" not in data


def test_lineage_tree_shows_the_chain_the_image_its_descendants_and_siblings(chain: Chain) -> None:
    result = runner.invoke(app, ["lineage", "img-aaaaaaaaaaaa"])

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    position = {image: next(i for i, line in enumerate(lines) if image in line and "sha256" in line)
                for image in ("debian-bookworm.qcow2", "img-aaaaaaaaaaaa ", "img-bbbbbbbbbbbb", "img-cccccccccccc")}
    assert list(position.values()) == sorted(position.values()), result.stdout  # root first, then down
    assert "▶" in lines[position["img-aaaaaaaaaaaa "]]
    indent = {image: len(lines[i]) - len(lines[i].lstrip(" │└├─▶")) for image, i in position.items()}
    assert indent["debian-bookworm.qcow2"] < indent["img-aaaaaaaaaaaa "] < indent["img-bbbbbbbbbbbb"] \
        < indent["img-cccccccccccc"]
    assert "golden@1.0.0" in result.stdout and "commit a1a1a1a1a1" in result.stdout
    assert "siblings" in result.stdout and "ami-0sibling" in result.stdout


def test_lineage_dot_is_a_graph_with_parent_edges_and_sibling_edges(chain: Chain) -> None:
    result = runner.invoke(app, ["lineage", "img-aaaaaaaaaaaa", "--format", "dot"])

    assert result.exit_code == 0, result.output
    dot = result.stdout
    assert dot.startswith("digraph lineage {") and dot.rstrip().endswith("}")
    assert f'"{chain.base}" -> "{chain.a}";' in dot
    assert f'"{chain.a}" -> "{chain.b}";' in dot and f'"{chain.b}" -> "{chain.c}";' in dot
    assert f'"{chain.a}" -> "{chain.ami}" [style=dashed' in dot
    assert dot.count(f'"{chain.a}" [label=') == 1


def test_unknown_image_exits_2_and_says_so(chain: Chain) -> None:
    result = runner.invoke(app, ["lineage", "ami-0doesnotexist"])

    assert result.exit_code == 2
    assert "no image 'ami-0doesnotexist'" in result.stderr


def test_bad_format_exits_2(chain: Chain) -> None:
    result = runner.invoke(app, ["lineage", "img-aaaaaaaaaaaa", "--format", "yaml"])

    assert result.exit_code == 2 and "--format" in result.stderr
