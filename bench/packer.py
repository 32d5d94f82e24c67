"""kiln vs Packer 1.6.6's qemu builder, on the same cached bootstrap base, for two workloads:

- provision: bench/packer/provision.sh (files kept, a scratch download removed again);
- packages: recipes/webserver.yaml's packages, page and script (apt-get install apache2 from Debian's mirror),
  with the webserver's verify probes on kiln's side; Packer runs the same as shell provisioners.

Columns: Packer, kiln with build_in: container, kiln with build_in: vm, and the ratios to Packer against issue
18's targets. kiln's container customize stage is also set against the same commands run in a plain chroot on
a working copy of the base. Run: python -m bench.packer [--workload provision|packages|all]
[--modes packer,container,vm] [--prefect ephemeral|server] [--no-packer-zero]."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import yaml

from bench._chroot import ChrootRun, timed_in_chroot
from clouds import qemu
from clouds.base import KeyPair
from clouds.local import LocalCloud
from core import settings
from core.digests import sha256_file

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "bench" / "packer"
RECIPES = ROOT / "recipes"
TEMPLATE = HERE / "debian-bookworm.json"
KILN = Path(sys.executable).with_name("kiln")
USER = "debian"
MODES = ("packer", "container", "vm")
COLUMNS = {"packer": "Packer", "container": "kiln container", "vm": "kiln vm"}
SIZE_TARGET = 0.9
CHROOT_TARGET = 1.3
PACKER_EXECUTE = "chmod +x {{ .Path }}; {{ .Vars }} sudo -E sh -eu '{{ .Path }}'"
# Packer 1.6.6's log: "2026/11/22 06:30:01 ui: ==> qemu: Starting VM, booting disk image"
PACKER_LOG_LINE = re.compile(r"^(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) (.*)$")
PACKER_MILESTONES = {
    "Starting VM": "qemu: Starting VM",
    "Waiting for SSH": "qemu: Waiting for SSH",
    "Connected to SSH": "qemu: Connected to SSH",
    "zero fill": "qemu: Provisioning with shell script: /tmp/packer-shell",  # the template's last provisioner
    "halting": "qemu: Gracefully halting",
}


def packer_shell(script: Path) -> dict[str, str]:
    return {"type": "shell", "script": str(script), "execute_command": PACKER_EXECUTE}


@dataclass(frozen=True)
class Workload:
    """One provisioning three ways: kiln's recipe, Packer's provisioners, and kiln's customize commands as one
    shell command for the plain chroot."""

    name: str
    description: str
    recipe: Path  # its local target is built, with build_in set per column
    packer_provisioners: tuple[dict[str, str], ...]
    chroot_uploads: dict[str, Path]  # path in the image -> file here, copied in before the timed command
    chroot_command: str
    wall_target: float  # kiln container wall (verify included) / Packer wall


WORKLOADS = {
    "provision": Workload(
        name="provision",
        description="bench/packer/provision.sh (kiln: bench/packer/recipe.yaml)",
        recipe=HERE / "recipe.yaml",
        packer_provisioners=(packer_shell(HERE / "provision.sh"),),
        chroot_uploads={"/tmp/provision.sh": HERE / "provision.sh"},
        chroot_command="sh -eu /tmp/provision.sh",
        wall_target=0.8,
    ),
    "packages": Workload(
        name="packages",
        description="recipes/webserver.yaml's apache2, test page and setup.sh (Packer: bench/packer/packages.sh "
        "after uploading the page, then setup.sh)",
        recipe=RECIPES / "webserver.yaml",
        packer_provisioners=(
            {"type": "file", "source": str(RECIPES / "files/test.txt"), "destination": "/tmp/kiln-bench-test.txt"},
            packer_shell(HERE / "packages.sh"),
            packer_shell(RECIPES / "scripts/setup.sh"),
        ),
        chroot_uploads={
            "/tmp/kiln-bench-test.txt": RECIPES / "files/test.txt",
            "/tmp/packages.sh": HERE / "packages.sh",
        },
        # setup.sh less its `systemctl restart`: nothing runs services in a plain chroot
        chroot_command="sh -eu /tmp/packages.sh && systemctl enable apache2",
        wall_target=0.5,
    ),
}


@dataclass
class LoadSampler:
    """The 1-minute load average every few seconds while a build runs (the machine is shared)."""

    every: float = 5.0
    samples: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> LoadSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every):
                return

    def summary(self) -> str:
        if not self.samples:
            return "n/a"
        return f"mean {sum(self.samples) / len(self.samples):.2f}, max {max(self.samples):.2f}"


@dataclass
class Figures:
    """One build's figures: Packer's, or kiln's in one build_in mode."""

    ready_seconds: float
    customize_seconds: float
    wall_seconds: float
    verify_seconds: float  # 0 for Packer, which does not verify
    output_bytes: int
    load: str
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def wall_without_verify(self) -> float:
        return self.wall_seconds - self.verify_seconds


@dataclass
class WorkloadRun:
    """Every column of one workload, the chroot timing, and what failed (a failed column does not hide the rest)."""

    workload: Workload
    figures: dict[str, Figures] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    chroot: ChrootRun | None = None
    chroot_load: str = ""


# ------------------------------------------------------------------------------------------------ the base


def cached_base(accel: str, tmp: Path) -> Path:
    """kiln's debian-bookworm bootstrap base from the cache (built first if the cache lacks it)."""
    cloud = LocalCloud(state_dir=tmp / "state", images_dir=tmp / "images", accel=accel)
    base = cloud.resolve_base(SimpleNamespace(kind="bootstrap", bootstrap="debian-bookworm", packages=None), USER)
    return Path(base.details.get("path") or base.image_id)


def chosen_accel() -> str:
    """What kiln's local cloud picks for accel: auto: KVM only when the probe shows it really runs guest code."""
    return "kvm" if qemu.kvm_works(settings.cache_dir() / "kvm-probe.json") else "tcg"


# -------------------------------------------------------------------------------------------------- Packer


def run_packer(workload: Workload, base: Path, accel: str, zero_free_space: bool, tmp: Path) -> Figures:
    """packer build of the template with the workload's provisioners; its stages from its log's timestamps."""
    log_path, output_dir = tmp / "packer.log", tmp / "output"
    env = {**os.environ, "PACKER_LOG": "1", "PACKER_LOG_PATH": str(log_path), "CHECKPOINT_DISABLE": "1",
           "PACKER_CACHE_DIR": str(tmp / "packer_cache")}  # fmt: skip
    variables = {
        "base": str(base),
        "base_sha256": sha256_file(base),
        "accelerator": accel,
        "seed_dir": str(packer_seed(tmp)),
        "ssh_key": str(tmp / "id_ed25519"),
        "output_dir": str(output_dir),
        "zero_free_space": "true" if zero_free_space else "false",
    }
    command = ["packer", "build", "-color=false"]
    for name, value in variables.items():
        command += ["-var", f"{name}={value}"]
    with LoadSampler() as load:
        started_at, started = time.time(), time.monotonic()
        done = subprocess.run([*command, str(packer_template(workload, tmp))], env=env, capture_output=True,
                              text=True, check=False)  # fmt: skip
        wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"packer build failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    at = packer_events(log_path.read_text(errors="replace"))
    phases = {
        "checksum and copy of the base": at["Starting VM"] - started_at,
        "boot to SSH": at["Connected to SSH"] - at["Starting VM"],
        "provisioners": at["zero fill"] - at["Connected to SSH"],
        "zero fill": at["halting"] - at["zero fill"],
        "shutdown and qcow2 conversion": started_at + wall - at["halting"],
    }
    return Figures(
        ready_seconds=phases["boot to SSH"],
        customize_seconds=phases["provisioners"],
        wall_seconds=wall,
        verify_seconds=0.0,
        output_bytes=(output_dir / "packer-bench.qcow2").stat().st_size,
        load=load.summary(),
        notes={"stages (s, 1 s resolution)": json.dumps({k: round(v) for k, v in phases.items()})},
    )


def packer_seed(tmp: Path) -> Path:
    """A NoCloud seed with the debian user and a fresh key (its private half at tmp/id_ed25519)."""
    key = KeyPair.generate("kiln-bench-packer")
    key_file = tmp / "id_ed25519"
    key_file.write_text(key.private_key)
    key_file.chmod(0o600)
    seed = tmp / "seed"
    seed.mkdir()
    (seed / "user-data").write_text(
        "#cloud-config\nusers:\n"
        f"  - name: {USER}\n    sudo: 'ALL=(ALL) NOPASSWD:ALL'\n    shell: /bin/bash\n"
        f"    lock_passwd: true\n    ssh_authorized_keys: ['{key.public_key}']\n"
    )
    (seed / "meta-data").write_text("instance-id: packer-bench\nlocal-hostname: packer-bench\n")
    return seed


def packer_template(workload: Workload, tmp: Path) -> Path:
    """bench/packer/debian-bookworm.json with the workload's provisioners before its own (the zero fill)."""
    template = json.loads(TEMPLATE.read_text())
    template["provisioners"] = [*workload.packer_provisioners, *template["provisioners"]]
    path = tmp / "template.json"
    path.write_text(json.dumps(template, indent=2))
    return path


def packer_events(log: str) -> dict[str, float]:
    """The first time (epoch seconds, 1 s resolution) Packer's log shows each milestone."""
    seen: dict[str, float] = {}
    for line in log.splitlines():
        match = PACKER_LOG_LINE.match(line)
        if not match:
            continue
        for name, marker in PACKER_MILESTONES.items():
            if name not in seen and marker in match.group(2):
                seen[name] = dt.datetime.strptime(match.group(1), "%Y/%m/%d %H:%M:%S").timestamp()
    missing = [name for name in PACKER_MILESTONES if name not in seen]
    if missing:
        raise RuntimeError(f"Packer's log lacks {missing}")
    return seen


# ---------------------------------------------------------------------------------------------------- kiln


def kiln_recipe(workload: Workload, build_in: str, directory: Path) -> Path:
    """A copy of the workload's recipe directory whose recipe has only its local target, built in build_in on a
    guest sized like Packer's (1 GiB, 2 CPUs), with one output, the qcow2 (what Packer writes)."""
    shutil.copytree(workload.recipe.parent, directory)
    recipe = yaml.safe_load(workload.recipe.read_text())
    local = {**recipe["targets"]["local"], "build_in": build_in, "memory_mb": 1024, "cpus": 2, "accel": "auto"}
    recipe["targets"] = {"local": local}
    recipe["outputs"] = {**recipe.get("outputs", {}), "formats": ["qcow2"]}
    path = directory / workload.recipe.name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_kiln(workload: Workload, build_in: str, tmp: Path, api_url: str | None) -> Figures:
    """kiln build of the workload's recipe into a throwaway KILN_HOME and a cold cache (the usual bases). api_url:
    a running Prefect server's; None: the build starts Prefect's temporary server, as a bare `kiln build` does."""
    recipe = kiln_recipe(workload, build_in, tmp / "recipe")
    home = tmp / "kiln-home"
    cache = cold_cache(tmp / "kiln-cache")
    env = {**os.environ, "KILN_HOME": str(home), "KILN_CACHE": str(cache), "KILN_LAYER_CACHE": str(cache / "layers")}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    with LoadSampler() as load:
        started = time.monotonic()
        done = run_timed([str(KILN), "build", str(recipe), "--target", "local", "--json"], env)
        wall = time.monotonic() - started
    if done.returncode != 0:
        stderr = "\n".join(line for _, line in done.lines)
        raise RuntimeError(f"kiln build failed ({done.returncode}):\n{done.stdout[-3000:]}\n{stderr[-3000:]}")
    build_id = json.loads(done.stdout)[0]["build_id"]
    shown = subprocess.run([str(KILN), "show", build_id, "--json"], env=env, capture_output=True, text=True,
                           check=True)  # fmt: skip
    detail = json.loads(shown.stdout)
    recorded = (detail.get("parameters") or {}).get("build_in")
    if recorded != build_in:
        raise RuntimeError(f"kiln recorded build_in {recorded!r} for a {build_in} build")
    steps = step_seconds(detail["steps"])
    outputs = sorted((home / "images").rglob("*.qcow2"))
    if len(outputs) != 1:
        raise RuntimeError(f"expected one registered qcow2 under {home / 'images'}, found {outputs}")
    return Figures(
        ready_seconds=steps["launch"] + steps["wait_boot"],
        customize_seconds=steps["customize"],
        wall_seconds=wall,
        verify_seconds=steps["verify"],
        output_bytes=outputs[0].stat().st_size,
        load=load.summary(),
        notes={**kiln_notes(detail, steps), "customize, slow lines": slow_lines(done.lines, "customize")},
    )


@dataclass
class TimedRun:
    returncode: int
    stdout: str
    lines: list[tuple[float, str]]  # stderr's lines, each with the second (since start) it arrived


def run_timed(argv: list[str], env: dict[str, str]) -> TimedRun:
    """Run a command; its stderr lines are stamped as they arrive (kiln prints each stage's log lines there
    with --json, untimed)."""
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started, lines = time.monotonic(), []

    def stamp() -> None:
        for line in process.stderr:
            lines.append((time.monotonic() - started, line.rstrip("\n")))

    reader = threading.Thread(target=stamp, daemon=True)
    reader.start()
    stdout = process.stdout.read()
    returncode = process.wait()
    reader.join()
    return TimedRun(returncode, stdout, lines)


def slow_lines(lines: list[tuple[float, str]], stage: str, gap: float = 0.5) -> str:
    """Where a stage's time went: each of its lines that came gap seconds or more after the line before it (the
    work in between was what the line reports, or what follows the line before), and the stage's end."""
    own = f"[local/{stage}] "
    marks = [(at, line.removeprefix(own)) for at, line in lines
             if line.startswith(own) or line.startswith(f"[local] {stage}: ")]  # fmt: skip
    if not marks:
        return ""
    found = [f"+{at - before:.1f}s {line[:90]}" for (before, _), (at, line) in zip(marks, marks[1:], strict=False)
             if at - before >= gap]  # fmt: skip
    return "; ".join(found) or f"no gap of {gap} s"


def kiln_notes(detail: dict, steps: dict[str, float]) -> dict[str, str]:
    """What the lead reads to see where a kiln build went: stages, sanitize, snapshot, probes."""
    logs = {step["stage"]: step.get("log") or "" for step in detail["steps"]}
    sanitize = logs.get("sanitize", "")
    return {
        "stages (s)": json.dumps({k: round(v, 1) for k, v in steps.items()}),
        "wait_boot": "; ".join(line for line in logs.get("wait_boot", "").splitlines() if "degraded" in line),
        "zero-free-space": "; ".join(line.removeprefix("zero-free-space: ") for line in sanitize.splitlines()
                                     if line.startswith("zero-free-space: ")) or "not run",  # fmt: skip
        "sanitize (removed, time)": ", ".join(re.sub(r": done \((\d+) removed, ", r" \1 in ", line).rstrip(")")
                                              for line in sanitize.splitlines() if ": done (" in line),  # fmt: skip
        "snapshot": "; ".join(line for line in logs.get("snapshot", "").splitlines()
                              if line.startswith(("stopped in", "image written in"))),  # fmt: skip
        "probes": ", ".join(f"{p['name']} {'passed' if p['passed'] else 'FAILED'} ({p['duration']:.1f}s)"
                            for p in detail.get("probes", [])),  # fmt: skip
    }


def step_seconds(steps: list[dict]) -> dict[str, float]:
    """Each succeeded stage's duration from its StepRun row."""
    seconds = {}
    for step in steps:
        if step["status"] == "succeeded":
            start, end = dt.datetime.fromisoformat(step["started"]), dt.datetime.fromisoformat(step["finished"])
            seconds[step["stage"]] = (end - start).total_seconds()
    return seconds


def cold_cache(directory: Path) -> Path:
    """A KILN_CACHE holding the usual cached bases and KVM probe and nothing else: no layer an earlier build kept is
    reused, so every build runs its whole customize (a first build, as Packer's always is)."""
    directory.mkdir()
    for name in ("bases", "kvm-probe.json"):
        if (settings.cache_dir() / name).exists():
            (directory / name).symlink_to(settings.cache_dir() / name)
    return directory


@contextmanager
def running_prefect_server(tmp: Path) -> Iterator[str]:
    """A `prefect server start` for the kiln builds, answering already (as a long-running one would)."""
    from bench.overhead import warm_up
    from bench.prefect_server import prefect_server

    home = tmp / "prefect-home"
    home.mkdir()
    with prefect_server(home) as api_url:
        warm_up(api_url)
        yield api_url


# ------------------------------------------------------------------------------------------------ a workload


def run_workload(workload: Workload, modes: list[str], base: Path, accel: str, packer_zero: bool, tmp: Path,
                 api_url: str | None) -> WorkloadRun:  # fmt: skip
    """Each chosen column in turn, and the plain chroot right after the container build (the nearest load)."""
    run = WorkloadRun(workload)
    for mode in modes:
        work = tmp / f"{workload.name}-{mode}"
        work.mkdir()
        try:
            if mode == "packer":
                run.figures[mode] = run_packer(workload, base, accel, packer_zero, work)
            else:
                run.figures[mode] = run_kiln(workload, mode, work, api_url)
        except Exception as exc:  # one failed column must not hide the others' figures
            run.errors[mode] = f"{type(exc).__name__}: {exc}"
        if mode == "container":
            time_chroot(run, base, tmp / f"{workload.name}-chroot")
    return run


def time_chroot(run: WorkloadRun, base: Path, work: Path) -> None:
    with LoadSampler() as load:
        try:
            # kiln's customize stage ends with a sync too
            run.chroot = timed_in_chroot(base, run.workload.chroot_uploads, f"{run.workload.chroot_command} && sync",
                                         work)  # fmt: skip
        except Exception as exc:
            run.errors["chroot"] = f"{type(exc).__name__}: {exc}"
    run.chroot_load = load.summary()


# ---------------------------------------------------------------------------------------------------- report


def print_header(accel: str, packer_zero: bool, prefect: str) -> None:
    print(f"accelerator {accel}; {packer_version()}; base: kiln's cached debian-bookworm bootstrap qcow2; "
          "Packer's guest and kiln's guests: 1 GiB, 2 CPUs")  # fmt: skip
    print("kiln's Prefect: " + ("a running server (prefect server start)" if prefect == "server" else
                                "the temporary server `kiln build` starts when PREFECT_API_URL is unset"))
    print(f"Packer's sanitize: {'bento-style zero fill (dd /dev/zero, rm)' if packer_zero else 'none'}; kiln's: "
          "every sanitize operation (zero-free-space: fstrim in the container or guest; a container's snapshot "
          "trims again after it stopped)")
    print("boot/ready: Packer 'Starting VM' -> 'Connected to SSH' in its log (1 s resolution); kiln launch + "
          "wait_boot StepRuns (vm: overlay, seed, host key, cloud-init done; container: working copy, mount, "
          "network, the image's systemd running)", flush=True)  # fmt: skip


def print_report(run: WorkloadRun) -> None:
    figures, workload = run.figures, run.workload
    print(f"\n== workload {workload.name}: {workload.description}")
    columns = [mode for mode in MODES if mode in figures]
    ratios = [mode for mode in ("container", "vm") if mode in figures and "packer" in figures]
    rows: list[tuple[str, Callable[[Figures], float], float | None]] = [
        ("boot/ready (s)", lambda f: f.ready_seconds, None),
        ("customize (s)", lambda f: f.customize_seconds, None),
        ("wall time (s)", lambda f: f.wall_seconds, workload.wall_target),
        ("wall time without verify (s)", lambda f: f.wall_without_verify, None),
        ("output qcow2 (bytes)", lambda f: f.output_bytes, SIZE_TARGET),
    ]
    print(f"{'':30}" + "".join(f"{COLUMNS[m]:>16}" for m in columns)
          + "".join(f"{m + '/Packer':>18}" for m in ratios) + ("   target (container)" if ratios else ""))
    for label, value, target in rows:
        line = f"{label:30}" + "".join(f"{shown(value(figures[m])):>16}" for m in columns)
        line += "".join(f"{value(figures[m]) / value(figures['packer']):>18.2f}" for m in ratios)
        if target is not None and "container" in ratios:
            line += "   " + verdict(value(figures["container"]) / value(figures["packer"]), target)
        print(line)
    print_chroot(run)
    for mode in columns:
        print(f"{COLUMNS[mode]}: load average (1 min) {figures[mode].load} (2 cores, shared)")
        for name, note in figures[mode].notes.items():
            if note:
                print(f"  {name}: {note}")
    for what, error in run.errors.items():
        print(f"{COLUMNS.get(what, what)} FAILED: {error}")
    sys.stdout.flush()


def print_chroot(run: WorkloadRun) -> None:
    """kiln's container customize stage against the same commands in a plain chroot."""
    if run.chroot is None:
        return
    line = (f"customize in a plain chroot on a working copy of the base: {run.chroot.seconds:.1f} s "
            f"(load {run.chroot_load}; `{run.workload.chroot_command}`, no service started)")  # fmt: skip
    print(line)
    if "container" in run.figures:
        ratio = run.figures["container"].customize_seconds / run.chroot.seconds
        print(f"kiln container customize / plain chroot: {ratio:.2f}   {verdict(ratio, CHROOT_TARGET)}")


def shown(value: float) -> str:
    return f"{value:d}" if isinstance(value, int) else f"{value:.1f}"


def verdict(ratio: float, target: float) -> str:
    return f"<= {target} " + ("met" if ratio <= target else "MISSED")


def packer_version() -> str:
    done = subprocess.run(["packer", "version"], capture_output=True, text=True, check=False)
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 else "Packer unknown"


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.packer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    parser.add_argument("--modes", type=modes_list, default=list(MODES),
                        help="the columns, comma-separated, from packer,container,vm (default: all three)")  # fmt: skip
    parser.add_argument("--packer-zero", action=argparse.BooleanOptionalAction, default=True,
                        help="give Packer the zero-fill cleanup step typical Packer templates end with")  # fmt: skip
    parser.add_argument("--prefect", choices=("ephemeral", "server"), default="ephemeral",
                        help="kiln against Prefect's temporary server (default, what a bare `kiln build` does) "
                             "or against a running `prefect server start` (the Prefect UI set-up)")  # fmt: skip
    return parser.parse_args(argv)


def modes_list(text: str) -> list[str]:
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(MODES)}")
    return [mode for mode in MODES if mode in modes]  # always Packer, container, vm order


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "packer" in args.modes and shutil.which("packer") is None:
        raise RuntimeError("packer is not installed (make bench installs Debian's packer)")
    workloads = list(WORKLOADS.values()) if args.workload == "all" else [WORKLOADS[args.workload]]
    accel = chosen_accel()
    print_header(accel, args.packer_zero, args.prefect)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-packer-") as name, ExitStack() as stack:
        tmp = Path(name)
        base = cached_base(accel, tmp)
        api_url = None
        if args.prefect == "server" and set(args.modes) - {"packer"}:
            api_url = stack.enter_context(running_prefect_server(tmp))
        for workload in workloads:
            print_report(run_workload(workload, args.modes, base, accel, args.packer_zero, tmp, api_url))


if __name__ == "__main__":
    main()
