"""The stage machinery without VMs: StepRun rows, the ledger discipline, sanitize's registry, user-data, nightly."""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from prefect.logging import disable_run_logger

from clouds.base import BaseImage, KeyPair, Resource
from clouds.ssh import CommandFailed, RunResult
from core.recipe import SANITIZE_OPERATIONS, load_recipe
from core.settings import KILN_VERSION
from flows.nightly import decide
from provenance import gitinfo, lineage, store
from tasks.common import BuildPlan, StageError, ledgered, release_open, stage
from tasks.fetch_base import fetch_base
from tasks.launch import user_data
from tasks.sanitize import REGISTRY, Operation, operations, run_operations, sanitize_script

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RecordingCloud:
    """Only what the ledger needs of a cloud: it remembers what it was asked to release."""

    name: str = "local"
    released: list[Resource] = field(default_factory=list)

    def release(self, resource: Resource) -> None:
        self.released.append(resource)


def new_plan(cloud=None, recipe_path: Path = REPO / "recipes/hello.yaml") -> BuildPlan:
    recipe = load_recipe(recipe_path)
    git = gitinfo.capture(recipe.path, recipe.referenced_files())
    version_id = store.record_recipe_version(
        name=recipe.name, version=recipe.version, fingerprint=recipe.fingerprint(), recipe_json="{}", git=git
    )
    build_id = store.start_build(recipe_version_id=version_id, target="local", cloud="local", trigger="test")
    return BuildPlan(build_id=build_id, recipe=recipe, target_name="local", git=git,
                     recipe_version_id=version_id, cloud=cloud or RecordingCloud())


@stage("customize")
def _failing_stage(plan: BuildPlan, *, step_log) -> None:
    step_log("first line of output")
    raise RuntimeError("script setup.sh failed with exit code 7")


@stage("sanitize")
def _good_stage(plan: BuildPlan, value: int, *, step_log) -> int:
    step_log(f"value {value}")
    return value * 2


def test_a_stage_records_its_step_run_with_log_and_status():
    plan = new_plan()
    with disable_run_logger():
        assert _good_stage.fn(plan, 21) == 42
        with pytest.raises(RuntimeError, match="exit code 7"):
            _failing_stage.fn(plan)
    steps = lineage.get_build(plan.build_id).steps
    assert [(s.stage, s.status) for s in steps] == [("sanitize", "succeeded"), ("customize", "failed")]
    assert "value 21" in steps[0].log and "first line of output" in steps[1].log
    assert "exit code 7" in steps[1].error
    assert lineage.get_build(plan.build_id).build.stage == "customize"


def test_stage_log_redacts_a_private_key_before_it_reaches_the_database():
    plan = new_plan()
    key = KeyPair.generate("leak-test")

    @stage("customize")
    def leaky(plan: BuildPlan, *, step_log) -> None:
        for line in key.private_key.splitlines():
            step_log(line)

    with disable_run_logger():
        leaky.fn(plan)
    log = lineage.get_build(plan.build_id).steps[0].log
    body = key.private_key.splitlines()[1]
    assert body not in log


def test_a_stage_failing_with_a_secret_raises_only_the_redacted_text():
    plan = new_plan()
    key = KeyPair.generate("leak-test")
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

    @stage("customize")
    def leaky(plan: BuildPlan, *, step_log) -> None:
        try:
            raise CommandFailed("script leak.sh", 3, f"{key.private_key}aws_secret_access_key = {secret}")
        except CommandFailed as exc:
            raise RuntimeError(f"script leak.sh failed; last lines:\n{exc.tail}") from exc

    with disable_run_logger(), pytest.raises(StageError) as raised:
        leaky.fn(plan)
    body = key.private_key.splitlines()[1]
    assert raised.value.__cause__ is None and raised.value.__context__ is None
    assert "script leak.sh failed" in str(raised.value) and "[REDACTED PRIVATE KEY]" in str(raised.value)
    assert body not in str(raised.value) and secret not in str(raised.value)
    error = lineage.get_build(plan.build_id).steps[0].error
    assert error == str(raised.value)


def test_ledger_row_is_written_before_the_call_and_released_when_the_body_fails():
    cloud = RecordingCloud()
    plan = new_plan(cloud)
    with pytest.raises(OSError), ledgered(plan, kind="instance", name="vm") as created:
        [row] = store.open_resources(plan.build_id)  # the intent exists before anything is created
        assert row.cloud_id is None
        created("i-0123456789ab")
        raise OSError("boot disk vanished")
    assert [r.resource_id for r in cloud.released] == ["i-0123456789ab"]
    assert store.open_resources(plan.build_id) == []


def test_release_open_undoes_newest_first_and_keeps_other_roles():
    cloud = RecordingCloud()
    plan = new_plan(cloud)
    made = [("keypair", "k-1", "build"), ("instance", "i-1", "build"), ("image", "img-1", "image")]
    for kind, cloud_id, role in made:
        with ledgered(plan, kind=kind, name=cloud_id, role=role) as created:
            created(cloud_id)
    assert release_open(plan, role="build") == []
    assert [r.resource_id for r in cloud.released] == ["i-1", "k-1"]
    assert [r.cloud_id for r in store.open_resources(plan.build_id)] == ["img-1"]


def test_sanitize_registry_is_the_recipe_vocabulary_each_documented():
    assert tuple(op.name for op in REGISTRY) == SANITIZE_OPERATIONS
    assert all(op.heading and op.description for op in REGISTRY)
    assert [op.name for op in operations(["machine-id", "ssh-hostkeys"])] == ["machine-id", "ssh-hostkeys"]
    assert "debian" in next(op for op in REGISTRY if op.name == "ssh-userdir").script("debian")


class LocalShellSession:
    """A GuestSession stand-in running each command with sh on this machine; counts the round trips."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def run(self, command: str, *, check: bool = True, **_: object) -> RunResult:
        import subprocess

        self.commands.append(command)
        done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=False)
        return RunResult(done.returncode, done.stdout, done.stderr, 0.0)


def _op(name: str, script: str) -> Operation:
    return Operation(name, name, name, lambda user: script)


def test_sanitize_runs_every_operation_in_one_command_and_logs_what_each_removed(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).write_text("x")
    ops = [
        _op("first", f"for f in {tmp_path}/a {tmp_path}/b; do echo $f; rm $f; done"),
        _op("quiet", "true  # nothing to remove, and a comment at the end"),
        _op("last", f"echo {tmp_path}/c; rm {tmp_path}/c"),
    ]
    session, lines = LocalShellSession(), []
    out = run_operations(session, ops, "debian", lines.append)
    assert len(session.commands) == 1
    took = [re.sub(r", \d+\.\ds\)$", ")", line) for line in lines]  # each operation's time on the guest
    assert took == [
        f"first: {tmp_path}/a", f"first: {tmp_path}/b", "first: done (2 removed)",
        "quiet: done (0 removed)",
        f"last: {tmp_path}/c", "last: done (1 removed)",
    ]
    assert all(re.search(r"\d\.\ds\)$", line) for line in lines if "done" in line)
    assert list(tmp_path.iterdir()) == [] and "machine-id" in out.facts
    assert sanitize_script(ops, "debian").rstrip().endswith("sync")


def test_a_failing_sanitize_operation_stops_the_rest_and_is_named(tmp_path):
    ops = [_op("ok", "echo removed-one"), _op("broken", "echo half; exit 3"), _op("never", f"touch {tmp_path}/ran")]
    lines: list[str] = []
    with pytest.raises(CommandFailed) as failed:
        run_operations(LocalShellSession(), ops, "debian", lines.append)
    assert failed.value.exit_code == 3 and "broken" in str(failed.value)
    assert [re.sub(r", \d+\.\ds\)$", ")", line) for line in lines] == [
        "ok: removed-one", "ok: done (1 removed)", "broken: half"
    ]
    assert not (tmp_path / "ran").exists()


def test_user_data_creates_the_ssh_user_with_only_the_public_key():
    key = KeyPair.generate("ud")
    text = user_data("debian", key)
    assert text.startswith("#cloud-config\n")
    config = yaml.safe_load(text)
    [user] = config["users"]
    assert user["name"] == "debian" and user["ssh_authorized_keys"] == [key.public_key]
    assert config["ssh_pwauth"] is False and "PRIVATE" not in text


def _record_good_build(plan: BuildPlan, base_digest: str) -> None:
    base = store.record_image(cloud="local", image_id="/cache/base.qcow2", sha256=base_digest, kind="base")
    store.record_image(cloud="local", image_id=f"img-{plan.short_id}abcd", build_id=plan.build_id, parent_id=base,
                       sha256="b" * 64)
    store.finish_build(plan.build_id, "succeeded")


def test_nightly_skips_what_is_up_to_date_and_rebuilds_what_changed():
    plan = new_plan()
    _record_good_build(plan, "sha256:" + "1" * 64)
    recipe = plan.recipe

    same = decide(recipe, "local", "sha256:" + "1" * 64)
    assert same.action == "skip" and plan.short_id in same.reason
    assert decide(recipe, "local", "sha256:" + "2" * 64).action == "rebuild"  # the base moved
    assert decide(recipe, "local", "sha256:" + "1" * 64, kiln_version=KILN_VERSION + ".1").action == "rebuild"
    assert decide(recipe, "other-target", "sha256:" + "1" * 64).action == "rebuild"


def test_nightly_renews_an_image_whose_validity_ends_within_the_margin_and_says_why():
    plan, digest = new_plan(), "sha256:" + "4" * 64
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    base = store.record_image(cloud="local", image_id="/cache/base-4.qcow2", sha256=digest, kind="base")
    image = f"img-{plan.short_id}eeee"
    row = store.record_image(cloud="local", image_id=image, build_id=plan.build_id, parent_id=base,
                             valid_until=now + dt.timedelta(days=3))  # fmt: skip
    store.finish_build(plan.build_id, "succeeded")

    soon = decide(plan.recipe, "local", digest, margin=dt.timedelta(days=7), now=now)
    assert (soon.action, soon.reason) == (
        "rebuild", f"image {image} (build {plan.short_id}) expires {(now + dt.timedelta(days=3)).isoformat()}, "
        "within the 7-day margin: renewed by a new build")  # fmt: skip
    assert decide(plan.recipe, "local", digest, margin=dt.timedelta(days=1), now=now).action == "skip"

    later = now + dt.timedelta(days=4)
    assert row in [expired.row_id for expired in store.mark_expired_images(later)]
    assert lineage.image_status(row) == "expired"  # not revoked: still usable, no longer up to date
    gone = decide(plan.recipe, "local", digest, margin=dt.timedelta(days=1), now=later)
    assert gone.action == "rebuild" and f"{image} (build {plan.short_id}) expired " in gone.reason


def test_a_build_from_an_expired_base_is_warned_not_refused():
    @dataclass
    class KilnImageCloud(RecordingCloud):
        def resolve_base(self, spec, ssh_user):  # noqa: ANN001, ANN202 - the Cloud protocol
            return BaseImage(cloud="local", image_id="/images/img-0ldba5e00001/old.qcow2", digest="f" * 64,
                             ssh_user=ssh_user, details={"kiln_image_id": "img-0ldba5e00001"},
                             stable_id="img-0ldba5e00001")  # fmt: skip

    plan = new_plan(cloud=KilnImageCloud())
    yesterday = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    row = store.record_image(cloud="local", image_id="img-0ldba5e00001", sha256="f" * 64, build_id=plan.build_id,
                             valid_until=yesterday)  # fmt: skip

    with disable_run_logger():
        resolved = fetch_base.fn(plan)

    assert resolved.row_id == row and lineage.image_status(row) == "expired"
    [step] = lineage.get_build(plan.build_id).steps
    assert step.status == "succeeded"
    assert f"warning: base img-0ldba5e00001 expired on {yesterday.replace(microsecond=0).isoformat()}" in step.log


def test_nightly_rebuilds_when_the_only_build_failed(tmp_path):
    plan = new_plan(recipe_path=REPO / "recipes/dstat.yaml")
    store.finish_build(plan.build_id, "failed", error="boom")
    assert decide(plan.recipe, "local", "sha256:" + "3" * 64).action == "rebuild"
    assert json.loads(json.dumps(decide(plan.recipe, "local", "x").__dict__))["action"] == "rebuild"


def test_the_boot_wait_reads_the_console_often_but_the_ledger_at_most_every_few_seconds(monkeypatch) -> None:
    from clouds.base import CloudError, Instance
    from tasks import wait_boot

    @dataclass
    class ConsoleCloud(RecordingCloud):
        reads: int = 0

        def console(self, instance) -> str:  # noqa: ANN001
            self.reads += 1
            return "booting"

    plan = new_plan(ConsoleCloud())
    row = store.ledger_intent(plan.build_id, cloud="local", kind="instance", name="build")
    store.ledger_created(row, "i-0123456789ab")
    instance = Instance(cloud="local", instance_id="i-0123456789ab", name="build", ssh_user="debian")
    queries = []
    real_open_resources = store.open_resources
    monkeypatch.setattr(store, "open_resources", lambda b: queries.append(b) or real_open_resources(b))
    clock = [1000.0]
    monkeypatch.setattr(wait_boot.time, "monotonic", lambda: clock[0])
    console = wait_boot.held_console(plan, instance)

    for _ in range(9):  # 4 s of reads every 0.5 s
        assert console() == "booting"
        clock[0] += 0.5
    assert (plan.cloud.reads, len(queries)) == (9, 1)

    store.ledger_released(row)  # Ctrl-C released it: the next ledger check ends the wait
    clock[0] += wait_boot.LEDGER_CHECK_SECONDS
    with pytest.raises(CloudError, match="released while waiting"):
        console()


def test_a_failing_script_names_itself_its_exit_code_its_last_lines_and_the_machines_hint():
    from tasks.customize import CustomizeError, _run

    class ContainerLike:
        def run(self, command, **kwargs):  # noqa: ANN001, ANN003, ANN201
            raise CommandFailed("sh", 1, "loading\nmodprobe: FATAL: Module br_netfilter not found",
                                hint="hint: ... build this target with `build_in: vm`")

    with pytest.raises(CustomizeError) as failed:
        _run(ContainerLike(), "sh /tmp/kiln-script-0", "script scripts/net.sh", lambda line: None, 60)
    message = str(failed.value)
    assert message.startswith("script scripts/net.sh failed with exit code 1; last lines:")
    assert "modprobe: FATAL" in message and message.endswith("build this target with `build_in: vm`")
