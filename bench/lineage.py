"""Lineage queries (ancestors + descendants, the recursive SQL `kiln lineage` runs) on a synthetic provenance
database of 100,000 images in trees 20 deep: p50/p95 on SQLite, and on a throwaway PostgreSQL cluster.
Run: python -m bench.lineage [--images 100000] [--depth 20] [--samples 300] [--no-postgres]."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import glob
import os
import pwd
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import create_engine, insert, text

from provenance import lineage, store
from provenance.models import Build, Image, RecipeVersion

TARGET_SQLITE_P50_MS = 20.0
TREE_SIZE = 100  # images per tree: one base and 99 built on it, spread over `depth` levels


@dataclass(frozen=True)
class LineageFigures:
    database: str
    images: int
    depth: int
    samples: int
    p50_ms: float  # ancestors + descendants of one image, both queries with their joins
    p95_ms: float
    max_ancestors: int
    max_descendants: int


def synthetic_rows(images: int, depth: int, seed: int = 7) -> tuple[list[dict], list[dict], list[dict]]:
    """Recipe versions, builds and images: trees of TREE_SIZE images `depth` levels deep (level 0: a base)."""
    rng = random.Random(seed)
    now = dt.datetime.now(dt.UTC)
    versions, builds, rows = [], [], []
    trees = max(1, images // TREE_SIZE)
    next_id = 1
    for tree in range(trees):
        version_id = tree + 1
        versions.append(
            {
                "id": version_id,
                "name": f"recipe-{tree}",
                "version": "1.0.0",
                "fingerprint": f"{tree:064x}",
                "repo": "/src",
                "commit": f"{tree:040x}",
                "branch": "main",
                "dirty": False,
                "in_git": True,
                "path": f"recipes/r{tree}.yaml",
                "recipe_json": "{}",
                "created": now,
            }
        )
        levels: list[list[int]] = [[next_id]]
        rows.append(_image(next_id, None, None, "base", now))
        next_id += 1
        per_level = [
            (TREE_SIZE - 1) // (depth - 1) + (1 if i < (TREE_SIZE - 1) % (depth - 1) else 0) for i in range(depth - 1)
        ]
        for count in per_level:
            level = []
            for _ in range(count):
                build_id = uuid.UUID(int=rng.getrandbits(128)).hex
                builds.append(
                    {
                        "id": build_id,
                        "recipe_version_id": version_id,
                        "target": "local",
                        "cloud": "local",
                        "region": "",
                        "trigger": "test",
                        "status": "succeeded",
                        "started": now,
                        "finished": now,
                        "kiln_version": "bench",
                        "host": "bench",
                        "pid": 1,
                        "parameters_json": "{}",
                    }
                )
                rows.append(_image(next_id, rng.choice(levels[-1]), build_id, "built", now))
                level.append(next_id)
                next_id += 1
            levels.append(level)
    return versions, builds, rows


def _image(row_id: int, parent: int | None, build_id: str | None, kind: str, now: dt.datetime) -> dict:
    return {
        "id": row_id,
        "cloud": "local",
        "region": "",
        "image_id": f"img-{row_id:012x}",
        "name": "",
        "format": "qcow2",
        "size": 1 << 30,
        "sha256": f"{row_id:064x}",
        "parent_id": parent,
        "build_id": build_id,
        "kind": kind,
        "status": "available",
        "revoked_reason": None,
        "path": "",
        "tags_json": "{}",
        "created": now,
    }


def load(url: str, images: int, depth: int) -> int:
    """Create kiln's schema (alembic, as kiln does) and bulk-load the synthetic rows. Bulk loading bypasses
    store.py's one-row-per-transaction writers, which are made for builds, not for 100,000 rows at once."""
    store.upgrade(url)
    versions, builds, rows = synthetic_rows(images, depth)
    with store.engine(url).begin() as conn:
        conn.execute(insert(RecipeVersion.__table__), versions)
        for start in range(0, len(builds), 10_000):
            conn.execute(insert(Build.__table__), builds[start : start + 10_000])
        for start in range(0, len(rows), 10_000):
            conn.execute(insert(Image.__table__), rows[start : start + 10_000])
        conn.execute(text("ANALYZE"))  # fresh statistics, as a long-lived database has
    return len(rows)


def measure(url: str, label: str, images: int, depth: int, samples: int) -> LineageFigures:
    os.environ["KILN_DATABASE_URL"] = url
    try:
        count = load(url, images, depth)
        rng = random.Random(11)
        timings, most_up, most_down = [], 0, 0
        for _ in range(5):  # warm the pool and the caches
            lineage.ancestors(rng.randint(1, count))
        for _ in range(samples):
            row = rng.randint(1, count)
            started = time.perf_counter()
            up = lineage.ancestors(row)
            down = lineage.descendants(row)
            timings.append((time.perf_counter() - started) * 1000)
            most_up, most_down = max(most_up, len(up)), max(most_down, len(down))
        timings.sort()
        return LineageFigures(
            label,
            count,
            depth,
            samples,
            round(statistics.median(timings), 2),
            round(timings[int(0.95 * (len(timings) - 1))], 2),
            most_up,
            most_down,
        )
    finally:
        store.dispose(url)
        os.environ.pop("KILN_DATABASE_URL", None)


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """A PostgreSQL cluster of our own on 127.0.0.1 (trust auth, fsync off), stopped and removed after."""
    bindir = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))[-1]).parent
    owner = "postgres" if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="kiln-bench-pg-"))
    data, sockets, log = base / "data", base / "sockets", base / "postgres.log"
    sockets.mkdir()
    log.touch()
    if owner:
        record = pwd.getpwnam(owner)
        for path in (base, sockets, log):
            os.chown(path, record.pw_uid, record.pw_gid)
    as_owner = ["runuser", "-u", owner, "--"] if owner else []
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pid = None
    try:
        subprocess.run(
            [
                *as_owner,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off"
        subprocess.run(
            [*as_owner, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        pid = int((data / "postmaster.pid").read_text().split()[0])
        server = f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
        admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text('CREATE DATABASE "kiln_bench"'))
        admin.dispose()
        yield f"{server}/kiln_bench"
    finally:
        if pid is not None:
            stopped = subprocess.run(
                [*as_owner, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                capture_output=True,
                timeout=60,
            )
            if stopped.returncode != 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> list[LineageFigures]:
    parser = argparse.ArgumentParser(prog="python -m bench.lineage", description=__doc__)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--no-postgres", action="store_true", help="measure SQLite only")
    args = parser.parse_args(argv if argv is not None else [])
    figures = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as work:
        sqlite = measure(f"sqlite:///{work}/lineage.db", "sqlite", args.images, args.depth, args.samples)
        figures.append(sqlite)
        _print(
            sqlite,
            f" (target p50 <= {TARGET_SQLITE_P50_MS:.0f} ms: "
            f"{'met' if sqlite.p50_ms <= TARGET_SQLITE_P50_MS else 'MISSED'})",
        )
    if not args.no_postgres:
        with throwaway_postgres() as url:
            postgres = measure(url, "postgresql", args.images, args.depth, args.samples)
        figures.append(postgres)
        _print(postgres, "")
    return figures


def _print(figures: LineageFigures, verdict: str) -> None:
    print(
        f"lineage on {figures.database}: {figures.images} images, depth {figures.depth}: ancestors + descendants "
        f"p50 {figures.p50_ms} ms, p95 {figures.p95_ms} ms over {figures.samples} images{verdict}",
        flush=True,
    )
    print(f"  {asdict(figures)}", flush=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
