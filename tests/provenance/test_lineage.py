"""Lineage of any image kiln knows: ancestors, descendants and siblings by recursive SQL, on SQLite and PostgreSQL,
in the three output formats, and an unknown id refused with exit 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kiln.cli import app
from provenance import lineage, store
from tests.provenance.seeded_chain import A_RAW_SHA, A_SHA, BASE_ID, BASE_SHA, Chain, seed_chain

runner = CliRunner()



@pytest.fixture
def chain(db_url: str) -> Chain:
    return seed_chain()


def _ids(nodes: list[lineage.LineageNode]) -> list[str]:
    return [node.image.image_id for node in nodes]


def test_ancestors_run_from_the_parent_up_to_the_root(chain: Chain) -> None:
    found = lineage.lineage("img-cccccccccccc", down=False, siblings=False)

    assert _ids(found.ancestors) == ["img-bbbbbbbbbbbb", "img-aaaaaaaaaaaa", BASE_ID]
    assert [node.depth for node in found.ancestors] == [1, 2, 3]
    assert found.descendants is None and found.siblings is None
    b = found.ancestors[0]
    assert (b.recipe.name, b.recipe.commit, b.recipe.dirty, b.recipe.fingerprint) == ("web", "b2" * 20, True, "2" * 64)
    assert b.build.id == chain.build_b
    assert found.ancestors[-1].build is None and found.ancestors[-1].image.kind == "base"


def test_descendants_reach_every_depth_with_their_parents(chain: Chain) -> None:
    found = lineage.lineage(BASE_ID, up=False, siblings=False)

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
                              "repo": "/src/images", "repo_local": True, "commit": "a1" * 20, "branch": "main",
                              "dirty": False, "path": "recipes/golden.yaml", "checkout": "/src/images",
                              "source": f"git+file:///src/images@{'a1' * 20}"}
    assert data["base"]["image_id"] == BASE_ID and data["base"]["kind"] == "base"
    assert [n["image_id"] for n in data["ancestors"]] == [BASE_ID]
    assert data["children"] == ["img-bbbbbbbbbbbb"]
    assert [(n["image_id"], n["depth"]) for n in data["descendants"]] == [
        ("img-bbbbbbbbbbbb", 1), ("img-cccccccccccc", 2)]
    assert sorted(n["image_id"] for n in data["siblings"]) == ["ami-0sibling", "img-aaaaaaaaaaaa.raw"]


def test_lineage_flags_limit_the_directions(chain: Chain) -> None:
    result = runner.invoke(app, ["lineage", "img-bbbbbbbbbbbb", "--up", "--format", "json"])

    data = json.loads(result.stdout)
    assert [n["image_id"] for n in data["ancestors"]] == ["img-aaaaaaaaaaaa", BASE_ID]
    assert "descendants" not in data and "siblings" not in data and "children" not in data


def test_lineage_tree_shows_the_chain_the_image_its_descendants_and_siblings(chain: Chain) -> None:
    result = runner.invoke(app, ["lineage", "img-aaaaaaaaaaaa"])

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    position = {image: next(i for i, line in enumerate(lines) if image in line and "sha256" in line)
                for image in ("base:debian-bookworm@", "img-aaaaaaaaaaaa ", "img-bbbbbbbbbbbb", "img-cccccccccccc")}
    assert list(position.values()) == sorted(position.values()), result.stdout  # root first, then down
    assert "▶" in lines[position["img-aaaaaaaaaaaa "]]
    indent = {image: len(lines[i]) - len(lines[i].lstrip(" │└├─▶")) for image, i in position.items()}
    assert indent["base:debian-bookworm@"] < indent["img-aaaaaaaaaaaa "] < indent["img-bbbbbbbbbbbb"] \
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
