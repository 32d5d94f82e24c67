"""The layer cache of container builds: the customize stage on real build containers (no VM: seconds each) keeps a
layer per step, reuses the longest matching run, resumes a failed build at the failed step, and ends with the same
filesystem as a build without the cache; layers are checked on use, made once under concurrency, and pruned least
recently used first."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger

from clouds.base import KeyPair
from clouds.layers import LayerCache, diff, manifest
from clouds.local import LocalCloud
from core.recipe import load_recipe
from operations.audit import compare_digests, tree_digests
from provenance import gitinfo, lineage, store
from tasks.common import BuildPlan
from tasks.customize import CustomizeError, customize, layer_keys, steps_of
from tasks.launch import Guest
from tests.clouds.conftest import Spec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="build containers need root")
TAGS = {"kiln:build-id": "test-layers", "kiln:recipe": "tests"}
RECIPE = """\
name: layered
version: 1.0.0
targets:
  local: {base: {bootstrap: debian-bookworm}}
files:
  - {src: files/motd, dest: /etc/motd, mode: "0644"}
scripts:
  - scripts/first.sh
  - scripts/last.sh
"""


@pytest.fixture(scope="module")
def machines(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalCloud, object]:
    """A container cloud with a layer cache of its own, and the (user-cached) bootstrap base."""
    base = LocalCloud().resolve_base(Spec(bootstrap="debian-bookworm"), "debian")
    home = tmp_path_factory.mktemp("layers")
    cloud = LocalCloud(state_dir=home / "state", images_dir=home / "images", cache_dir=home / "cache",
                       build_in="container")  # fmt: skip
    return cloud, base


def write_recipe(directory: Path, last: str = "echo one > /etc/last-mark", first: str = "echo first > /opt/first"):
    """A recipe of three steps; the motd names its directory, so that each test's chain of layers is its own."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "files").mkdir(exist_ok=True)
    (directory / "scripts").mkdir(exist_ok=True)
    (directory / "files/motd").write_text(f"built with layers in {directory}\n")
    (directory / "scripts/first.sh").write_text(f"#!/bin/sh\nset -e\n{first}\n")
    (directory / "scripts/last.sh").write_text(f"#!/bin/sh\nset -e\n{last}\n")
    (directory / "recipe.yaml").write_text(RECIPE)
    return directory / "recipe.yaml"


def new_plan(cloud: LocalCloud, base, recipe_path: Path, *, use_cache: bool = True) -> BuildPlan:  # noqa: ANN001
    recipe = load_recipe(recipe_path)
    git = gitinfo.capture(recipe.path, recipe.referenced_files())
    version = store.record_recipe_version(name=recipe.name, version=recipe.version, fingerprint=recipe.fingerprint(),
                                          recipe_json="{}", git=git)  # fmt: skip
    build_id = store.start_build(recipe_version_id=version, target="local", cloud="local", trigger="test")
    return BuildPlan(build_id=build_id, recipe=recipe, target_name="local", git=git, recipe_version_id=version,
                     cloud=cloud, base_digest=base.digest, use_cache=use_cache)  # fmt: skip


class Built:
    """One customize stage on a fresh build container; its root stays readable until close()."""

    def __init__(self, cloud: LocalCloud, base, recipe: Path, *, use_cache: bool = True) -> None:  # noqa: ANN001
        self.cloud, self.plan = cloud, new_plan(cloud, base, recipe, use_cache=use_cache)
        instance = cloud.launch(base, KeyPair.generate("t"), "", TAGS, [22], role="build")
        self.guest = Guest(instance=instance, key=KeyPair.generate("t"), role="build")
        self.guest.session = cloud.open_session(instance, timeout=120, log=lambda line: None)
        self.root = Path(instance.details["root"])
        self.error: BaseException | None = None
        try:
            with disable_run_logger():
                customize.fn(self.plan, self.guest)
        except CustomizeError as exc:
            self.error = exc

    @property
    def log(self) -> str:
        return next(s.log for s in lineage.get_build(self.plan.build_id).steps if s.stage == "customize")

    @property
    def chain(self) -> list[dict]:
        return json.loads(lineage.get_build(self.plan.build_id).build.layers_json)

    def digests(self) -> dict[str, str]:
        digests, _ = tree_digests(self.root, ("var/log/*", "var/lib/systemd/*", "etc/machine-id", "tmp/*",
                                              "var/tmp/*", "var/cache/*", "run/*"))  # fmt: skip
        return digests

    def close(self) -> None:
        self.cloud.terminate(self.guest.instance)


@pytest.fixture
def built(machines) -> Iterator[list[Built]]:  # noqa: ANN001
    made: list[Built] = []
    yield made
    errors = []
    for build in made:
        try:
            build.close()
        except Exception as exc:  # close every container, then fail
            errors.append(exc)
    assert errors == []


def build(machines, built, recipe: Path, **options) -> Built:  # noqa: ANN001, ANN003
    cloud, base = machines
    made = Built(cloud, base, recipe, **options)
    built.append(made)
    return made


def test_changing_the_last_script_reruns_only_it_and_no_change_reuses_every_layer(machines, built, tmp_path):
    recipe = write_recipe(tmp_path / "r")
    first = build(machines, built, recipe)
    assert first.error is None and [layer["reused_from"] for layer in first.chain] == [None, None, None]
    assert "cached 0/3" not in first.log and "kept as layer" in first.log

    (tmp_path / "r/scripts/last.sh").write_text("#!/bin/sh\nset -e\necho two > /etc/last-mark\n")
    second = build(machines, built, recipe)

    assert [layer["reused_from"] for layer in second.chain] == [first.plan.build_id, first.plan.build_id, None]
    assert f"reused layer {first.chain[1]['key'][:12]} made by build {first.plan.build_id[:8]}" in second.log
    assert "resumed after layer" in second.log and "script scripts/first.sh\n" not in second.log
    assert (second.root / "etc/last-mark").read_text() == "two\n"
    assert (second.root / "opt/first").read_text() == "first\n" and (second.root / "etc/motd").is_file()

    third = build(machines, built, recipe)
    assert [layer["reused_from"] for layer in third.chain] == [first.plan.build_id, first.plan.build_id,
                                                             second.plan.build_id]
    assert "kept as layer" not in third.log and "cached" not in third.log.split("reused layer")[-1]


def test_a_failed_build_resumes_at_the_failed_step_and_ends_as_a_build_without_cache(machines, built, tmp_path):
    recipe = write_recipe(tmp_path / "r", last="echo broken >&2; exit 9")
    failed = build(machines, built, recipe)
    assert isinstance(failed.error, CustomizeError) and "exit code 9" in str(failed.error)
    assert [layer["step"] for layer in failed.chain] == ["file files/motd -> /etc/motd", "script scripts/first.sh"]

    (tmp_path / "r/scripts/last.sh").write_text("#!/bin/sh\nset -e\necho fixed > /etc/last-mark\n")
    resumed = build(machines, built, recipe)
    fresh = build(machines, built, recipe, use_cache=False)

    assert [layer["reused_from"] for layer in resumed.chain] == [failed.plan.build_id, failed.plan.build_id, None]
    assert "layer cache: off" in fresh.log and all(layer["reused_from"] is None for layer in fresh.chain)
    comparison = compare_digests(fresh.digests(), resumed.digests())
    assert comparison.changed == [] and comparison.only_original == [] and comparison.only_rebuild == []


def test_a_truncated_layer_is_made_again_and_two_builds_at_once_share_one(machines, built, tmp_path):
    cloud, base = machines
    recipe = write_recipe(tmp_path / "r", first="echo concurrent > /opt/first")
    plan = new_plan(cloud, base, recipe)
    first_key = layer_keys(plan.base_digest, steps_of(plan))[0]
    results: list[Built] = []
    threads = [threading.Thread(target=lambda: results.append(Built(cloud, base, recipe))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    built.extend(results)
    assert [r.error for r in results] == [None, None]
    assert all((r.root / "opt/first").read_text() == "concurrent\n" for r in results)

    tar = cloud.cache_dir / "layers" / f"{first_key}.tar"
    with open(tar, "r+b") as layer:
        layer.truncate(tar.stat().st_size // 2)
    again = build(machines, built, recipe)
    assert again.error is None and again.chain[0]["reused_from"] is None, "a corrupt first layer is not reused"
    assert LayerCache(cloud.cache_dir / "layers").get(first_key) is not None, "and it is made again"


def test_a_step_diff_names_changed_and_removed_paths_once(tmp_path):
    root = tmp_path / "root"
    (root / "keep").mkdir(parents=True)
    (root / "gone/deep").mkdir(parents=True)
    (root / "keep/same").write_text("1")
    (root / "keep/edited").write_text("1")
    (root / "typechange").write_text("file")
    before = manifest(root)
    (root / "keep/edited").write_text("2")
    (root / "gone/deep").rmdir()
    (root / "gone").rmdir()
    (root / "typechange").unlink()
    (root / "typechange").mkdir()
    (root / "keep/new").write_text("3")
    changed, removed = diff(before, manifest(root))
    assert changed == ["keep", "keep/edited", "keep/new", "typechange"]
    assert removed == ["gone", "typechange"]


def test_prune_removes_the_least_recently_used_until_the_cache_fits(tmp_path):
    cache = LayerCache(tmp_path / "layers")
    root = tmp_path / "root"
    root.mkdir()
    layers = []
    for index in range(3):
        before = manifest(root)
        (root / f"f{index}").write_bytes(os.urandom(200_000))
        layers.append(cache.keep(f"{index:064x}", root, before, step=f"step {index}", build_id="b" * 32, parent=""))
    old = (dt.datetime.now(dt.UTC) - dt.timedelta(days=40)).isoformat(timespec="seconds")
    for layer, used in zip(layers, [old, "2999-01-01T00:00:00+00:00", "2998-01-01T00:00:00+00:00"], strict=True):
        layer.last_used = used
        (cache.root / f"{layer.key}.json").write_text(json.dumps(layer.to_dict()))
    assert oct(cache.root.stat().st_mode & 0o777) == "0o700"

    assert [g.step for g in cache.prune(older_than=dt.timedelta(days=30))] == ["step 0"]
    assert [g.step for g in cache.prune(max_size=layers[1].size)] == ["step 2"]
    assert [layer.step for layer in cache.list()] == ["step 1"]
    assert [g.step for g in cache.prune(max_size=0)] == ["step 1"] and cache.list() == []
