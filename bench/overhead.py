"""kiln's own overhead per build: the wall time of `kiln build` in which neither a guest nor the cloud was
working. Timing proxies mark the busy intervals: every call on the cloud object (launch, stop, snapshot,
console, ...), all SSH work (wait_for_ssh, every command, upload and probe), and each guest's boot from the
return of launch to the end of the SSH wait (kiln code in that window overlaps the boot and costs no wall
time). The overhead is the wall time outside their union; kiln's own time, overlapped or not, is broken down
by kind. The database exists before the measured build (every build but a machine's first finds it so).
Once with Prefect's ephemeral server (started inside the build, reported apart) and once against a running
`prefect server start`. Run: python -m bench.overhead [--recipe recipes/hello.yaml] [--mode ephemeral|server|both]."""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = ROOT / "recipes" / "hello.yaml"
TARGET_SECONDS = 3.0
SSH_FUNCTIONS = ("wait_for_ssh", "key_rejected", "probe_port", "probe_http", "connect")
SESSION_METHODS = ("run", "put", "facts", "package_manifest", "wait_cloud_init", "close")
# The threads a build runs on (the CLI's, build_recipe's per-target pool): a Prefect request on any other thread
# is Prefect's own background work (log and event workers, lease renewal), off the build's wall-clock path.
BUILD_THREADS = ("MainThread", "kiln-target")
# The breakdown of kiln's own overhead: name prefix of the timed calls -> the row it is shown in.
CATEGORIES = {
    "prefect.engine.": "Prefect task engine (submit, states, hooks around each stage)",
    "prefect.api.": "Prefect API calls (flow runs, states, limits, logs)",
    "store.": "provenance database (StepRun, ledger, build rows)",
    "logging.": "step logging (StepLog lines, live table, Prefect logger)",
    "kiln.prepare": "build set-up (recipe, git capture, cloud object)",
    "kiln.stage.": "kiln code inside stages (local disk audit, keys, seeds)",
}


class Stopwatch:
    """Seconds spent in timed calls, by name, each call's own time only: a timed call inside another is
    charged to the inner name and taken off the outer one (so a StepLog flush's database write counts as a
    store write, not as logging). Prefect requests off the build's threads are kept apart (background)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.longest: dict[str, float] = defaultdict(float)
        self.background: dict[str, float] = defaultdict(float)  # Prefect's own worker threads, off the wall path
        # Wall-clock intervals in which a guest or the cloud was doing the work: every cloud and SSH call, and
        # each guest's boot from launch's return to the SSH wait's (kiln code in that window overlaps the boot).
        self.busy: list[tuple[float, float]] = []
        self._launched: dict[str, float] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def wrap(self, name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            stack = self._local.__dict__.setdefault("stack", [])
            stack.append(0.0)  # time of the timed calls nested in this one
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                ended = time.perf_counter()
                took = ended - started
                nested = stack.pop()
                if stack:
                    stack[-1] += took
                self._record(name, took, took - nested, outermost=not stack)
                if name.startswith(("cloud.", "ssh.")):
                    self._mark_busy(name, started, ended)

        return timed

    def _record(self, name: str, took: float, own: float, *, outermost: bool) -> None:
        thread = threading.current_thread().name
        with self._lock:
            if name.startswith("prefect.api.") and not thread.startswith(BUILD_THREADS):
                self.background[name] += own
                return
            self.seconds[name] += own
            self.calls[name] += 1
            self.longest[name] = max(self.longest[name], took)

    def _mark_busy(self, name: str, started: float, ended: float) -> None:
        thread = threading.current_thread().name
        with self._lock:
            self.busy.append((started, ended))
            if name == "cloud.launch":
                self._launched[thread] = ended
            elif name == "ssh.wait_for_ssh" and thread in self._launched:
                self.busy.append((self._launched.pop(thread), ended))

    def busy_seconds(self) -> float:
        """The length of the union of the busy intervals: wall time in which a guest or the cloud worked."""
        total, reach = 0.0, float("-inf")
        for start, end in sorted(self.busy):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total

    def total(self, prefix: str = "") -> float:
        return sum(v for k, v in self.seconds.items() if k.startswith(prefix))


class TimedCloud:
    """The build's cloud with every method call timed; plain attributes (name, state_dir) pass through."""

    def __init__(self, cloud: Any, watch: Stopwatch) -> None:
        self._cloud, self._watch = cloud, watch

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._cloud, name)
        return self._watch.wrap(f"cloud.{name}", value) if callable(value) else value


def instrument(watch: Stopwatch, stack: ExitStack) -> None:
    """Put the timing proxies in place for this process (undone when the stack closes)."""
    import flows.build
    from clouds import ssh

    def patch(owner: Any, name: str, value: Any) -> None:
        if isinstance(owner, type) and name not in owner.__dict__:  # inherited: shadowed here, then unshadowed
            setattr(owner, name, value)
            stack.callback(delattr, owner, name)
            return
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        setattr(owner, name, value)
        stack.callback(setattr, owner, name, original)

    opener = flows.build.open_cloud
    patch(flows.build, "open_cloud", lambda *a, **k: TimedCloud(opener(*a, **k), watch))
    for name in SSH_FUNCTIONS:
        patch(ssh, name, watch.wrap(f"ssh.{name}", getattr(ssh, name)))
    for name in SESSION_METHODS:
        patch(ssh.GuestSession, name, watch.wrap(f"ssh.session.{name}", getattr(ssh.GuestSession, name)))
    instrument_overhead(watch, patch)
    if not os.environ.get("PREFECT_API_URL"):  # only then: importing Prefect's server costs seconds itself
        from prefect.server.api.server import SubprocessASGIServer

        start = watch.wrap("prefect.ephemeral_server_start", SubprocessASGIServer.start)
        patch(SubprocessASGIServer, "start", start)


def instrument_overhead(watch: Stopwatch, patch: Any) -> None:
    """Time what kiln's own overhead is made of: the provenance store's functions, step logging, the Prefect
    client's requests and the Prefect task engine around each stage (its call minus the stage's own body)."""
    import inspect

    from prefect import Task
    from prefect.client.orchestration import SyncPrefectClient

    import flows.build
    import tasks.common
    from provenance import store

    for name, value in vars(store).items():
        if inspect.isfunction(value) and value.__module__ == store.__name__ and not name.startswith("_"):
            patch(store, name, watch.wrap(f"store.{name}", value))
    for name in ("__call__", "flush"):
        patch(tasks.common.StepLog, name, watch.wrap(f"logging.steplog.{name}", getattr(tasks.common.StepLog, name)))
    patch(tasks.common, "_notify", watch.wrap("logging.notify", tasks.common._notify))
    patch(flows.build, "prepare", watch.wrap("kiln.prepare", flows.build.prepare))
    requests = {}  # the client's request methods, most of them from its mixins (flow runs, limits, artifacts, ...)
    for cls in reversed(SyncPrefectClient.__mro__[:-1]):
        requests.update({k: v for k, v in vars(cls).items() if inspect.isfunction(v) and not k.startswith("_")})
    for name, value in requests.items():
        patch(SyncPrefectClient, name, watch.wrap(f"prefect.api.{name}", value))
    from prefect.concurrency import _sync as concurrency_sync  # the VM slot on a server: lease acquire/release

    for name in ("acquire_concurrency_slots_with_lease", "release_concurrency_slots_with_lease"):
        patch(concurrency_sync, name, watch.wrap(f"prefect.api.{name}", getattr(concurrency_sync, name)))
    # A stage's Prefect call: the engine's time is the call minus the stage body (timed as kiln.stage).
    for module in ("fetch_base", "launch", "wait_boot", "customize", "sanitize", "snapshot", "verify", "register"):
        stage_task = getattr(flows.build, module)
        if isinstance(stage_task, Task):
            patch(stage_task, "fn", watch.wrap(f"kiln.stage.{module}", stage_task.fn))
    patch(Task, "__call__", watch.wrap("prefect.engine.task", Task.__call__))


def breakdown(figures: dict[str, Any], by_own: dict[str, float]) -> dict[str, float]:
    """kiln's own time by kind: imports, then each category of CATEGORIES, and everything else."""
    rows = {"imports (kiln.cli, flows.build)": figures["import_seconds"]}
    for prefix, label in CATEGORIES.items():
        rows[label] = sum(v for k, v in by_own.items() if k.startswith(prefix))
    rows["everything else (Prefect flow engine, CLI, result handling)"] = figures["own_seconds_total"] - sum(
        v for k, v in rows.items() if not k.startswith("imports")
    )
    return rows


def measure_child(recipe: Path) -> dict[str, Any]:
    """One `kiln build --json` in this process with the proxies in place; the figures as a dict."""
    started = time.perf_counter()
    from kiln.cli import app
    from kiln.commands.build import quiet_prefect_console

    quiet_prefect_console()  # what `kiln build` does before importing the flow: Prefect reads it at import
    import flows.build  # noqa: F401 - the CLI imports it on the first build; timed here with the rest

    imported = time.perf_counter()
    watch = Stopwatch()
    with ExitStack() as stack:
        instrument(watch, stack)
        build_started = time.perf_counter()
        try:  # click returns typer.Exit's code when not standalone
            code = app(["build", str(recipe), "--target", "local", "--json"], standalone_mode=False) or 0
        except SystemExit as exc:
            code = exc.code or 0
        wall = time.perf_counter() - build_started
    # Several threads may ask for the ephemeral server at once; they all wait for the one start.
    server = watch.longest.get("prefect.ephemeral_server_start", 0.0)
    inside = watch.total("cloud.") + watch.total("ssh.")
    return {
        "exit_code": code,
        "import_seconds": imported - started,
        "build_seconds": wall,
        "cloud_seconds": watch.total("cloud."),
        "ssh_seconds": watch.total("ssh."),
        "prefect_server_start_seconds": server,
        "own_seconds_total": wall - inside - server,
        "overhead_seconds": wall - watch.busy_seconds() - server,
        "by_call": {k: [round(v, 2), watch.calls[k]] for k, v in sorted(watch.seconds.items(), key=lambda x: -x[1])},
        "background": {k: round(v, 2) for k, v in sorted(watch.background.items(), key=lambda x: -x[1])},
        "own_seconds": dict(watch.seconds),
    }


def warm_up(api_url: str) -> None:
    """A running server has answered requests before: the measured build should not pay a new server's first
    responses (its lazy imports and database warm-up)."""
    import httpx

    for path in ("/health", "/admin/version", "/flows/filter", "/flow_runs/filter"):
        request = httpx.post if path.endswith("filter") else httpx.get
        request(f"{api_url}{path}", timeout=60).raise_for_status()


def run_mode(mode: str, recipe: Path, tmp: Path) -> dict[str, Any]:
    """A fresh interpreter per mode, so the ephemeral server really starts and the imports are paid."""
    env = {**os.environ, "KILN_HOME": str(tmp / f"kiln-home-{mode}")}
    env.setdefault("KILN_CACHE", str(Path.home() / ".cache" / "kiln"))  # the usual base cache, not a rebuild
    with ExitStack() as stack:
        if mode == "server":
            sys.path.insert(0, str(ROOT))
            from bench.prefect_server import prefect_server

            home = tmp / "prefect-home"
            home.mkdir()
            env["PREFECT_API_URL"] = stack.enter_context(prefect_server(home))
            warm_up(env["PREFECT_API_URL"])
        else:
            env.pop("PREFECT_API_URL", None)
        kiln = Path(sys.executable).with_name("kiln")
        subprocess.run([str(kiln), "db", "upgrade"], env=env, cwd=ROOT, capture_output=True, check=True)
        out = tmp / f"{mode}.json"
        command = [sys.executable, "-m", "bench.overhead", "--child", str(recipe), "--out", str(out)]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
        process_seconds = time.perf_counter() - started
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"{mode} build failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    figures = json.loads(out.read_text())
    figures["process_seconds"] = process_seconds
    inside = figures["cloud_seconds"] + figures["ssh_seconds"] + figures["prefect_server_start_seconds"]
    figures["process_overhead_seconds"] = process_seconds - inside
    figures["overlapped_seconds"] = figures["own_seconds_total"] - figures["overhead_seconds"]
    if figures["exit_code"] != 0:
        raise RuntimeError(f"{mode}: kiln build exited {figures['exit_code']}:\n{done.stderr[-3000:]}")
    return figures


def print_table(results: dict[str, dict[str, Any]], recipe: Path) -> None:
    print(f"recipe {recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe}, target local; "
          f"load average now {os.getloadavg()[0]:.2f} (2 cores, shared)")  # fmt: skip
    modes = list(results)
    print(f"{'seconds':44}" + "".join(f"{m:>14}" for m in modes))
    rows = [
        ("whole process (python start to exit)", "process_seconds"),
        ("  importing kiln.cli and flows.build", "import_seconds"),
        ("  kiln build (CLI call)", "build_seconds"),
        ("    inside cloud operations", "cloud_seconds"),
        ("    inside SSH (boot wait, commands, probes)", "ssh_seconds"),
        ("    Prefect ephemeral server start", "prefect_server_start_seconds"),
        ("    kiln's own time (the rest)", "own_seconds_total"),
        ("      of it while a guest boots (overlapped)", "overlapped_seconds"),
        ("      on the wall path: the overhead", "overhead_seconds"),
        ("whole process minus cloud, SSH, server start", "process_overhead_seconds"),
    ]
    for label, key in rows:
        print(f"{label:44}" + "".join(f"{results[m][key]:>14.2f}" for m in modes))
    for mode in modes:
        figures = results[mode]
        own = figures["overhead_seconds"]
        with_server = own + figures["prefect_server_start_seconds"]
        verdict = "met" if own <= TARGET_SECONDS else f"MISSED by {own - TARGET_SECONDS:.2f} s"
        print(f"{mode}: overhead {own:.2f} s inside the build call (target <= {TARGET_SECONDS:.0f} s: {verdict}); "
              f"with the server start {with_server:.2f} s; whole process (interpreter, imports, exit) "
              f"{figures['process_overhead_seconds']:.2f} s")  # fmt: skip
        print(f"  {mode}: kiln's own time by kind, overlapped or not (seconds)")
        for label, seconds in breakdown(figures, figures["own_seconds"]).items():
            print(f"    {label:60}{seconds:>8.2f}")
        top = [(k, v) for k, v in figures["by_call"].items() if not k.startswith(("cloud.", "ssh."))][:10]
        print(f"  largest overhead calls [own seconds, calls]: {dict(top)}")
        top = list(figures["by_call"].items())[:6]
        print(f"  largest timed calls [own seconds, calls]: {dict(top)}")
        if figures.get("background"):
            background = dict(list(figures["background"].items())[:5])
            print(f"  Prefect requests on background threads (not on the wall path): {background}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__)
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--mode", choices=("ephemeral", "server", "both"), default="both")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.out.write_text(json.dumps(measure_child(args.child)))
        return
    modes = ["ephemeral", "server"] if args.mode == "both" else [args.mode]
    recipe = args.recipe.resolve()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-overhead-") as name:
        results = {mode: run_mode(mode, recipe, Path(name)) for mode in modes}
    print_table(results, recipe)


if __name__ == "__main__":
    main()
