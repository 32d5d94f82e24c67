"""Nightly at scale: 20 unchanged recipes all skipped (target ≤ 10 s), and the scheduling overhead per build
through a Prefect server and a process worker, VM time excluded.

Run: python -m bench.nightly [--recipes 20] [--runs 6]. Starts its own Prefect server (SQLite) and worker in
a temporary directory and stops them by PID; touches nothing of the user's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.prefect_server import PREFECT, prefect_server, server_env, stop_group

REPO = Path(__file__).resolve().parent.parent
SKIP_TARGET_SECONDS = 10.0

RECIPE = """name: {name}
version: 1.0.0
targets:
  local:
    base: {{file: base.img, sha256: {sha}}}
    ssh_user: debian
scripts: [hello.sh]
verify:
  - command: {{run: cat /etc/kiln-hello, expect: hello}}
"""


def make_recipes(directory: Path, count: int) -> list[Path]:
    """`count` small recipes on one tiny base file, committed in a git repository."""
    import hashlib

    directory.mkdir(parents=True)
    base = directory / "base.img"
    base.write_bytes(os.urandom(64 * 1024))
    sha = hashlib.sha256(base.read_bytes()).hexdigest()
    (directory / "hello.sh").write_text("#!/bin/sh\necho hello > /etc/kiln-hello\n")
    paths = []
    for index in range(count):
        path = directory / f"r{index:02d}.yaml"
        path.write_text(RECIPE.format(name=f"bench-{index:02d}", sha=sha))
        paths.append(path)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"],
                 ["-c", "user.email=b@example.org", "-c", "user.name=bench", "commit", "-q", "-m", "recipes"]):
        subprocess.run(["git", *args], cwd=directory, check=True)
    return paths


def seed_good_images(paths: list[Path]) -> None:
    """Record for each recipe a succeeded build on today's base by this kiln: what a previous night left."""
    from clouds import open_cloud
    from core.recipe import load_recipe
    from flows.nightly import base_spec
    from provenance import gitinfo, store

    for path in paths:
        recipe = load_recipe(path)
        spec = recipe.targets["local"]
        base = open_cloud(spec, recipe.timeouts, target_name="local").resolve_base(base_spec(recipe, spec),
                                                                                          spec.ssh_user)
        version = store.record_recipe_version(name=recipe.name, version=recipe.version,
                                              fingerprint=recipe.fingerprint(), recipe_json="{}",
                                              git=gitinfo.capture(recipe.path, recipe.referenced_files()))
        build = store.start_build(recipe_version_id=version, target="local", cloud="local", trigger="test")
        parent = store.record_image(cloud="local", image_id=base.image_id, kind="base", sha256=base.digest)
        store.record_image(cloud="local", image_id=f"img-{build[:12]}", build_id=build, parent_id=parent)
        store.finish_build(build, "succeeded")


@contextlib.contextmanager
def worker(home: Path, api_url: str, pool: str) -> Iterator[None]:
    """One `prefect worker start` process, stopped by its process group."""
    env = server_env(home, api_url) | {"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "0"}
    log = (home / f"worker-{pool}.log").open("w")
    proc = subprocess.Popen([str(PREFECT), "worker", "start", "--pool", pool, "--name", "bench-worker"], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield
    finally:
        stop_group(proc, grace=30)
        log.close()


def prefect_cli(home: Path, api_url: str, *args: str) -> None:
    subprocess.run([str(PREFECT), "--no-prompt", *args], cwd=REPO, env=server_env(home, api_url), check=True,
                   capture_output=True, timeout=300)


def bench_skips(recipes_dir: Path) -> tuple[float, list[dict]]:
    from flows.nightly import nightly_rebuild

    started = time.monotonic()
    decisions = nightly_rebuild(str(recipes_dir))
    return time.monotonic() - started, decisions


def bench_overhead(home: Path, api_url: str, recipe: Path, runs: int) -> list[tuple[float, float]]:
    """Runs of the build-image deployment that stop at fetch_base (their base file is gone): no VM at all, so
    every second is the machinery's. Returns (created → running, running → finished) per run."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    prefect_cli(home, api_url, "work-pool", "create", "kiln", "--type", "process")
    prefect_cli(home, api_url, "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    (recipe.parent / "base.img").unlink()
    timings = []
    with worker(home, api_url, "kiln"):
        for _ in range(runs):
            request = {"recipe": str(recipe), "targets": ["local"]}
            run = run_deployment("build-recipe/build-image", parameters={"request": request}, timeout=600,
                                 poll_interval=0.5, as_subflow=False)
            with get_client(sync_client=True) as client:
                history = client.read_flow_run_states(run.id)
            running = next(s.timestamp for s in history if s.type.value == "RUNNING")
            final = history[-1].timestamp
            timings.append(((running - run.created).total_seconds(), (final - running).total_seconds()))
    return timings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", type=int, default=20)
    parser.add_argument("--runs", type=int, default=6)
    args = parser.parse_args(argv if argv is not None else [])
    with tempfile.TemporaryDirectory(prefix="kiln-bench-nightly-") as tmp:
        home = Path(tmp)
        os.environ["KILN_HOME"] = str(home / "kiln")
        os.environ.pop("KILN_DATABASE_URL", None)
        paths = make_recipes(home / "recipes", args.recipes)
        seed_good_images(paths)
        with prefect_server(home) as api_url:
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings({PREFECT_API_URL: api_url}):
                seconds, decisions = bench_skips(home / "recipes")
                skipped = sum(d["action"] == "skip" for d in decisions)
                verdict = "ok" if skipped == len(paths) and seconds <= SKIP_TARGET_SECONDS else "MISSED"
                print(f"nightly over {len(paths)} unchanged recipes: {skipped} skipped in {seconds:.2f} s "
                      f"(target ≤ {SKIP_TARGET_SECONDS:.0f} s: {verdict})")
                print(f"  e.g. {decisions[0]['recipe'].split('/')[-1]}: {decisions[0]['reason']}")
                timings = bench_overhead(home, api_url, paths[0], args.runs)
        queue = [q for q, _ in timings]
        total = [q + r for q, r in timings]
        print(f"scheduling overhead per build through server + process worker ({len(timings)} runs, worker polls "
              f"every 2 s, no VM): created → running median {statistics.median(queue):.1f} s "
              f"(max {max(queue):.1f}); created → finished median {statistics.median(total):.1f} s "
              f"(max {max(total):.1f})")


if __name__ == "__main__":
    main(sys.argv[1:])
