"""Hands on the build (issue 22), on the local cloud in build containers: a paused build someone changes through
`kiln shell`, resumed by `kiln resume`, is marked interactive everywhere provenance speaks; `--on-error ask` in a
real terminal (a pseudo-terminal) retries a fixed script, keeps everything on abort, releases everything on
cleanup; a pause nobody resumes gives up and leaves nothing."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from core import settings
from flows.audit import audit_subject, interactive_warning
from operations.audit import compare_packages
from provenance import attest, lineage, store
from tests.conftest import REPO
from tests.flows.conftest import KILN, HelloBuild, committed_recipe, run_kiln, service_recipe, with_build_in
from tests.flows.test_build_local import STAGES, assert_nothing_left, container_traces

BY_HAND = "changed by hand"
HELLO = with_build_in((REPO / "recipes/hello.yaml").read_text(), "container")
HELLO_SCRIPT = (REPO / "recipes/scripts/hello.sh").read_text()
FAILING = "#!/bin/sh\necho 'step one is not written yet' >&2\nexit 3\n"
FIXED = "#!/bin/sh\necho fixed > /etc/kiln-fixed\n"


# A probe proving the image holds a file only a person can have written (kiln shell).
BY_HAND_PROBE = f"  - command: {{run: cat /etc/kiln-by-hand, expect: {BY_HAND}}}\n"


def hand_recipe(tmp_path: Path) -> Path:
    """hello, whose verify also reads the file written by hand."""
    return committed_recipe(tmp_path, HELLO + BY_HAND_PROBE, {"scripts/hello.sh": HELLO_SCRIPT})


def failing_recipe(tmp_path: Path) -> Path:
    """A container build whose one script fails until someone fixes it."""
    recipe = HELLO.replace("  - scripts/hello.sh\n", "  - scripts/step.sh\n")
    return committed_recipe(tmp_path, recipe, {"scripts/step.sh": FAILING})


def paused_build(timeout: float = 300) -> str:
    """The id of the build that pauses (the only running one of this test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        paused = [s.build.id for s in lineage.list_builds(status="running") if s.build.paused_before]
        if paused:
            return paused[0]
        time.sleep(1)
    raise AssertionError("no build paused")


def test_bad_pause_requests_fail_before_anything_launches(tmp_path) -> None:
    recipe = hand_recipe(tmp_path)
    before = {summary.build.id for summary in lineage.list_builds(recipe="hello", limit=10_000)}
    for args, field in ((["--pause-before", "verify"], "--pause-before"),
                        (["--pause-before", "--require-clean"], "--pause-before"),
                        (["--pause-before", "--pause-timeout", "soon"], "--pause-timeout")):  # fmt: skip
        result = run_kiln("build", str(recipe), *args)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and field in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    after = {summary.build.id for summary in lineage.list_builds(recipe="hello", limit=10_000)}
    assert after == before, "no build was started (the session's other tests leave hello builds of their own)"


@pytest.mark.vm  # the suite's one vm-mode build: two TCG boots (the build guest, verify's)
@pytest.mark.timeout(3600)
def test_a_paused_build_changed_through_kiln_shell_is_resumed_and_marked_interactive(
    hello_build: HelloBuild, tmp_path, prefect_api
) -> None:
    """The service recipe built in a VM (build_in: vm), paused before sanitize, changed over SSH by `kiln shell`
    (the build key, the host key pinned at boot), resumed by `kiln resume`: the image holds the change (verify's
    probe reads it in the VM boot of the image), the record says interactive everywhere, and its packages are
    those of the same recipe built in a container (the session's build)."""
    key = tmp_path / "keys" / "kiln.key"
    attest.generate_key(key)
    recipe = service_recipe(tmp_path, build_in="vm", more_verify=BY_HAND_PROBE)
    build = subprocess.Popen([str(KILN), "build", str(recipe), "--target", "local", "--pause-before", "--json"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=os.environ | {attest.KEY_ENV: str(key)})  # fmt: skip
    try:
        build_id = paused_build(timeout=1200)
        status = json.loads(run_kiln("status", "--json").stdout)
        assert [row["stage"] for row in status if row["build_id"] == build_id] == ["paused before sanitize"]
        assert re.search(r"kiln-vms-local\s+\d+\s+\d+\s+1\s", run_kiln("limits", "list").stdout)

        shell = run_kiln("shell", build_id, "-c", f"echo {BY_HAND} > /etc/kiln-by-hand && cat /etc/kiln-by-hand")
        assert shell.returncode == 0, shell.stderr
        assert BY_HAND in shell.stdout
        assert (settings.data_dir() / "shell" / build_id).is_dir(), "the key and pinned host key, while paused"
        assert run_kiln("resume", build_id).returncode == 0
        out, err = build.communicate(timeout=1800)
    finally:
        if build.poll() is None:
            build.terminate()
            build.wait(timeout=120)
    assert build.returncode == 0, out + err
    [outcome] = json.loads(out)  # its verify probe read the file from the image, booted as a VM

    shown = run_kiln("show", build_id)
    assert "interactive" in shown.stdout and "not reproducible from its recipe alone" in shown.stdout
    assert f"$ echo {BY_HAND} > /etc/kiln-by-hand" in shown.stdout and f"\n{BY_HAND}\n" in shown.stdout
    detail = json.loads(run_kiln("show", build_id, "--json").stdout)
    assert detail["interactive"] is True and detail["paused_before"] is None
    assert [step["stage"] for step in detail["steps"]].count("shell") == 1
    assert [(s["stage"], s["status"]) for s in detail["steps"] if s["stage"] in STAGES] == [
        (stage, "succeeded") for stage in STAGES]  # fmt: skip
    assert detail["parameters"]["build_in"] == "vm"
    logs = {s["stage"]: s["log"] for s in detail["steps"]}
    assert "SSH up, host key" in logs["wait_boot"] and "lighttpd answered during customize" in logs["customize"]
    assert "ssh-hostkeys: /etc/ssh/ssh_host_ed25519_key\n" in logs["sanitize"]  # cloud-init made them at boot
    # The vm path's snapshot: the guest shut itself down, and its disk, booted on its own, served the change.
    assert "guest powering off" in logs["snapshot"] and "(guest powered itself off)" in logs["snapshot"]
    assert "SSH up, host key" in logs["verify"]
    probes = {p["name"]: p["passed"] for p in detail["probes"]}
    assert probes["http :80/index.html"] is True and probes["command cat /etc/kiln-by-hand"] is True

    found = json.loads(run_kiln("lineage", outcome["image_id"], "--format", "json").stdout)
    assert found["build"]["interactive"] is True and found["build"]["reproducible_from_recipe"] is False
    image = lineage.resolve_image(outcome["image_id"])
    envelope = json.loads((Path(image.path).parent / f"{image.image_id}.intoto.json").read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    internal = statement["predicate"]["buildDefinition"]["internalParameters"]
    assert internal["interactive"] is True and internal["reproducibleFromRecipe"] is False
    assert any(b["name"] == "shell-session:1" for b in statement["predicate"]["runDetails"]["byproducts"])
    assert "not reproducible from its recipe alone" in interactive_warning(audit_subject(outcome["image_id"]))

    in_vm, in_container = (lineage.resolve_image(i) for i in (outcome["image_id"], hello_build.image_id))
    diff = compare_packages(lineage.packages_of(in_container.id), lineage.packages_of(in_vm.id))
    assert diff.identical, diff.to_dict()
    assert len(lineage.packages_of(in_vm.id)) > 150
    assert not (settings.data_dir() / "shell" / build_id).exists()
    assert_nothing_left(build_id)


class Terminal:
    """`kiln build` on a pseudo-terminal: what a person sees, and what they type."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen([str(KILN), *args], stdin=slave, stdout=slave, stderr=slave,
                                        env=os.environ | {"COLUMNS": "200", "TERM": "xterm"}, start_new_session=True)
        os.close(slave)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.seen):
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {pattern!r} on the terminal; it shows:\n{self.seen[-3000:]}")
            try:
                self.seen += os.read(self.master, 65536).decode(errors="replace")
            except OSError:  # the process ended
                raise AssertionError(f"no {pattern!r} before kiln ended:\n{self.seen[-3000:]}") from None

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        """A test that failed half-way: Ctrl-C (the build releases what it holds), then kill, then `kiln gc`."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
                run_kiln("gc")
        with contextlib.suppress(OSError):
            os.close(self.master)

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def finish(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 1)
            if ready:
                try:
                    self.seen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:
                    break
        return self.process.wait(timeout=max(1.0, deadline - time.monotonic()))


QUESTION = r"\[local\] what now.{0,20}\[retry/abort/cleanup\]"


def test_ask_retries_the_fixed_script_and_a_pause_nobody_resumes_gives_up_leaving_nothing(tmp_path, prefect_api):
    recipe = failing_recipe(tmp_path)
    with Terminal("build", str(recipe), "--on-error", "ask", "--pause-before", "--pause-timeout", "5") as terminal:
        terminal.expect(QUESTION)
        assert "step one is not written yet" in terminal.seen
        (recipe.parent / "scripts/step.sh").write_text(FIXED)  # the person fixes the script, then says retry
        terminal.type("retry\n")
        terminal.expect(r"paused before sanitize")
        assert terminal.finish() == 1, terminal.seen
    [summary] = lineage.list_builds(recipe="hello", limit=1)
    detail = lineage.get_build(summary.build.id)
    customize = [step.status for step in detail.steps if step.stage == "customize"]
    assert customize == ["failed", "succeeded"], "the retried script succeeded"
    assert detail.recipe.dirty, "the build is recorded as made from the fixed (uncommitted) recipe"
    assert detail.build.status == "failed" and "nobody resumed it" in detail.build.error
    assert not detail.build.interactive
    assert_nothing_left(summary.build.id)


def test_ask_abort_keeps_the_container_and_says_how_to_reach_it(tmp_path, prefect_api):
    with Terminal("build", str(failing_recipe(tmp_path)), "--on-error", "ask") as terminal:
        terminal.expect(QUESTION)
        terminal.type("abort\n")
        assert terminal.finish() == 1, terminal.seen
    [summary] = lineage.list_builds(recipe="hello", limit=1)
    build_id = summary.build.id
    assert re.search(r"nsenter --target \d+ --all", terminal.seen), terminal.seen
    assert f"kiln cleanup {build_id}" in terminal.seen
    assert "instance" in [row.kind for row in store.open_resources(build_id)]
    assert container_traces() != [], "the container is kept, running"
    cleanup = run_kiln("cleanup", build_id)
    assert cleanup.returncode == 0, cleanup.stderr
    assert_nothing_left(build_id)


def test_enter_resumes_a_pause_before_customize_and_ask_cleanup_leaves_nothing(tmp_path, prefect_api):
    """Also `kiln shell` into a build container (nsenter): the build is interactive, the transcript in its log."""
    args = ("--on-error", "ask", "--pause-before", "customize")
    with Terminal("build", str(failing_recipe(tmp_path)), *args) as terminal:
        terminal.expect(r"paused before customize")
        shell = run_kiln("shell", paused_build(), "-c", f"echo {BY_HAND} > /etc/kiln-by-hand && cat /etc/kiln-by-hand")
        assert shell.returncode == 0 and BY_HAND in shell.stdout, shell.stdout + shell.stderr
        terminal.type("\n")  # Enter goes on
        terminal.expect(r"resumed by Enter")
        terminal.expect(r"layer cache: off \(the build was paused before customize")
        terminal.expect(QUESTION)
        terminal.type("cleanup\n")
        assert terminal.finish() == 1, terminal.seen
    [summary] = lineage.list_builds(recipe="hello", limit=1)
    assert summary.build.status == "failed" and summary.build.interactive
    [transcript] = [step.log for step in lineage.get_build(summary.build.id).steps if step.stage == "shell"]
    assert f"$ echo {BY_HAND} > /etc/kiln-by-hand" in transcript and f"\n{BY_HAND}\n" in transcript
    assert_nothing_left(summary.build.id)


def test_a_run_a_worker_started_pauses_the_prefect_way_and_goes_on_after_prefects_resume(prefect_api, monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run
    from prefect.runtime import flow_run

    from flows.pause import end_prefect_pause, pause_in_prefect

    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "set-by-a-worker")

    def paused_state(run_id: str) -> bool:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
        return state is not None and state.is_paused()

    def until(condition, timeout: float = 60) -> bool:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.5)
        return condition()

    @flow(name="kiln-pause-probe")
    def pauses_twice() -> list[str]:
        run_id = flow_run.id
        resumed = pause_in_prefect(120)
        assert resumed is not None and until(lambda: paused_state(run_id)), "the UI shows the run paused"
        resume_flow_run(run_id)  # what the UI's Resume does
        outcomes = ["resumed in the UI" if resumed.wait(30) else "still waiting"]
        again = pause_in_prefect(120)
        assert again is not None and until(lambda: paused_state(run_id))
        end_prefect_pause(run_id)  # `kiln resume` (or Enter) ended kiln's pause: Prefect's ends with it
        outcomes.append("running again" if until(lambda: not paused_state(run_id)) else "still paused")
        return outcomes

    assert pauses_twice() == ["resumed in the UI", "running again"]


def test_transcripts_are_text_without_terminal_codes_and_without_secrets() -> None:
    from flows.pause import clean_transcript

    raw = (b"\x1b[?2004hroot@box:/# ls\x08\x08cat /etc/x\r\n\x1b[?2004l\rhello\r\n"
           b"aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\r\n")
    text = clean_transcript(raw)
    assert text.startswith("root@box:/# cat /etc/x\nhello\n")
    assert "wJalrXUtnFEMI" not in text and "\x1b" not in text


def test_pause_before_alone_means_sanitize() -> None:
    from kiln.commands.build import with_default_pause

    assert with_default_pause(["build", "r.yaml", "--pause-before"]) == ["build", "r.yaml", "--pause-before",
                                                                          "sanitize"]
    assert with_default_pause(["build", "--pause-before", "r.yaml"])[:3] == ["build", "--pause-before", "sanitize"]
    assert with_default_pause(["build", "r.yaml", "--pause-before", "--json"])[3] == "sanitize"
    assert with_default_pause(["build", "r.yaml", "--pause-before", "customize"])[3] == "customize"
