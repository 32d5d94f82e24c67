"""`kiln builds`, `kiln show`, `kiln images` and `kiln db upgrade` on a seeded provenance database."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kiln.cli import app
from provenance import store
from provenance.gitinfo import GitInfo

runner = CliRunner()


@pytest.fixture
def seeded(db_url: str) -> dict[str, str]:
    """One succeeded local build with a base and a built image, one failed ec2 build."""
    git = GitInfo(in_git=True, path="recipes/webserver.yaml", root="/src", commit="c0ffee" + "0" * 34, branch="main")
    version = store.record_recipe_version(name="webserver", version="1.2.0", fingerprint="f" * 64,
                                          recipe_json="{}", git=git)
    ok = store.start_build(recipe_version_id=version, target="local", cloud="local")
    for stage in ("fetch_base", "launch"):
        step = store.start_step(ok, stage)
        store.append_step_log(step, f"{stage} done\n")
        store.finish_step(step, "succeeded")
    base = store.record_image(cloud="local", image_id="debian-bookworm", kind="base", sha256="b" * 64)
    store.record_image(cloud="local", image_id="img-ok", build_id=ok, parent_id=base, format="qcow2",
                       size=512 * 1024**2, sha256="a" * 64)
    store.record_probe(ok, name="http /test.txt", kind="http", passed=True, detail="200", duration=0.1)
    store.finish_build(ok, "succeeded", stage="register")
    dstat = store.record_recipe_version(name="dstat", version="1.0.0", fingerprint="d" * 64, recipe_json="{}",
                                        git=git)
    bad = store.start_build(recipe_version_id=dstat, target="ec2", cloud="ec2", region="us-east-1")
    store.finish_build(bad, "failed", stage="customize", error="[Errno 2] [/] script exited 1")
    return {"ok": ok, "bad": bad}


def _json(args: list[str]):
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_builds_json_lists_and_filters(seeded: dict[str, str]) -> None:
    assert [b["id"] for b in _json(["builds"])] == [seeded["bad"], seeded["ok"]]
    assert [b["id"] for b in _json(["builds", "--recipe", "webserver"])] == [seeded["ok"]]
    [failed] = _json(["builds", "--status", "failed"])
    assert (failed["id"], failed["stage"], failed["error"], failed["recipe"]["name"]) == (
        seeded["bad"], "customize", "[Errno 2] [/] script exited 1", "dstat")


def test_builds_table_and_bad_status(seeded: dict[str, str]) -> None:
    result = runner.invoke(app, ["builds"])
    assert result.exit_code == 0 and "webserver@1.2.0" in result.stdout and seeded["ok"][:12] in result.stdout
    result = runner.invoke(app, ["builds", "--status", "done"])
    assert result.exit_code == 2 and "--status 'done'" in result.output


def test_show_by_prefix_names_recipe_stages_probes_and_images(seeded: dict[str, str]) -> None:
    shown = _json(["show", seeded["ok"][:10]])
    assert shown["id"] == seeded["ok"] and shown["recipe"]["commit"].startswith("c0ffee")
    assert shown["recipe"]["fingerprint"] == "f" * 64
    assert [(s["stage"], s["status"], s["attempt"], s["log"]) for s in shown["steps"]] == [
        ("fetch_base", "succeeded", 1, "fetch_base done\n"), ("launch", "succeeded", 1, "launch done\n")]
    assert [p["name"] for p in shown["probes"]] == ["http /test.txt"]
    assert [(i["image_id"], i["parent_image_id"]) for i in shown["images"]] == [("img-ok", "debian-bookworm")]
    table = runner.invoke(app, ["show", seeded["ok"], "--logs"])
    assert table.exit_code == 0 and "fetch_base done" in table.stdout and "img-ok" in table.stdout


def test_show_prints_errors_verbatim_not_as_markup(seeded: dict[str, str]) -> None:
    result = runner.invoke(app, ["show", seeded["bad"]])
    assert result.exit_code == 0, result.output
    assert "[Errno 2] [/] script exited 1" in result.stdout and "us-east-1" in result.stdout


def test_show_unknown_build_exits_2(seeded: dict[str, str]) -> None:
    result = runner.invoke(app, ["show", "feedfacefeedface"])
    assert result.exit_code == 2 and "no build 'feedfacefeedface'" in result.output


def test_images_json_names_recipe_commit_and_parent(seeded: dict[str, str]) -> None:
    images = {i["image_id"]: i for i in _json(["images", "--cloud", "local"])}
    assert set(images) == {"img-ok", "debian-bookworm"}
    built = images["img-ok"]
    assert (built["recipe_name"], built["recipe_version"], built["parent_image_id"], built["size"]) == (
        "webserver", "1.2.0", "debian-bookworm", 512 * 1024**2)
    assert built["commit"].startswith("c0ffee") and built["build_id"] == seeded["ok"]
    assert _json(["images", "--recipe", "dstat"]) == []
    assert _json(["images", "--cloud", "ec2"]) == []


def test_images_expiring_lists_what_ends_soon_soonest_first_and_marks_the_past_expired(seeded: dict[str, str]) -> None:
    now = dt.datetime.now(dt.UTC)
    for image_id, days in (("img-in-10-days", 10), ("img-yesterday", -1), ("img-in-a-year", 365)):
        store.record_image(cloud="local", image_id=image_id, build_id=seeded["ok"], kind="copy",
                           valid_until=now + dt.timedelta(days=days))  # fmt: skip

    soon = _json(["images", "--expiring", "14d"])

    assert [(i["image_id"], i["status"]) for i in soon] == [("img-yesterday", "expired"),
                                                             ("img-in-10-days", "available")]  # fmt: skip
    assert [i["image_id"] for i in _json(["images", "--expiring", "2d"])] == ["img-yesterday"]
    table = runner.invoke(app, ["images", "--expiring", "14d"])
    assert table.exit_code == 0 and "valid until" in table.stdout and "img-in-a-year" not in table.stdout
    bad = runner.invoke(app, ["images", "--expiring", "soon"])
    assert bad.exit_code == 2 and "--expiring: 'soon' is not a duration" in bad.stderr


def test_db_upgrade_on_a_fresh_kiln_home(tmp_path: Path) -> None:
    kiln = Path(sys.executable).parent / "kiln"
    env = {k: v for k, v in os.environ.items() if k != "KILN_DATABASE_URL"} | {"KILN_HOME": str(tmp_path / "home")}
    result = subprocess.run([str(kiln), "db", "upgrade"], env=env, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout.strip()) == (0, "0006"), result.stderr
    assert (tmp_path / "home" / "kiln.db").is_file()


@pytest.fixture
def hostile(db_url: str) -> dict[str, str]:
    """A build recorded before recipes were as strict as now: markup in its version, terminal sequences in its
    step log and error (a guest's output can hold anything)."""
    git = GitInfo(in_git=True, path="recipes/x.yaml", root="/src", commit="c0ffee" + "0" * 34, branch="[bold]main")
    version = store.record_recipe_version(name="x[/]", version="1.0-[/]", fingerprint="e" * 64, recipe_json="{}",
                                          git=git)
    build = store.start_build(recipe_version_id=version, target="local", cloud="local")
    step = store.start_step(build, "customize")
    store.append_step_log(step, "plain line\n\x1b]0;pwned\x07\x1b[2J\x1b[1A[red]not markup[/]\ttab\n")
    store.finish_step(step, "failed", error="\x1b[31mred\x1b[0m [/] failed")
    image = store.record_image(cloud="local", image_id="img-[/]", build_id=build, format="qcow2", sha256="c" * 64)
    store.finish_build(build, "failed", stage="customize", error="bad [link=http://evil]click[/link]")
    return {"build": build, "image": "img-[/]", "image_row": str(image)}


def test_user_and_guest_text_prints_as_itself_never_as_markup_or_terminal_control(hostile: dict[str, str]) -> None:
    show = runner.invoke(app, ["show", hostile["build"], "--logs"])
    lineage = runner.invoke(app, ["lineage", hostile["image"]])
    builds = runner.invoke(app, ["builds"])
    missing = runner.invoke(app, ["show", "[/]"])

    for result in (show, lineage, builds):
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "x[/]@1.0-[/]" in show.stdout and "bad [link=http://evil]click[/link]" in show.stdout
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\x1b[1A[red]not markup[/]" in show.stdout and "    tab" in show.stdout
    assert "\\x1b[31mred\\x1b[0m [/] failed" in show.stdout
    assert "img-[/]" in lineage.stdout and "x[/]@1.0-[/]" in lineage.stdout
    assert "x[/]@1.0-[/]" in builds.stdout
    assert missing.exit_code == 2 and missing.stderr == "error: no build '[/]' in the provenance database (see " \
                                                        "`kiln builds`)\n"
