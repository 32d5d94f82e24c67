"""kiln vs Packer 1.6.6's qemu builder: the same cached bootstrap base and the same provisioning
(bench/packer/provision.sh), built by both on this machine; boot-to-SSH, wall time and output size side by
side, with the ratios the issues aim at. Run: python -m bench.packer [--no-packer-zero]."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from clouds import qemu
from clouds.base import KeyPair
from clouds.local import LocalCloud
from kiln import settings

HERE = Path(__file__).with_name("packer")
TEMPLATE = HERE / "debian-bookworm.json"
RECIPE = HERE / "recipe.yaml"
KILN = Path(sys.executable).with_name("kiln")
USER = "debian"
WALL_TARGET = 0.8
SIZE_TARGET = 0.9
# Packer 1.6.6's log: "2026/11/22 06:30:01 ui: ==> qemu: Starting VM, booting disk image"
PACKER_LOG_LINE = re.compile(r"^(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) (.*)$")


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
    wall_seconds: float
    boot_to_ssh_seconds: float
    output_bytes: int
    load: str
    notes: dict[str, float | str] = field(default_factory=dict)


def cached_base(accel: str, tmp: Path) -> Path:
    """kiln's debian-bookworm bootstrap base from the cache (built first if the cache lacks it)."""
    cloud = LocalCloud(state_dir=tmp / "state", images_dir=tmp / "images", accel=accel)
    base = cloud.resolve_base(SimpleNamespace(kind="bootstrap", bootstrap="debian-bookworm", packages=None), USER)
    return Path(base.details.get("path") or base.image_id)


def chosen_accel() -> str:
    """What kiln's local cloud picks for accel: auto: KVM only when the probe shows it really runs guest code."""
    return "kvm" if qemu.kvm_works(settings.cache_dir() / "kvm-probe.json") else "tcg"


def run_packer(base: Path, accel: str, zero_free_space: bool, tmp: Path) -> Figures:
    """packer build of bench/packer/debian-bookworm.json; boot-to-SSH from its log's timestamps."""
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
    log_path, output_dir = tmp / "packer.log", tmp / "output"
    env = {**os.environ, "PACKER_LOG": "1", "PACKER_LOG_PATH": str(log_path), "CHECKPOINT_DISABLE": "1",
           "PACKER_CACHE_DIR": str(tmp / "packer_cache")}  # fmt: skip
    variables = {
        "base": str(base),
        "base_sha256": file_sha256(base),
        "accelerator": accel,
        "seed_dir": str(seed),
        "ssh_key": str(key_file),
        "output_dir": str(output_dir),
        "zero_free_space": "true" if zero_free_space else "false",
    }
    command = ["packer", "build", "-color=false"]
    for name, value in variables.items():
        command += ["-var", f"{name}={value}"]
    with LoadSampler() as load:
        started = time.monotonic()
        done = subprocess.run([*command, str(TEMPLATE)], env=env, capture_output=True, text=True, check=False)
        wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"packer build failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    events = packer_events(log_path.read_text(errors="replace"))
    output = output_dir / "packer-bench.qcow2"
    return Figures(
        wall_seconds=wall,
        boot_to_ssh_seconds=events["Connected to SSH"] - events["Starting VM"],
        output_bytes=output.stat().st_size,
        load=load.summary(),
        notes={"waiting_for_ssh_to_connected": events["Connected to SSH"] - events["Waiting for SSH"]},
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as disk:
        while chunk := disk.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def packer_events(log: str) -> dict[str, float]:
    """The first time (epoch seconds, 1 s resolution) Packer's log shows each boot milestone."""
    wanted = ("Starting VM", "Waiting for SSH", "Connected to SSH")
    seen: dict[str, float] = {}
    for line in log.splitlines():
        match = PACKER_LOG_LINE.match(line)
        if not match:
            continue
        for marker in wanted:
            if marker not in seen and f"qemu: {marker}" in match.group(2):
                stamp = dt.datetime.strptime(match.group(1), "%Y/%m/%d %H:%M:%S")
                seen[marker] = stamp.timestamp()
    missing = [m for m in wanted if m not in seen]
    if missing:
        raise RuntimeError(f"Packer's log lacks {missing}")
    return seen


def run_kiln(tmp: Path, api_url: str | None) -> Figures:
    """kiln build of bench/packer/recipe.yaml (accel: auto, the probe) into a throwaway KILN_HOME; the base
    cache is the usual one. api_url: a running Prefect server's; None: the build starts Prefect's temporary
    server itself, as `kiln build` does on a machine without one."""
    home = tmp / "kiln-home"
    env = {**os.environ, "KILN_HOME": str(home), "KILN_CACHE": str(settings.cache_dir())}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    with LoadSampler() as load:
        started = time.monotonic()
        done = subprocess.run(
            [str(KILN), "build", str(RECIPE), "--target", "local", "--json"],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"kiln build failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)[0]
    shown = subprocess.run(
        [str(KILN), "show", result["build_id"], "--json"], env=env, capture_output=True, text=True, check=True
    )
    detail = json.loads(shown.stdout)
    steps = step_seconds(detail["steps"])
    logs = {step["stage"]: step.get("log") or "" for step in detail["steps"]}
    outputs = sorted((home / "images").rglob("*.qcow2"))
    if len(outputs) != 1:
        raise RuntimeError(f"expected one registered qcow2 under {home / 'images'}, found {outputs}")
    return Figures(
        wall_seconds=wall,
        boot_to_ssh_seconds=steps["launch"] + steps["wait_boot"],
        output_bytes=outputs[0].stat().st_size,
        load=load.summary(),
        notes={
            "verify_seconds": steps["verify"],
            "stages": json.dumps({k: round(v, 1) for k, v in steps.items()}),
            "zero_free_space": zero_free_space_lines(logs.get("sanitize", "")),
            "snapshot": "; ".join(line for line in logs.get("snapshot", "").splitlines()
                                  if line.startswith(("stopped in", "image written in"))),  # fmt: skip
            "sanitize": ", ".join(re.sub(r": done \((\d+) removed, ", r" \1 in ", line).rstrip(")")
                                  for line in logs.get("sanitize", "").splitlines() if ": done (" in line),  # fmt: skip
        },
    )


def zero_free_space_lines(sanitize_log: str) -> str:
    """What kiln's zero-free-space operation did, from the sanitize step log: fstrim's report (the discard path)
    or 'zeroed free space' (the dd fallback)."""
    lines = [line.removeprefix("zero-free-space: ") for line in sanitize_log.splitlines()
             if line.startswith("zero-free-space: ")]  # fmt: skip
    return "; ".join(lines) or "not run"


def step_seconds(steps: list[dict]) -> dict[str, float]:
    """Each succeeded stage's duration from its StepRun row."""
    seconds = {}
    for step in steps:
        if step["status"] == "succeeded":
            start, end = dt.datetime.fromisoformat(step["started"]), dt.datetime.fromisoformat(step["finished"])
            seconds[step["stage"]] = (end - start).total_seconds()
    return seconds


def print_table(packer: Figures, kiln: Figures, accel: str, zero: bool, prefect: str) -> None:
    verify = float(kiln.notes["verify_seconds"])
    wall_ratio, size_ratio = kiln.wall_seconds / packer.wall_seconds, kiln.output_bytes / packer.output_bytes
    no_verify_ratio = (kiln.wall_seconds - verify) / packer.wall_seconds
    print(f"accelerator {accel}; Packer {packer_version()}; base: kiln's cached debian-bookworm bootstrap qcow2")
    print("kiln's Prefect: " + ("a running server (prefect server start)" if prefect == "server" else
                                "the temporary server `kiln build` starts when PREFECT_API_URL is unset"))
    print(f"Packer's sanitize: {'bento-style zero fill (dd /dev/zero, rm)' if zero else 'none'}; "
          "kiln's: every sanitize operation (zero-free-space = fstrim on the discard-enabled disk)")  # fmt: skip
    print(f"{'':34}{'Packer':>12}{'kiln':>12}{'kiln/Packer':>14}{'target':>9}")
    rows = [
        ("boot to SSH (s)", packer.boot_to_ssh_seconds, kiln.boot_to_ssh_seconds, None),
        ("wall time (s)", packer.wall_seconds, kiln.wall_seconds, WALL_TARGET),
        ("wall time without verify (s)", packer.wall_seconds, kiln.wall_seconds - verify, WALL_TARGET),
        ("output qcow2 (bytes)", packer.output_bytes, kiln.output_bytes, SIZE_TARGET),
    ]
    for label, p, k, target in rows:
        ratio = k / p
        verdict = "" if target is None else (f"<= {target}" + (" met" if ratio <= target else " MISSED"))
        shown = [f"{v:>12d}" if isinstance(v, int) else f"{v:>12.1f}" for v in (p, k)]
        print(f"{label:34}{shown[0]}{shown[1]}{ratio:>14.2f}  {verdict}")
    print(f"load average (1 min) during Packer: {packer.load}; during kiln: {kiln.load} (2 cores, shared)")
    print("boot to SSH: Packer 'Starting VM' -> 'Connected to SSH' in its log (1 s resolution; Waiting for SSH -> "
          f"Connected {packer.notes['waiting_for_ssh_to_connected']:.0f} s); kiln launch + wait_boot StepRuns "
          "(includes overlay, seed, host key pinned from the console and cloud-init done)")  # fmt: skip
    print(f"kiln stages (s): {kiln.notes['stages']}")
    print(f"kiln zero-free-space: {kiln.notes['zero_free_space']}")
    print(f"kiln sanitize operations (removed, guest time): {kiln.notes['sanitize']}")
    print(f"kiln snapshot: {kiln.notes['snapshot']}")
    print(f"summary: wall {wall_ratio:.2f} (without verify {no_verify_ratio:.2f}), size {size_ratio:.2f}")


def packer_version() -> str:
    done = subprocess.run(["packer", "version"], capture_output=True, text=True, check=False)
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 else "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.packer", description=__doc__)
    parser.add_argument("--packer-zero", action=argparse.BooleanOptionalAction, default=True,
                        help="give Packer the zero-fill cleanup step typical Packer templates end with")  # fmt: skip
    parser.add_argument("--prefect", choices=("ephemeral", "server"), default="ephemeral",
                        help="kiln against Prefect's temporary server (default, what a bare `kiln build` does) "
                             "or against a running `prefect server start` (the Prefect UI set-up)")  # fmt: skip
    args = parser.parse_args(argv)
    if shutil.which("packer") is None:
        raise RuntimeError("packer is not installed (make bench installs Debian's packer)")
    accel = chosen_accel()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-packer-") as name:
        tmp = Path(name)
        base = cached_base(accel, tmp)
        (tmp / "packer").mkdir()
        (tmp / "kiln").mkdir()
        packer = run_packer(base, accel, args.packer_zero, tmp / "packer")
        with ExitStack() as stack:
            api_url = stack.enter_context(running_prefect_server(tmp)) if args.prefect == "server" else None
            kiln = run_kiln(tmp / "kiln", api_url)
        print_table(packer, kiln, accel, args.packer_zero, args.prefect)


@contextmanager
def running_prefect_server(tmp: Path) -> Iterator[str]:
    """A `prefect server start` for the kiln build, answering already (as a long-running one would)."""
    from bench.overhead import warm_up
    from tests.prefect_server import prefect_server

    home = tmp / "prefect-home"
    home.mkdir()
    with prefect_server(home) as api_url:
        warm_up(api_url)
        yield api_url


if __name__ == "__main__":
    main()
