"""The stages declared once and the runner's one failure policy (flows/stages.py), without a guest or a Prefect
server: the order and the VM slot from the declaration; a failure releases what the build holds newest first
while the slot is still held, or keeps it with --on-error abort unless the build was cancelled."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

import flows.stages
from clouds.base import Resource
from core.recipe import load_recipe
from flows.stages import STAGE_NAMES, STAGES, Made, Stage, run_stages
from provenance import gitinfo, lineage, store
from tasks.common import BuildPlan, ledgered

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RecordingCloud:
    name: str = "local"
    region: str = ""
    events: list[str] = field(default_factory=list)

    def release(self, resource: Resource) -> None:
        self.events.append(f"release {resource.kind} {resource.resource_id}")


def plan_on(cloud: RecordingCloud, on_error: str = "cleanup") -> BuildPlan:
    recipe = load_recipe(REPO / "recipes/hello.yaml")
    git = gitinfo.capture(recipe.path, recipe.referenced_files())
    version = store.record_recipe_version(name=recipe.name, version=recipe.version, fingerprint=recipe.fingerprint(),
                                          recipe_json=json.dumps(recipe.model_dump(mode="json"), sort_keys=True),
                                          git=git)  # fmt: skip
    build_id = store.start_build(recipe_version_id=version, target="local", cloud="local", trigger="test")
    return BuildPlan(build_id=build_id, recipe=recipe, target_name="local", git=git, recipe_version_id=version,
                     cloud=cloud, on_error=on_error)  # fmt: skip


@pytest.fixture
def slots(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The VM slot as the runner takes it, recorded into the cloud's events instead of asking Prefect."""

    @contextmanager
    def vm_slot(name: str):  # noqa: ANN202
        cloud_events.append(f"slot {name}")
        try:
            yield
        finally:
            cloud_events.append("slot released")

    cloud_events: list[str] = []
    monkeypatch.setattr(flows.stages, "vm_slot", vm_slot)
    return cloud_events


def stages_that(cloud: RecordingCloud, fail_at: str | None = None, error: BaseException | None = None) -> list[Stage]:
    """Four stages (the VM held over the middle two); the one named fail_at ledgers an instance, then raises."""

    def step(name: str):  # noqa: ANN202
        def run(plan: BuildPlan, made: Made) -> None:
            cloud.events.append(f"run {name}")
            if name == fail_at:
                with ledgered(plan, kind="instance", name=name) as created:
                    created(f"i-{name}")
                raise error or RuntimeError(f"{name} failed")

        return run

    holds = {"resolve": False, "boot": True, "work": True, "record": False}
    return [Stage(SimpleNamespace(name=name), holds_vm=vm, step=step(name)) for name, vm in holds.items()]


def test_the_eight_stages_are_declared_once_in_order_and_hold_the_vm_from_launch_to_verify() -> None:
    assert STAGE_NAMES == ("fetch_base", "launch", "wait_boot", "customize", "sanitize", "snapshot", "verify",
                           "register")  # fmt: skip
    assert [stage.name for stage in STAGES if stage.holds_vm] == list(STAGE_NAMES[1:7])


def test_the_runner_runs_the_stages_in_order_holding_one_slot_over_those_that_hold_a_vm(slots: list[str]) -> None:
    cloud = RecordingCloud(events=slots)

    run_stages(plan_on(cloud), stages_that(cloud))

    assert slots == ["run resolve", "slot kiln-vms-local", "run boot", "run work", "slot released", "run record"]


def test_a_failure_releases_what_the_build_holds_before_the_slot_and_records_it_failed(slots: list[str]) -> None:
    cloud = RecordingCloud(events=slots)
    plan = plan_on(cloud)

    with pytest.raises(RuntimeError, match="work failed"):
        run_stages(plan, stages_that(cloud, fail_at="work"))

    assert slots[-3:] == ["run work", "release instance i-work", "slot released"]
    build = lineage.get_build(plan.build_id).build
    assert (build.status, build.error) == ("failed", "work failed")
    assert store.open_resources(plan.build_id) == []


def test_on_error_abort_keeps_a_failed_build_but_not_a_cancelled_one(slots: list[str]) -> None:
    kept_cloud, cancelled_cloud = RecordingCloud(events=slots), RecordingCloud(events=slots)
    kept, cancelled = plan_on(kept_cloud, on_error="abort"), plan_on(cancelled_cloud, on_error="abort")

    with pytest.raises(RuntimeError):
        run_stages(kept, stages_that(kept_cloud, fail_at="boot"))
    with pytest.raises(KeyboardInterrupt):
        run_stages(cancelled, stages_that(cancelled_cloud, fail_at="boot", error=KeyboardInterrupt()))

    assert [row.cloud_id for row in store.open_resources(kept.build_id)] == ["i-boot"]
    assert lineage.get_build(kept.build_id).build.status == "failed"
    assert store.open_resources(cancelled.build_id) == []
    assert lineage.get_build(cancelled.build_id).build.status == "cancelled"
    assert slots.count("release instance i-boot") == 1
    store.ledger_released(store.open_resources(kept.build_id)[0].id)
